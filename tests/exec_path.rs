//! The kernel execution path (what `--device cuda` runs) against the candle path, and the decode
//! loop's device-to-host reads.
//!
//! - No host round trip inside a decode step: on the kernel path, `generate` makes exactly one
//!   device-to-host read per generated token (the sampled id, or the logits when sampling), counted
//!   by `moe::model::host`; expert ids and counts never leave the device. The candle path, which
//!   routes on the host, makes one more read per MoE layer per forward pass, and the test says so.
//! - bf16 and quantized (INT8/INT4) models give the same greedy tokens and close logits on both
//!   paths. (f32 parity with transformers on both paths is in tests/parity.rs.)
//!
//! On the CPU the kernel path runs the kernels' references, so this proves the wiring and the
//! counting; the same code path on CUDA launches the kernels.

mod common;

use candle_core::{DType, Tensor};
use common::{expected, fixture, max_abs_diff};
use moe::config::FfnKind;
use moe::loader::embedded::TINY_KJV;
use moe::loader::{load_dir, LoadOptions};
use moe::model::host;
use moe::model::{ExecPath, Model};
use moe::quant::QFormat;
use moe::runtime::generate::{generate, GenerateParams, SamplingParams};

fn params(n: usize, sampling: SamplingParams) -> GenerateParams {
    GenerateParams {
        max_new_tokens: n,
        sampling,
        eos: vec![],
        cuda_graph: false,
    }
}

fn moe_layers(model: &Model) -> u64 {
    model
        .cfg
        .layers
        .iter()
        .filter(|k| matches!(k, FfnKind::Moe(_)))
        .count() as u64
}

/// Device-to-host reads made by `generate` (greedy and sampled) on `path`, per generated token.
fn reads_of(model: &Model, prompt: &[u32], n: usize, sampling: SamplingParams) -> u64 {
    let before = host::reads();
    let g = generate(model, prompt, &params(n, sampling), |_| Ok(()), None).unwrap();
    assert_eq!(g.generated_ids.len(), n);
    host::reads() - before
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: Some(20),
        top_p: Some(0.9),
        seed: 7,
        ..Default::default()
    }
}

#[test]
fn kernel_path_decode_reads_only_the_sampled_token() {
    let models: Vec<(&str, Model, Vec<u32>)> = vec![
        {
            let mut m = TINY_KJV.load(&LoadOptions::default()).unwrap();
            m.set_exec_path(ExecPath::Kernels);
            ("tiny-kjv", m, vec![5, 77, 300, 12])
        },
        {
            // MLA, dense-first layers, shared experts, the sigmoid + bias group router.
            let dir = fixture("deepseek-v3");
            let mut m = load_dir(&dir, &LoadOptions::default()).unwrap();
            m.set_exec_path(ExecPath::Kernels);
            ("deepseek-v3", m, expected(&dir).prompt_ids)
        },
        {
            // Quantized experts: qmatmul_moe on the device dispatch.
            let opts = LoadOptions {
                quant: Some(QFormat::Int4 { group: 32 }),
                ..Default::default()
            };
            let dir = fixture("qwen3-moe");
            let mut m = load_dir(&dir, &opts).unwrap();
            m.set_exec_path(ExecPath::Kernels);
            ("qwen3-moe int4", m, expected(&dir).prompt_ids)
        },
    ];
    let n = 6;
    for (name, mut model, prompt) in models {
        for (what, s) in [("greedy", SamplingParams::greedy()), ("sampled", sampled())] {
            let reads = reads_of(&model, &prompt, n, s);
            assert_eq!(
                reads, n as u64,
                "{name} {what}: kernel path must read one value per generated token"
            );
        }
        // The candle path routes on the host: one extra read per MoE layer per forward pass
        // (n passes: the prefill plus n - 1 decode steps).
        model.set_exec_path(ExecPath::Candle);
        let reads = reads_of(&model, &prompt, n, SamplingParams::greedy());
        assert_eq!(
            reads,
            n as u64 * (1 + moe_layers(&model)),
            "{name}: candle path reads"
        );
    }
}

