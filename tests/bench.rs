//! `moe-run bench`: report shape, predictions, JSON keys, random weights (deterministic, the
//! configured shapes, loadable by `Model::new` for every family), sweeps. CPU only, tiny runs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use moe::bench::random::{first_layers, random_weights};
use moe::bench::sweep::{small_mixtral, sweep, SweepKind};
use moe::bench::{bench, BenchArgs};
use moe::config::{FfnKind, ModelConfig};
use moe::model::{FfnWeights, Model, Trace, Weight};

fn dense(w: &Weight) -> Tensor {
    match w {
        Weight::Dense(t) => t.clone(),
        Weight::Quant(_) => panic!("random weights are dense"),
    }
}

/// Tiny everything, fixed ceilings (no bandwidth / matmul measurement in tests).
fn tiny_args() -> BenchArgs {
    BenchArgs {
        prompt_len: 4,
        gen: 3,
        runs: 2,
        warmup: 1,
        bandwidth: Some(10.0),
        tflops: Some(0.05),
        ..Default::default()
    }
}

fn tiny_mixtral_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "model_type": "mixtral", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 6, "num_experts_per_tok": 2, "max_position_embeddings": 128
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let p = dir.path().to_path_buf();
    (dir, p)
}

fn check_report(r: &moe::bench::BenchReport) {
    for t in [&r.prefill, &r.decode] {
        let s = &t.tokens_per_s;
        assert!(s.median > 0.0 && s.p10 > 0.0 && s.p90 >= s.p10, "{s:?}");
        assert_eq!(s.samples.len(), r.runs);
        assert!(t.ceiling_tokens_per_s > 0.0 && t.pct_of_roofline > 0.0);
        assert!(t.predicted_bytes_per_forward > 0.0 && t.predicted_flops_per_forward > 0.0);
    }
    let m = &r.memory;
    assert!(m.weights.measured_bytes > 0 && m.weights.predicted_bytes > 0);
    assert!(m.kv_cache.measured_bytes > 0 && m.kv_cache.predicted_bytes > 0);
    // Dense f32 weights and the allocated cache are exactly what the cost model predicts.
    assert_eq!(m.weights.measured_bytes, m.weights.predicted_bytes);
    assert_eq!(m.kv_cache.measured_bytes, m.kv_cache.predicted_bytes);
    assert!(m.peak_rss.as_ref().is_some_and(|p| p.measured_bytes > 0));
    assert!(r.experts_touched_measured.unwrap() > 0.0);
    assert!(r.experts_touched_predicted.unwrap() > 0.0);
    assert_eq!(r.bandwidth_gb_s.source, "--bandwidth");
    // The CPU expert kernel timed alone, against the read bandwidth measured in the same run.
    if let Some(x) = &r.expert_stream {
        assert!(x.bytes_per_call > 0 && x.median_s > 0.0 && x.read_bandwidth_gb_s > 0.0);
        let gb_s = x.bytes_per_call as f64 / x.median_s / 1e9;
        assert!((x.weight_gb_s / gb_s - 1.0).abs() < 1e-9);
        assert!((x.pct_of_read_bandwidth - 100.0 * gb_s / x.read_bandwidth_gb_s).abs() < 1e-6);
    }
    // The ceilings come from the stated bandwidth and peak: tokens per forward over the slower of
    // bytes / bandwidth and FLOPs / peak, and % of roofline is the median over that.
    let (bw, peak) = (r.bandwidth_gb_s.value, r.peak_tflops.value);
    assert_eq!((bw, peak), (10.0, 0.05));
    for t in [&r.prefill, &r.decode] {
        let (t_mem, t_cmp) = (
            t.predicted_bytes_per_forward / (bw * 1e9),
            t.predicted_flops_per_forward / (peak * 1e12),
        );
        let ceiling = t.tokens_per_forward as f64 / t_mem.max(t_cmp);
        assert!(
            (t.ceiling_tokens_per_s / ceiling - 1.0).abs() < 1e-12,
            "{} vs {ceiling}",
            t.ceiling_tokens_per_s
        );
        assert_eq!(t.bound, if t_mem >= t_cmp { "memory" } else { "compute" });
        let pct = 100.0 * t.tokens_per_s.median / ceiling;
        assert!((t.pct_of_roofline / pct - 1.0).abs() < 1e-12);
    }
    let text = moe::bench::report::bench_text(r);
    for needle in [
        "prefill",
        "decode",
        "% of roofline",
        "weights",
        "KV cache",
        "peak RSS",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    let v = serde_json::to_value(r).unwrap();
    for key in [
        "env",
        "model",
        "prompt_len",
        "gen",
        "batch",
        "runs",
        "bandwidth_gb_s",
        "peak_tflops",
        "prefill",
        "decode",
        "memory",
    ] {
        assert!(v.get(key).is_some(), "JSON key {key} missing");
    }
    for key in ["device", "dtype", "commit", "command"] {
        assert!(v["env"].get(key).is_some(), "env.{key} missing");
    }
    for key in ["median", "p10", "p90", "samples"] {
        assert!(v["decode"]["tokens_per_s"].get(key).is_some());
    }
}

#[test]
fn bench_embedded_model() {
    let a = tiny_args();
    let r = bench(&a).unwrap();
    // tiny-kjv is MoE and the CPU runs the CPU kernels: the expert kernel is timed alone, the
    // bytes of a call are top-k = 2 of its 8 experts of one layer, in bf16 (the checkpoint's
    // dtype, which `--dtype auto` keeps on the CPU under f32 compute).
    assert_eq!(r.env.dtype, "f32, bf16 weights");
    let x = r.expert_stream.as_ref().expect("expert kernel timed");
    let (_, cfg0) = moe::bench::resolve_config(&a).unwrap();
    let moe::config::FfnKind::Moe(m) = &cfg0.layers[0] else {
        panic!("tiny-kjv is MoE")
    };
    assert_eq!(
        x.bytes_per_call,
        (2 * 3 * m.expert_ffn * cfg0.hidden_size * 2) as u64
    );
    assert_eq!(r.model.layers_run, r.model.layers_in_config);
    assert!(r.model.weights.contains("embedded"));
    check_report(&r);
    // A batch-1 decode step reads what `analyze` says a token reads at the run's mean context
    // (prompt + half the generated tokens), in the run's precision (bf16 linears, the rest f32).
    let (_, cfg) = moe::bench::resolve_config(&a).unwrap();
    let context = (a.prompt_len + a.gen / 2) as u64;
    let inv = moe::analysis::tensor_inventory(&cfg);
    let p = moe::analysis::roofline::precision_bytes(
        &cfg,
        &inv,
        moe::analysis::Precision::Bf16F32,
        context,
    );
    assert_eq!(r.decode.tokens_per_forward, 1);
    assert_eq!(
        r.decode.predicted_bytes_per_forward,
        p.decode_bytes_per_token as f64
    );
}

#[test]
fn bench_tiny_random_mixtral_with_layers_and_batch() {
    let (_keep, dir) = tiny_mixtral_dir();
    let a = BenchArgs {
        weights: Some(dir),
        random_weights: true,
        layers: Some(2),
        batch: 3,
        ..tiny_args()
    };
    let r = bench(&a).unwrap();
    assert_eq!((r.model.layers_run, r.model.layers_in_config), (2, 3));
    assert_eq!(r.model.layer_kinds, "2 x MoE(E=6, k=2, F=48) (GQA)");
    assert!(r.model.weights.contains("random weights (seed 0)"));
    assert_eq!((r.batch, r.decode.tokens_per_forward), (3, 3));
    check_report(&r);
}

#[test]
fn bench_cli_json() {
    let (_keep, dir) = tiny_mixtral_dir();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(["bench", "--random-weights", "--weights"])
        .arg(&dir)
        .args([
            "--prompt-len",
            "3",
            "--gen",
            "2",
            "--runs",
            "1",
            "--bandwidth",
            "5",
            "--tflops",
            "0.05",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["decode"]["tokens_per_s"]["median"].as_f64().unwrap() > 0.0);
    assert!(v["env"]["command"].as_str().unwrap().contains("bench"));
    assert_eq!(v["model"]["layers_run"], 3);
}

fn fixture_config(name: &str) -> ModelConfig {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join("config.json");
    ModelConfig::from_file(&p).unwrap()
}

#[test]
fn random_weights_are_deterministic_and_shaped() {
    let cfg = small_mixtral(2, 32, 48, 4, 2, 64).unwrap();
    let dev = Device::Cpu;
    let a = random_weights(&cfg, 7, DType::F32, &dev, None).unwrap();
    let b = random_weights(&cfg, 7, DType::F32, &dev, None).unwrap();
    let c = random_weights(&cfg, 8, DType::F32, &dev, None).unwrap();
    let moe = |w: &moe::model::ModelWeights| match &w.layers[1].ffn {
        FfnWeights::Moe(m) => (m.router.clone(), dense(&m.gate_up), dense(&m.down)),
        _ => panic!("MoE layer expected"),
    };
    let (ra, ga, da) = moe(&a);
    let (rb, gb, db) = moe(&b);
    let (_, gc, _) = moe(&c);
    assert_eq!(ga.dims(), &[4, 96, 32]);
    assert_eq!(da.dims(), &[4, 32, 48]);
    assert_eq!(ra.dims(), &[4, 32]);
    assert_eq!(a.embed.dims(), &[64, 32]);
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v(&ga), v(&gb));
    assert_eq!(v(&da), v(&db));
    assert_eq!(v(&ra), v(&rb));
    assert_eq!(v(&a.lm_head), v(&b.lm_head));
    assert_ne!(v(&ga), v(&gc));
    // Scale: N(0, 1/sqrt(fan_in)).
    let g = v(&ga);
    let var = g.iter().map(|x| (x * x) as f64).sum::<f64>() / g.len() as f64;
    assert!(
        (var * 32.0 - 1.0).abs() < 0.1,
        "variance x fan_in = {}",
        var * 32.0
    );
    let dv = v(&da);
    let var = dv.iter().map(|x| (x * x) as f64).sum::<f64>() / dv.len() as f64;
    assert!(
        (var * 48.0 - 1.0).abs() < 0.1,
        "variance x fan_in = {}",
        var * 48.0
    );
    // bf16 is the f32 draw rounded.
    let h = random_weights(&cfg, 7, DType::BF16, &dev, None).unwrap();
    let (_, gh, _) = moe(&h);
    assert_eq!(gh.dtype(), DType::BF16);
    assert_eq!(
        v(&gh.to_dtype(DType::F32).unwrap()),
        v(&ga
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap())
    );
}

/// Every family's config (GQA, MLA, shared experts, biases, QK-norms, dense layers, f32
/// routers, sigmoid routers): random weights load through Model::new and run, routing spreads.
#[test]
fn random_weights_load_for_every_family() {
    for name in [
        "mixtral-base",
        "dbrx",
        "qwen3-moe",
        "olmoe",
        "hunyuan-moe",
        "qwen2-moe",
        "deepseek-v2-group",
        "deepseek-v3",
        "dots1",
    ] {
        let cfg = first_layers(&fixture_config(name), Some(3));
        let w = random_weights(&cfg, 1, DType::F32, &Device::Cpu, None).unwrap();
        let model = Model::new(cfg.clone(), w, DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut cache = model.new_cache(1, 16).unwrap();
        let ids: Vec<u32> = (0..16)
            .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
            .collect();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut tr = Trace::default();
        let logits = model.forward(&x, &mut cache, true, Some(&mut tr)).unwrap();
        let l = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(l.iter().all(|v| v.is_finite()), "{name}: non-finite logits");
        // Sigmoid routers' e_score_correction_bias ([E] f32) is a buffer in transformers, not a
        // parameter, so the cost model (which matches transformers' parameter counts) omits it.
        // (MLA's per-head w_uk/w_uv are views of kv_b: no extra bytes.)
        let extra = cfg
            .layers
            .iter()
            .map(|l| match l {
                FfnKind::Moe(m)
                    if matches!(m.router, moe::config::RouterKind::SigmoidBiasGrouped { .. }) =>
                {
                    4 * m.num_experts as u64
                }
                _ => 0,
            })
            .sum::<u64>();
        let predicted = moe::analysis::bytes::weight_bytes(
            &moe::analysis::counts::tensor_inventory(&cfg),
            moe::analysis::bytes::Precision::Fp32,
        );
        assert_eq!(model.weight_bytes() as u64, predicted + extra, "{name}");
        for (i, kind) in cfg.layers.iter().enumerate() {
            if let FfnKind::Moe(m) = kind {
                let mut ids = tr.router_ids[i].clone();
                ids.sort_unstable();
                ids.dedup();
                // 16 tokens x k choices: non-degenerate routing uses more than k experts.
                assert!(
                    ids.len() > m.top_k.min(m.num_experts - 1),
                    "{name} layer {i}: {ids:?}"
                );
            }
        }
    }
}

#[test]
fn sweep_has_one_row_per_point() {
    let a = BenchArgs {
        hidden: 32,
        ffn: 32,
        vocab: 64,
        experts: 4,
        prompt_len: 3,
        gen: 2,
        runs: 1,
        warmup: 0,
        points: Some(vec![1, 2, 4]),
        ..tiny_args()
    };
    for kind in [SweepKind::Experts, SweepKind::Topk, SweepKind::Batch] {
        let r = sweep(&a, kind).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 3, "{kind:?}");
        for (row, want) in rows.iter().zip([1, 2, 4]) {
            assert_eq!(row["value"], want);
            for key in [
                "step_s",
                "predicted_step_s",
                "pct_of_roofline",
                "experts_touched_predicted",
                "weight_bytes_measured",
                "weight_bytes_predicted",
                "decode_tokens_per_s",
            ] {
                assert!(row.get(key).is_some(), "{key}");
            }
            assert!(row["step_s"].as_f64().unwrap() > 0.0);
            assert_eq!(row["weight_bytes_measured"], row["weight_bytes_predicted"]);
        }
        assert!(moe::bench::report::sweep_text(&r).lines().count() >= 3 + 3);
    }
    // Experts sweep: weight memory grows with E.
    let r = sweep(&a, SweepKind::Experts).unwrap();
    assert!(r.rows[2].weight_bytes_measured > r.rows[0].weight_bytes_measured);
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("s.png");
    moe::bench::report::plot_sweep(&r, &png).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
}

#[test]
fn baseline_candle_on_the_same_random_weights() {
    let (_keep, dir) = tiny_mixtral_dir();
    let a = BenchArgs {
        weights: Some(dir),
        random_weights: true,
        baseline: Some(moe::bench::Baseline::Candle),
        runs: 1,
        warmup: 0,
        ..tiny_args()
    };
    let r = bench(&a).unwrap();
    check_baseline(&r);
    // Another family is refused with a clear message.
    let a = BenchArgs {
        weights: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3-moe")),
        ..a
    };
    let err = bench(&a).expect_err("qwen3 refused").to_string();
    assert!(err.contains("Mixtral"), "{err}");
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn check_baseline(r: &moe::bench::BenchReport) {
    let b = r.baseline.as_ref().expect("baseline report");
    for s in [&b.prefill_tokens_per_s, &b.decode_tokens_per_s] {
        assert!(s.median > 0.0 && s.median.is_finite(), "{s:?}");
    }
    for x in [
        b.prefill_time_ratio_candle_over_ours,
        b.decode_time_ratio_candle_over_ours,
    ] {
        assert!(x > 0.0 && x.is_finite(), "ratio {x}");
    }
    assert!(moe::bench::report::bench_text(r).contains("candle/ours"));
    // Both engines produced the same greedy ids at every step (f32, the same weights): the time
    // ratio compares the same work.
    assert_eq!(b.tokens_compared, r.batch * (r.gen + 1));
    assert_eq!(b.tokens_equal, b.tokens_compared, "greedy ids differ");
    assert!(moe::bench::report::bench_text(r).contains(&format!(
        "greedy tokens equal to ours: {0}/{0}\n",
        b.tokens_compared
    )));
    let v = serde_json::to_value(r).unwrap();
    assert!(
        v["baseline"]["decode_time_ratio_candle_over_ours"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

/// `--weights DIR --baseline candle` on real (fixture) Mixtral checkpoints: f32, and a bf16
/// checkpoint computed in f32 with `--layers 1` (candle's model then reads only layer 0's
/// tensors). candle's Mixtral fails in bf16/f16, so those are refused up front.
#[test]
fn baseline_candle_on_checkpoint_weights() {
    let a = BenchArgs {
        weights: Some(fixture_dir("mixtral-base")),
        baseline: Some(moe::bench::Baseline::Candle),
        runs: 1,
        warmup: 0,
        ..tiny_args()
    };
    let r = bench(&a).unwrap();
    assert_eq!(
        r.model.weights,
        fixture_dir("mixtral-base").display().to_string()
    );
    check_report(&r);
    check_baseline(&r);
    let a = BenchArgs {
        weights: Some(fixture_dir("mixtral-bf16")),
        layers: Some(1),
        ..a
    };
    let r = bench(&a).unwrap();
    assert_eq!(r.model.layers_run, 1);
    check_baseline(&r);
    let bf16 = BenchArgs {
        dtype: "bf16".into(),
        ..a.clone()
    };
    let err = bench(&bf16).expect_err("bf16 refused").to_string();
    assert!(err.contains("--dtype f32"), "{err}");
    // Another family's checkpoint is refused, naming its model_type.
    let a = BenchArgs {
        weights: Some(fixture_dir("qwen3-moe")),
        layers: None,
        ..a
    };
    let err = bench(&a).expect_err("qwen3 refused").to_string();
    assert!(
        err.contains("\"qwen3_moe\"") && err.contains("mixtral"),
        "{err}"
    );
}

/// `--points N` (one number) is a count: N rows, the first N of the kind's series.
#[test]
fn sweep_points_count() {
    let a = BenchArgs {
        hidden: 32,
        ffn: 32,
        vocab: 64,
        experts: 4,
        prompt_len: 2,
        gen: 1,
        runs: 1,
        warmup: 0,
        points: Some(vec![3]),
        ..tiny_args()
    };
    for (kind, want) in [
        (SweepKind::Experts, [2, 4, 8]),
        (SweepKind::Topk, [1, 2, 4]),
        (SweepKind::Batch, [1, 2, 4]),
    ] {
        let r = sweep(&a, kind).unwrap();
        let got: Vec<usize> = r.rows.iter().map(|x| x.value).collect();
        assert_eq!(got, want, "{kind:?}");
    }
    let one = BenchArgs {
        points: Some(vec![1]),
        ..a.clone()
    };
    assert_eq!(sweep(&one, SweepKind::Batch).unwrap().rows.len(), 1);
    for bad in [vec![0], vec![17], vec![]] {
        let b = BenchArgs {
            points: Some(bad.clone()),
            ..a.clone()
        };
        assert!(sweep(&b, SweepKind::Batch).is_err(), "{bad:?}");
    }
    // Through the CLI, as the issue ran it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(["bench", "--sweep", "batch", "--points", "2"])
        .args([
            "--hidden",
            "32",
            "--ffn",
            "32",
            "--vocab",
            "64",
            "--experts",
            "4",
        ])
        .args([
            "--prompt-len",
            "2",
            "--gen",
            "1",
            "--runs",
            "1",
            "--warmup",
            "0",
        ])
        .args(["--bandwidth", "5", "--tflops", "0.05", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let values: Vec<u64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_u64().unwrap())
        .collect();
    assert_eq!(values, [1, 2]);
}

/// `--quant`: random weights drawn directly packed (the tensors the format applies to), at the
/// dense draw's scale; the bench's weight memory then matches analyze's int8/int4 prediction.
#[test]
fn random_weights_drawn_quantized() {
    use moe::quant::QFormat;
    let cfg = small_mixtral(2, 64, 96, 4, 2, 64).unwrap();
    let dev = Device::Cpu;
    for fmt in [QFormat::Int8, QFormat::Int4 { group: 32 }] {
        let w = random_weights(&cfg, 3, DType::F32, &dev, Some(fmt)).unwrap();
        let again = random_weights(&cfg, 3, DType::F32, &dev, Some(fmt)).unwrap();
        let FfnWeights::Moe(m) = &w.layers[0].ffn else {
            panic!("MoE layer expected")
        };
        let FfnWeights::Moe(m2) = &again.layers[0].ffn else {
            panic!("MoE layer expected")
        };
        let (Weight::Quant(gu), Weight::Quant(gu2)) = (&m.gate_up, &m2.gate_up) else {
            panic!("{fmt:?}: experts must be drawn quantized")
        };
        assert_eq!(gu.fmt, fmt);
        assert_eq!(gu.shape, vec![4, 192, 64]);
        let bytes = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(bytes(&gu.qweight), bytes(&gu2.qweight), "deterministic");
        // Dequantized: mean ~0, variance x fan_in ~1 like the dense draw.
        let v: Vec<f32> = gu
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "{fmt:?}: mean {mean}");
        assert!(
            (var * 64.0 - 1.0).abs() < 0.05,
            "{fmt:?}: var x fan_in {}",
            var * 64.0
        );
        // The router and the embedding stay dense.
        assert_eq!(m.router.dtype(), DType::F32);
        assert!(matches!(
            &w.layers[0].attn,
            moe::model::AttnWeights::Gqa {
                qkv: Weight::Quant(_),
                ..
            }
        ));
    }
    // MLA: kv_b_proj stays dense (the analyze rule), the other projections are packed.
    let cfg = first_layers(&fixture_config("deepseek-v3"), Some(2));
    let w = random_weights(&cfg, 1, DType::F32, &dev, Some(QFormat::Int8)).unwrap();
    let moe::model::AttnWeights::Mla(m) = &w.layers[0].attn else {
        panic!("MLA expected")
    };
    assert!(matches!(m.kv_b, Weight::Dense(_)) && matches!(m.kv_a, Weight::Quant(_)));
    let model = Model::new(cfg, w, DType::F32, &dev).unwrap();
    let mut cache = model.new_cache(1, 4).unwrap();
    let x = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let logits = model.forward(&x, &mut cache, false, None).unwrap();
    let l: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(l.iter().all(|v| v.is_finite()));
}

#[test]
fn bench_with_quant_reports_quantized_memory() {
    for q in ["int8", "int4"] {
        let a = BenchArgs {
            random_weights: true,
            quant: Some(q.into()),
            dtype: "bf16".into(),
            ..tiny_args()
        };
        let r = bench(&a).unwrap();
        assert!(r.model.weights.contains(q), "{}", r.model.weights);
        let w = &r.memory.weights;
        let rel = w.measured_bytes as f64 / w.predicted_bytes as f64;
        assert!((rel - 1.0).abs() < 0.02, "{q}: measured/predicted {rel}");
        assert!(r.decode.tokens_per_s.median > 0.0);
        // The baseline runs the dequantized weights in candle's dense Mixtral.
        let b = BenchArgs {
            baseline: Some(moe::bench::Baseline::Candle),
            ..a
        };
        let r = bench(&b).unwrap();
        let base = r.baseline.unwrap();
        assert!(base.decode_time_ratio_candle_over_ours > 0.0);
        assert!(base.name.contains("dense f32"), "{}", base.name);
    }
    // --dtype auto is run's rule, with --quant too: f32 on the CPU (bf16 on a GPU); f32 keeps
    // the unquantized tensors in f32, and the prediction (int8/f32) counts them so.
    let auto = BenchArgs {
        random_weights: true,
        quant: Some("int8".into()),
        ..tiny_args()
    };
    assert_eq!(bench(&auto).unwrap().env.dtype, "f32");
    for q in ["int8", "int4"] {
        let f32q = BenchArgs {
            dtype: "f32".into(),
            quant: Some(q.into()),
            ..auto.clone()
        };
        let r = bench(&f32q).unwrap();
        let w = &r.memory.weights;
        let rel = w.measured_bytes as f64 / w.predicted_bytes as f64;
        assert!(
            (rel - 1.0).abs() < 0.02,
            "{q} with f32: measured/predicted {rel}"
        );
        assert_eq!(
            r.memory.kv_cache.measured_bytes,
            r.memory.kv_cache.predicted_bytes
        );
    }
    let bad = BenchArgs {
        random_weights: true,
        quant: Some("int3".into()),
        dtype: "bf16".into(),
        ..tiny_args()
    };
    assert!(bench(&bad).unwrap_err().to_string().contains("int3"));
}

/// The README's results table is exactly what `benches/results/*.json` give (never hand-typed).
#[test]
fn readme_results_table_is_generated_from_the_results() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let a = moe::cli::results::ResultsArgs {
        dir: root.join("benches/results"),
        readme: root.join("README.md"),
        write: false,
        print: false,
    };
    moe::cli::results::run(&a).unwrap();
    // --print reads no README; a folder that is not there is a clear error.
    let print = |dir: &Path| {
        moe::cli::results::run(&moe::cli::results::ResultsArgs {
            dir: dir.to_path_buf(),
            readme: root.join("no-such-readme.md"),
            write: false,
            print: true,
        })
    };
    print(&a.dir).unwrap();
    let err = print(&root.join("no-such-dir")).unwrap_err().to_string();
    assert!(
        err.contains("--dir") && err.contains("no-such-dir"),
        "{err}"
    );
    // Every result names its device, commit and command.
    for (name, v) in moe::cli::results::load(&a.dir).unwrap() {
        for key in [
            "/env/device",
            "/env/device_name",
            "/env/commit",
            "/env/command",
        ] {
            assert!(v.pointer(key).is_some(), "{name}: no {key}");
        }
    }
}

/// The launch counter (issue: launches per decoded token tracked in CI without a GPU): on the
/// emulated kernel path every decoded token of tiny-kjv costs the same number of moe-kernels
/// launches whatever the generation length, 61 today (12.2 per layer over its 5 layers; the cache
/// write became one kv_store launch per layer in place of two candle copies, which this counter does
/// not see): a change in the kernels' launch plans shows here. The CPU path launches none and
/// reports none.
#[test]
fn kernel_launches_per_decoded_token_on_the_emulator() {
    let per_token = |gen: usize| {
        let a = BenchArgs {
            device: "emu".into(),
            gen,
            runs: 1,
            warmup: 0,
            ..tiny_args()
        };
        bench(&a).unwrap().kernel_launches_per_token
    };
    assert_eq!(per_token(2), Some(61.0));
    assert_eq!(per_token(5), Some(61.0));
    // --cuda-graph on the emulator: the graph decoder with its stand-in backend. Of 32 steps, one
    // warms up (61 launches), one is captured (61 eager + 1 check replay) and 30 replay (1 each):
    // 153 / 32 = 4.78 per token, under one per layer.
    let graph = bench(&BenchArgs {
        device: "emu".into(),
        gen: 32,
        runs: 1,
        warmup: 0,
        cuda_graph: true,
        ..tiny_args()
    })
    .unwrap();
    assert_eq!(graph.kernel_launches_per_token, Some(153.0 / 32.0));
    assert_eq!(graph.cuda_graph_replays_per_token, Some(30.0 / 32.0));
    // Beside it, the eager decode of the same weights and prompts: 61 launches a token, and the
    // same greedy ids as the replays (the report's side-by-side for a GPU session).
    let eager = graph
        .eager
        .as_ref()
        .expect("--cuda-graph times the eager decode too");
    assert_eq!(eager.kernel_launches_per_token, Some(61.0));
    assert!(eager.tokens_match);
    assert!(eager.decode.tokens_per_s.median > 0.0 && eager.graph_speedup > 0.0);
    let text = moe::bench::report::bench_text(&graph);
    assert!(
        text.contains("decode (eager)")
            && text.contains("decode (graph)")
            && text.contains("agree"),
        "{text}"
    );
    let table =
        moe::cli::results::table(&[("g.json".into(), serde_json::to_value(&graph).unwrap())]);
    assert!(
        table.contains(" graph, ") && table.contains(" eager |"),
        "{table}"
    );
    // On the CPU (no kernels, no graphs) the steps run eagerly: zero replays.
    let cpu_graph = bench(&BenchArgs {
        cuda_graph: true,
        ..tiny_args()
    })
    .unwrap();
    assert_eq!(cpu_graph.cuda_graph_replays_per_token, Some(0.0));
    assert!(cpu_graph.eager.as_ref().is_some_and(|e| e.tokens_match));
    // Batch 3: one replay per step for all three sequences. Eager, a step launches E kernels for
    // its 3 tokens; with graphs, one warm-up, one capture (E + 1) and 14 replays in 16 steps.
    let batch = |cuda_graph| {
        bench(&BenchArgs {
            device: "emu".into(),
            gen: 16,
            runs: 1,
            warmup: 0,
            batch: 3,
            cuda_graph,
            ..tiny_args()
        })
        .unwrap()
    };
    let (eager3, graph3) = (batch(false), batch(true));
    assert!(eager3.eager.is_none());
    let per_step = eager3.kernel_launches_per_token.unwrap() * 3.0;
    assert_eq!(
        graph3.kernel_launches_per_token,
        Some((2.0 * per_step + 15.0) / 48.0)
    );
    assert_eq!(graph3.cuda_graph_replays_per_token, Some(14.0 / 48.0));
    // A batch sweep in graph mode: every point decodes through the graph decoder (8 steps: one
    // warm-up, one capture, 6 replays of all B sequences), and the report says so per point.
    let a = BenchArgs {
        device: "emu".into(),
        hidden: 32,
        ffn: 32,
        vocab: 64,
        experts: 4,
        gen: 8,
        runs: 1,
        warmup: 0,
        cuda_graph: true,
        points: Some(vec![1, 3]),
        ..tiny_args()
    };
    let r = moe::bench::sweep::sweep(&a, moe::bench::sweep::SweepKind::Batch).unwrap();
    let got: Vec<_> = r
        .rows
        .iter()
        .map(|x| (x.batch, x.cuda_graph_replays_per_token))
        .collect();
    assert_eq!(got, [(1, Some(6.0 / 8.0)), (3, Some(6.0 / 24.0))]);
    let text = moe::bench::report::sweep_text(&r);
    assert!(
        text.contains("--cuda-graph") && text.contains("replays/tok"),
        "{text}"
    );
    let eager = moe::bench::sweep::sweep(
        &BenchArgs {
            cuda_graph: false,
            ..a
        },
        moe::bench::sweep::SweepKind::Batch,
    )
    .unwrap();
    assert!(eager
        .rows
        .iter()
        .all(|x| x.cuda_graph_replays_per_token.is_none()));
    assert!(!moe::bench::report::sweep_text(&eager).contains("replays/tok"));
    let cpu = bench(&tiny_args()).unwrap();
    assert_eq!(cpu.kernel_launches_per_token, None);
    let v = serde_json::to_value(&cpu).unwrap();
    assert!(v.get("kernel_launches_per_token").is_none());
}

/// The report names the moe-kernels entry points a decode step launched, so a GPU result says
/// which INT4 GEMV it timed: on the emulated kernel path with bf16 activations, tiny-kjv's INT4
/// experts and linears decode through the tensor-core `qmma_*` entries (f32 activations through
/// `qgemv_*`); the CPU path launches none and names none.
#[test]
fn bench_names_the_decode_kernels() {
    let kernels = |dtype: &str, quant: &str| {
        let r = bench(&BenchArgs {
            device: "emu".into(),
            dtype: dtype.into(),
            quant: Some(quant.into()),
            gen: 2,
            runs: 1,
            warmup: 0,
            ..tiny_args()
        })
        .unwrap();
        let text = moe::bench::report::bench_text(&r);
        assert!(text.contains("decode kernels: "), "{text}");
        r.decode_kernels.expect("the emulated kernel path launches")
    };
    for quant in ["int4", "int8"] {
        let bf16 = kernels("bf16", quant);
        for entry in [
            format!("qmma_moe_swiglu_{quant}_bf16"),
            format!("qmma_moe_{quant}_bf16"),
            format!("qmma_dense_{quant}_bf16"),
        ] {
            assert!(bf16.contains(&entry), "{entry} not in {bf16:?}");
        }
        assert!(!bf16.iter().any(|k| k.starts_with("qgemv_")), "{bf16:?}");
    }
    let f32 = kernels("f32", "int4");
    assert!(
        f32.iter().any(|k| k == "qgemv_moe_swiglu_int4_f32")
            && !f32.iter().any(|k| k.starts_with("qmma_")),
        "{f32:?}"
    );
    let cpu = bench(&tiny_args()).unwrap();
    assert!(cpu.decode_kernels.is_none());
}
