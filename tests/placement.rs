//! Hybrid GPU/CPU expert placement, exercised on the CPU: the experts left on the "device" run
//! through the device's executor (candle's ops and the references), the ones placed in host
//! memory through the CPU kernels, and the split must give the unsplit logits. Every family with
//! routed experts, whole layers (`--n-cpu-moe`) and mixed layers (some experts of a layer on each
//! side), dense and quantized; and the command line end to end.

mod common;

use candle_core::Tensor;
use common::{expected, fixture, ids_arg, max_abs_diff, moe_run, FIXTURES};
use moe::config::{FfnKind, ModelConfig};
use moe::loader::{load_dir, LoadOptions};
use moe::model::Model;
use moe::quant::QFormat;

fn logits(model: &Model, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let x = Tensor::new(ids, model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&x, &mut cache, true, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// Per layer: MoE layers get `f(layer, experts)`, dense layers `None`.
fn masks(cfg: &ModelConfig, f: impl Fn(usize, usize) -> Vec<bool>) -> Vec<Option<Vec<bool>>> {
    cfg.layers
        .iter()
        .enumerate()
        .map(|(i, l)| match l {
            FfnKind::Moe(m) => Some(f(i, m.num_experts)),
            FfnKind::Dense { .. } => None,
        })
        .collect()
}

/// f32 (and f16/bf16 fixtures computed in f32): the split differs from the unsplit run only in
/// which code multiplies the resident experts (candle's matmul against the CPU kernels' SIMD dots),
/// so by f32 summation order. Measured max |diff| <= 2e-6 over these fixtures.
const F32_BOUND: f32 = 1e-5;

#[test]
fn split_runs_give_the_unsplit_logits_in_every_family() {
    let mut families = 0;
    for name in FIXTURES {
        let dir = fixture(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let moe_layers: Vec<usize> = cfg
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, FfnKind::Moe(_)))
            .map(|(i, _)| i)
            .collect();
        if moe_layers.is_empty() {
            continue;
        }
        families += 1;
        let ids = expected(&dir).prompt_ids;
        // f32 activations everywhere (published MXFP4 experts default to int8 ones on the CPU
        // kernels, which the resident share's candle ops do not use).
        let load = |opts: &LoadOptions| {
            let mut m = load_dir(&dir, opts).unwrap();
            m.set_cpu_level(Some(moe_kernels::cpu::Level::detect()));
            m
        };
        let want = logits(&load(&LoadOptions::default()), &ids);
        let first = moe_layers[0];
        let cases = [
            // --n-cpu-moe 1: the first MoE layer wholly on the host.
            (
                "first MoE layer on the host",
                masks(&cfg, |i, e| vec![i != first; e]),
            ),
            // Mixed layers: odd experts on the host, even ones resident.
            (
                "odd experts on the host",
                masks(&cfg, |_, e| (0..e).map(|x| x % 2 == 0).collect()),
            ),
            (
                "every routed expert on the host",
                masks(&cfg, |_, e| vec![false; e]),
            ),
            ("none on the host", masks(&cfg, |_, e| vec![true; e])),
            (
                "no entries (all on the device)",
                vec![None; cfg.num_layers()],
            ),
        ];
        for (what, m) in cases {
            let opts = LoadOptions {
                placement: Some(m),
                ..Default::default()
            };
            let model = load(&opts);
            let d = max_abs_diff(&logits(&model, &ids), &want);
            assert!(d <= F32_BOUND, "{name}, {what}: max |diff| {d}");
        }
    }
    assert!(families >= 9, "{families} families");
}

/// The kernel path (a GPU's default; on the CPU the kernels' references): the device's experts
/// go through the moe-kernels ops on the sub-dispatch of their rows, dense and INT4.
#[test]
fn split_runs_on_the_kernel_path_give_the_unsplit_logits() {
    use moe::model::ExecPath;
    for name in [
        "mixtral-base",
        "qwen3-moe",
        "deepseek-v2-greedy",
        "dbrx",
        "qwen2-moe",
    ] {
        let dir = fixture(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let ids = expected(&dir).prompt_ids;
        for quant in [None, Some(QFormat::Int4 { group: 32 })] {
            let base = LoadOptions {
                quant,
                ..Default::default()
            };
            let mut unsplit = load_dir(&dir, &base).unwrap();
            unsplit.set_exec_path(ExecPath::Kernels);
            let want = logits(&unsplit, &ids);
            let opts = LoadOptions {
                placement: Some(masks(&cfg, |i, e| {
                    (0..e).map(|x| (x + i) % 2 == 0).collect()
                })),
                ..base
            };
            let mut split = load_dir(&dir, &opts).unwrap();
            split.set_exec_path(ExecPath::Kernels);
            let d = max_abs_diff(&logits(&split, &ids), &want);
            let bound = if quant.is_some() { 1e-4 } else { F32_BOUND };
            assert!(d <= bound, "{name} {quant:?} kernel path: max |diff| {d}");
        }
    }
}

/// Quantized experts stay packed on both sides (the host copy is the same INT4 bytes). With the
/// CPU kernels on exact f32 activations (`simd`), the split again differs only by summation
/// order; with the default int8 activations the host experts see quantized activations where
/// the resident ones do not, within the q8 budget of the CPU kernels' tests.
#[test]
fn split_runs_keep_quantized_experts_packed() {
    for name in ["mixtral-base", "qwen3-moe", "deepseek-v2-greedy"] {
        let dir = fixture(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let ids = expected(&dir).prompt_ids;
        let quant = Some(QFormat::Int4 { group: 32 });
        let base = LoadOptions {
            quant,
            ..Default::default()
        };
        let mut unsplit = load_dir(&dir, &base).unwrap();
        unsplit.set_cpu_kernels(Some(moe_kernels::cpu::Level::detect()));
        let want = logits(&unsplit, &ids);
        let opts = LoadOptions {
            placement: Some(masks(&cfg, |i, e| {
                (0..e).map(|x| (x + i) % 3 != 0).collect()
            })),
            ..base
        };
        let mut split = load_dir(&dir, &opts).unwrap();
        assert_eq!(
            split.weight_bytes(),
            unsplit.weight_bytes(),
            "{name}: packed bytes"
        );
        split.set_cpu_kernels(Some(moe_kernels::cpu::Level::detect()));
        let d = max_abs_diff(&logits(&split, &ids), &want);
        assert!(d <= 1e-4, "{name} int4: max |diff| {d}");
    }
}

#[test]
fn cli_n_cpu_moe_matches_the_unsplit_logits() {
    for name in ["mixtral-base", "deepseek-v3", "qwen2-moe"] {
        let dir = fixture(name);
        let ids = ids_arg(&expected(&dir).prompt_ids);
        let run = |extra: &[&str]| -> Vec<Vec<f32>> {
            let mut a = vec!["logits", "--weights", dir.to_str().unwrap(), "--ids", &ids];
            a.extend_from_slice(extra);
            let out = moe_run(&a);
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "{a:?}: {err}");
            if !extra.is_empty() {
                assert!(err.contains("routed experts in host memory"), "{err}");
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            serde_json::from_value(v["logits"].clone()).unwrap()
        };
        let want = run(&[]);
        let d = max_abs_diff(&run(&["--n-cpu-moe", "2"]), &want);
        assert!(d <= F32_BOUND, "{name} --n-cpu-moe 2: {d}");
    }
    // More layers than the model has: every MoE layer on the host, still the same logits.
    let dir = fixture("olmoe");
    let ids = ids_arg(&expected(&dir).prompt_ids);
    let base = moe_run(&["logits", "--weights", dir.to_str().unwrap(), "--ids", &ids]);
    let all = moe_run(&[
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--ids",
        &ids,
        "--n-cpu-moe",
        "99",
    ]);
    assert!(all.status.success());
    let l = |o: &std::process::Output| -> Vec<Vec<f32>> {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        serde_json::from_value(v["logits"].clone()).unwrap()
    };
    assert!(max_abs_diff(&l(&all), &l(&base)) <= F32_BOUND);
}

#[test]
fn profile_counts_every_routed_slot_and_drives_the_plan() {
    use moe::analysis::placement::RoutingProfile;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kjv.json");
    let o = moe_run(&["profile", "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("hottest 25% of experts serve"), "{err}");
    let p = RoutingProfile::read(&out).unwrap();
    let cfg = moe::loader::embedded::TINY_KJV.config().unwrap();
    p.check(&cfg).unwrap();
    assert!(p.tokens > 100, "{} tokens", p.tokens);
    for (i, l) in cfg.layers.iter().enumerate() {
        let FfnKind::Moe(m) = l else { continue };
        let sum: u64 = p.layers[i].iter().sum();
        assert_eq!(
            sum,
            p.tokens * m.top_k as u64,
            "layer {i}: every routed slot counted"
        );
    }
    // Written whole, never replaced without --force.
    let before = std::fs::read(&out).unwrap();
    let again = moe_run(&["profile", "--out", out.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // analyze plans from it: on a budget with room for a few experts, the hottest ones go first.
    let a = moe_run(&[
        "analyze",
        "--model",
        "tiny-kjv",
        "--bandwidth",
        "100",
        "--memory",
        "1",
        "--gpu-memory",
        "26MiB",
        "--context",
        "512",
        "--profile",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let plan = &v["placement"]["plan"];
    assert_eq!(plan["policy"], "profile");
    let layers = plan["layers"].as_array().unwrap();
    let on_gpu: usize = layers
        .iter()
        .flat_map(|l| l["on_gpu"].as_array().unwrap())
        .filter(|g| g.as_bool().unwrap())
        .count();
    assert!(
        on_gpu > 0 && on_gpu < 40,
        "{on_gpu} of 40 experts on the GPU"
    );
    // Every expert on the GPU is at least as hot as every one left on the host (shares).
    let share = |i: usize, e: usize| p.shares(i)[e];
    let (mut min_gpu, mut max_cpu) = (f64::MAX, 0f64);
    for l in layers {
        let i = l["layer"].as_u64().unwrap() as usize;
        for (e, g) in l["on_gpu"].as_array().unwrap().iter().enumerate() {
            if g.as_bool().unwrap() {
                min_gpu = min_gpu.min(share(i, e));
            } else {
                max_cpu = max_cpu.max(share(i, e));
            }
        }
    }
    assert!(min_gpu >= max_cpu, "hottest first: {min_gpu} < {max_cpu}");
    assert!(
        v["placement"]["prediction"]["decode_tokens_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // run with the same plan on the CPU: the split run generates the unsplit tokens.
    let gen = |extra: &[&str]| {
        let mut a = vec!["--ids", "1,298,389,390", "--max-new-tokens", "12", "--json"];
        a.extend_from_slice(extra);
        let o = moe_run(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["generated_ids"].clone()
    };
    assert_eq!(
        gen(&["--profile", out.to_str().unwrap(), "--gpu-memory", "26MiB"]),
        gen(&[])
    );
}

/// The device-to-host traffic of a split decode step on the kernel path (a GPU's default): each
/// placed layer reads its dispatch once (counts, offsets and row_token in one copy) and, when a
/// token routes to a host expert, the hidden states of those tokens once; the host experts' output
/// goes back in one counted upload. Nothing else leaves the device (the logits stay there).
#[test]
fn split_decode_step_reads_the_dispatch_once_per_placed_layer() {
    use moe::model::{host, ExecPath};
    for name in ["mixtral-base", "qwen3-moe", "deepseek-v2-greedy"] {
        let dir = fixture(name);
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let prompt = expected(&dir).prompt_ids;
        let placed = cfg
            .layers
            .iter()
            .filter(|l| matches!(l, FfnKind::Moe(_)))
            .count() as u64;
        for (what, m, whole) in [
            // Whole layers on the host: every token reaches a host expert.
            (
                "every routed expert on the host",
                masks(&cfg, |_, e| vec![false; e]),
                true,
            ),
            (
                "odd experts on the host",
                masks(&cfg, |_, e| (0..e).map(|x| x % 2 == 0).collect()),
                false,
            ),
        ] {
            let opts = LoadOptions {
                placement: Some(m),
                ..Default::default()
            };
            let mut model = load_dir(&dir, &opts).unwrap();
            model.set_exec_path(ExecPath::Kernels);
            let mut cache = model.new_cache(1, prompt.len() + 1).unwrap();
            let ids = |v: &[u32]| {
                Tensor::new(v, model.device())
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            };
            model
                .forward(&ids(&prompt), &mut cache, false, None)
                .unwrap();
            let (r, u) = (host::reads(), host::uploads());
            model
                .forward(&ids(&prompt[..1]), &mut cache, false, None)
                .unwrap();
            let (reads, uploads) = (host::reads() - r, host::uploads() - u);
            // One hidden-state read and one upload per layer whose token reached a host expert.
            assert!(uploads <= placed, "{name}, {what}: {uploads} uploads");
            assert_eq!(reads, placed + uploads, "{name}, {what}: {reads} reads");
            if whole {
                assert_eq!(uploads, placed, "{name}, {what}");
            }
        }
    }
}