#[test]
fn routing_statistics_are_the_only_extra_reads() {
    // With a trace (`--stats`) the kernel path reads each MoE layer's ids and weights back.
    let mut model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    model.set_exec_path(ExecPath::Kernels);
    let mut traces = 0u64;
    let mut on_trace = |_: &moe::model::Trace| traces += 1;
    let before = host::reads();
    let n = 4;
    generate(
        &model,
        &[5, 77, 300],
        &params(n, SamplingParams::greedy()),
        |_| Ok(()),
        Some(&mut on_trace),
    )
    .unwrap();
    let reads = host::reads() - before;
    assert_eq!(traces, n as u64);
    assert_eq!(reads, n as u64 * (1 + 2 * moe_layers(&model)));
}

/// Logits `[T + steps][V]` on `path`: the prompt's rows, then one row per decode step fed `forced` (teacher
/// forcing, so both paths see the same tokens even where a bf16 near-tie would flip a greedy pick).
fn forced_logits(
    model: &mut Model,
    path: ExecPath,
    prompt: &[u32],
    forced: &[u32],
) -> Vec<Vec<f32>> {
    model.set_exec_path(path);
    let mut cache = model.new_cache(1, prompt.len() + forced.len()).unwrap();
    let step = |model: &Model, cache: &mut _, ids: &[u32], prefill: bool| -> Vec<Vec<f32>> {
        let t = Tensor::new(ids, model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        model
            .forward(&t, cache, prefill, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let mut rows = step(model, &mut cache, prompt, true);
    for &id in forced {
        rows.extend(step(model, &mut cache, &[id], false));
    }
    rows
}

/// Prompt logits `[T][V]` and `n` greedy ids on `path`.
fn run(model: &mut Model, path: ExecPath, prompt: &[u32], n: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    model.set_exec_path(path);
    let mut cache = model.new_cache(1, prompt.len()).unwrap();
    let ids = Tensor::new(prompt, model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model
        .forward(&ids, &mut cache, true, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let g = generate(
        model,
        prompt,
        &params(n, SamplingParams::greedy()),
        |_| Ok(()),
        None,
    )
    .unwrap();
    (logits, g.generated_ids)
}

#[test]
fn bf16_and_quantized_models_agree_across_paths() {
    // (what, model, prompt, logit bound). Bounds from measurement with headroom: in bf16 the two
    // paths round intermediate values differently (the fused experts round the SwiGLU product
    // once, the fused QK-norm + RoPE rounds once per element, decode attention keeps
    // probabilities in f32), so logits move by a few bf16 ulps.
    let bf16 = LoadOptions {
        dtype: DType::BF16,
        ..Default::default()
    };
    let kjv_prompt = vec![5u32, 77, 300, 12, 9, 41];
    let mix = fixture("mixtral-base");
    let mix_prompt = expected(&mix).prompt_ids;
    let quant = |fmt| LoadOptions {
        quant: Some(fmt),
        ..Default::default()
    };
    let cases: Vec<(&str, Model, Vec<u32>, f32)> = vec![
        (
            "tiny-kjv bf16",
            TINY_KJV.load(&bf16).unwrap(),
            kjv_prompt.clone(),
            0.15,
        ),
        (
            "mixtral-base bf16",
            load_dir(&mix, &bf16).unwrap(),
            mix_prompt.clone(),
            0.15,
        ),
        (
            "tiny-kjv int4",
            TINY_KJV.load(&quant(QFormat::Int4 { group: 128 })).unwrap(),
            kjv_prompt,
            1e-4,
        ),
        (
            "mixtral-base int8",
            load_dir(&mix, &quant(QFormat::Int8)).unwrap(),
            mix_prompt,
            1e-4,
        ),
    ];
    for (name, mut model, prompt, bound) in cases {
        // The CPU default for quantized weights quantizes activations to int8 (Level::Avx2Q8, its
        // error budget is in kernels/tests/cpu_kernels.rs); this comparison is of the f32-activation
        // kernels, whose results the 1e-4 bound pins.
        model.set_cpu_kernels(Some(moe_kernels::cpu::Level::detect()));
        let (la, ga) = run(&mut model, ExecPath::Candle, &prompt, 8);
        let (lb, gb) = run(&mut model, ExecPath::Kernels, &prompt, 8);
        let diff = max_abs_diff(&la, &lb);
        println!("{name}: max |logit diff| kernels vs candle = {diff:.3e}");
        assert!(
            diff < bound,
            "{name}: logits differ by {diff} (bound {bound})"
        );
        // The decode steps too (the GEMV experts and the decode attention kernel), fed the candle path's
        // greedy tokens on both paths.
        let fa = forced_logits(&mut model, ExecPath::Candle, &prompt, &ga);
        let fb = forced_logits(&mut model, ExecPath::Kernels, &prompt, &ga);
        assert_eq!(fa.len(), prompt.len() + ga.len());
        assert_eq!(
            &fa[..prompt.len()],
            &la[..],
            "{name}: forced prefill differs from the plain one"
        );
        for (i, (ra, rb)) in fa.iter().zip(&fb).enumerate().skip(prompt.len()) {
            let d = max_abs_diff(std::slice::from_ref(ra), std::slice::from_ref(rb));
            assert!(
                d < bound,
                "{name}: decode step {} logits differ by {d} (bound {bound})",
                i - prompt.len()
            );
        }
        println!("{name}: greedy candle {ga:?} kernels {gb:?}");
        if model.dtype() == DType::F32 {
            assert_eq!(ga, gb, "{name}: greedy ids differ between the paths");
        } else {
            // In bf16 a near-tie may flip a token (each path rounds RoPE and the SwiGLU product
            // differently): where the first tokens differ, both must be within the logit bound
            // of the top of the candle path's last prompt row.
            let last = la.last().unwrap();
            let top = last.iter().copied().fold(f32::MIN, f32::max);
            for id in [ga[0], gb[0]] {
                let gap = top - last[id as usize];
                assert!(
                    gap <= bound,
                    "{name}: first token {id} is {gap} below the top"
                );
            }
        }
    }
}

#[test]
fn exec_path_choice() {
    use candle_core::Device;
    use moe::model::PathPlan;
    let exec = |env: Option<&str>| PathPlan::select(&Device::Cpu, env).map(|p| p.exec);
    assert_eq!(exec(None).unwrap(), ExecPath::Candle);
    assert_eq!(exec(Some(" kernels ")).unwrap(), ExecPath::Kernels);
    assert_eq!(exec(Some("candle")).unwrap(), ExecPath::Candle);
    assert_eq!(exec(Some("")).unwrap(), ExecPath::Candle);
    let err = exec(Some("cublas")).unwrap_err().to_string();
    assert!(err.contains("MOE_PATH"), "{err}");
}

#[test]
fn bench_decode_loop_reads_only_the_sampled_ids() {
    // The timed loop of `moe-run bench` on the kernel path: one read for the prefill's ids and
    // one per decode step; the traced replay that counts experts is separate and untimed.
    let mut model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    model.set_exec_path(ExecPath::Kernels);
    let ids = [5u32, 77, 300, 12];
    let gen = 5;
    let before = host::reads();
    let s = moe::bench::measure::run_once(&model, &ids, 1, gen, Default::default()).unwrap();
    assert_eq!(host::reads() - before, 1 + gen as u64);
    assert!(s.experts_touched.is_none());
    let s = moe::bench::measure::run_once(
        &model,
        &ids,
        1,
        gen,
        moe::bench::measure::RunHow {
            count_experts: true,
            graph: false,
        },
    )
    .unwrap();
    assert_eq!(
        s.experts_touched,
        Some(2.0),
        "tiny-kjv routes top-2 at batch 1"
    );
}
