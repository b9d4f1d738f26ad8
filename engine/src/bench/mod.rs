//! `moe-run bench`: measured prefill and decode throughput and memory, each next to the cost
//! model's prediction (`crate::analysis`) for the same configuration and dtype, and the
//! measured/ceiling ratio ("% of roofline"). Also sweeps over experts, top-k and batch on a
//! small random Mixtral-shaped model (`sweep.rs`), and random full-size weights from a config
//! alone (`random.rs`).
//!
//! Roofline used here, per forward of N tokens: time >= max(bytes / bandwidth, FLOPs / peak),
//! with bytes from `analysis::roofline::batch_step_bytes` (non-expert weights once, the
//! expected distinct experts E(1-(1-k/E)^N) per MoE layer, KV read) and FLOPs from
//! `analysis::bytes::{decode,prefill}_flops_per_token`.
//!
//! State:
//! - Never run on a GPU yet. On CUDA (`--device cuda --gpu h100`) every clock read follows a
//!   synchronize, and GPU memory comes from the driver: used-memory growth over load, the
//!   default mempool's used/reserved high-water marks over the timed runs, and the activation
//!   peak derived from them. Peak RSS is host memory.
//! - `--quant int8|int4` draws random weights packed (or quantizes a checkpoint on load).
//!   `--dtype auto` is run's rule (f32 on the CPU, bf16 on a GPU); with f32 the unquantized
//!   tensors and the KV cache are f32 and the predictions use int8/f32, int4/f32.
//! - `--baseline candle` works for Mixtral with --random-weights, the embedded model or
//!   `--weights DIR` (read after our timed runs; other families are refused by model_type). It
//!   runs in f32 only (candle-transformers 0.11's Mixtral fails in bf16/f16); with --quant it
//!   runs the dequantized weights dense in f32 and says so.
//! - CPU bf16 peak RSS of `--model mixtral-8x7b --random-weights --layers 1 --dtype bf16` was
//!   2.10x the weights (candle 0.11's CPU matmul widened all E experts' storage to f32 per expert
//!   call); `model/moe/experts.rs` now widens one expert's slice: 1.16x, the rest being candle
//!   widening the [V, H] lm_head to f32 per forward.
//! - Sweeps use a small Mixtral from flags (--hidden/--ffn/--experts/--top-k/--vocab); scaling
//!   a given model's config down (`--model X --sweep ...`) is not implemented.
//! - Cost-model gap seen by the tests: sigmoid routers' `e_score_correction_bias` (a buffer, 4E
//!   bytes per layer) is not in `weight_bytes`.

mod args;
pub mod baseline;
pub mod measure;
mod predict;
pub mod random;
pub mod report;
mod schema;
pub mod sweep;

pub use args::{Baseline, BenchArgs};
pub use predict::{ceilings, predict, Prediction};
pub use schema::{
    device_description, env, git_commit, BenchPlacement, BenchReport, EagerDecode, Env, GpuMemory,
    MemPair, Memory, ModelDesc, Sourced, Throughput,
};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::analysis::bytes::{kv_bytes_per_sequence, weight_bytes, Precision};
use crate::analysis::counts::tensor_inventory;
use crate::analysis::roofline::expected_experts_touched;
use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};
use crate::loader::{self, LoadOptions, ModelSource};
use crate::model::Model;
use crate::quant::QFormat;
use measure::{RunSample, Stat};

/// The dtype candle's baseline runs in: ours, or f32 on the dequantized weights when ours are
/// quantized (candle-transformers' Mixtral is dense and, in 0.11, f32-only).
pub fn baseline_dtype(dtype: DType, quant: Option<QFormat>) -> DType {
    if quant.is_some() {
        DType::F32
    } else {
        dtype
    }
}

/// `--dtype` by the one rule `run` and `logits` use too ([`loader::parse_dtype_on`]): `auto` is
/// f32 on the CPU and bf16 on a GPU, with or without `--quant` (so `moe-run --quant int4` and
/// `moe-run bench --quant int4` compute alike). An f32 with `--quant` keeps the unquantized
/// tensors in f32 (costed as int8/f32 or int4/f32).
pub fn dtype_of(a: &BenchArgs, device: &Device) -> Result<DType> {
    loader::parse_dtype_on(&a.dtype, device)
}

/// `--weight-dtype` by run's rules ([`loader::parse_weight_dtype`], and without it
/// [`ModelSource::auto_weight_dtype`] for a checkpoint); `None` when it equals the compute dtype.
/// Refused with `--baseline` (candle's Mixtral computes in its weights' dtype), where `auto`
/// keeps the compute dtype.
pub fn weight_dtype_of(a: &BenchArgs, dtype: DType, device: &Device) -> Result<Option<DType>> {
    let quant = quant_of(a)?;
    let w = match a.weight_dtype.as_deref() {
        None if a.random_weights || a.baseline.is_some() => None,
        None => ModelSource::resolve_at(
            a.model.as_deref(),
            a.weights.as_deref(),
            a.revision.as_deref(),
        )?
        .auto_weight_dtype(&a.dtype, device, quant)?,
        w => loader::parse_weight_dtype(w, dtype, device, quant)?,
    };
    if w.is_some() && a.baseline.is_some() {
        return Err(Error::Input(
            "--baseline with --weight-dtype: candle's Mixtral takes one dtype for weights and compute".into(),
        ));
    }
    Ok(w)
}

/// The precision the bench holds the model in: [`Precision::with_weights`] of `--dtype`, the
/// weight dtype ([`weight_dtype_of`], resolved once per run) and `--quant`.
pub fn precision_of(a: &BenchArgs, dtype: DType, wdt: Option<DType>) -> Result<Precision> {
    Ok(Precision::with_weights(dtype, wdt, quant_of(a)?))
}

/// `--quant` parsed (`None` without it).
pub fn quant_of(a: &BenchArgs) -> Result<Option<QFormat>> {
    crate::quant::parse_quant_flag(a.quant.as_deref())
}

/// "2 x MoE(E=8, k=2, F=1024)" or "1 x Dense(F=..) + 26 x MoE(..)".
pub fn layer_kinds(cfg: &ModelConfig) -> String {
    let name = |k: &FfnKind| match k {
        FfnKind::Dense { intermediate } => format!("Dense(F={intermediate})"),
        FfnKind::Moe(m) => format!(
            "MoE(E={}, k={}, F={}{})",
            m.num_experts,
            m.top_k,
            m.expert_ffn,
            m.shared
                .map_or(String::new(), |s| format!(", shared F={}", s.ffn))
        ),
    };
    let mut runs: Vec<(String, usize)> = Vec::new();
    for k in &cfg.layers {
        let n = name(k);
        match runs.last_mut() {
            Some((last, c)) if *last == n => *c += 1,
            _ => runs.push((n, 1)),
        }
    }
    let attn = if cfg.mla.is_some() { "MLA" } else { "GQA" };
    format!(
        "{} ({attn})",
        runs.iter()
            .map(|(n, c)| format!("{c} x {n}"))
            .collect::<Vec<_>>()
            .join(" + ")
    )
}

/// Builds the model the arguments ask for: random weights from a config, or a checkpoint.
/// What [`build_model`] returns: the model, its description, the seconds it took, candle's
/// baseline weights (`--baseline`) and the hybrid placement (`--n-cpu-moe` ...).
pub type Built = (
    Model,
    ModelDesc,
    f64,
    Option<baseline::BaselineWeights>,
    Option<crate::spec::placement::Plan>,
);

/// Builds (random weights) or loads the model the arguments name; see [`Built`].
/// `wdt` is [`weight_dtype_of`].
pub fn build_model(
    a: &BenchArgs,
    dtype: DType,
    wdt: Option<DType>,
    device: &Device,
) -> Result<Built> {
    let t0 = std::time::Instant::now();
    let (name, full_cfg) = resolve_config(a)?;
    if let Some(n) = a.layers {
        let have = full_cfg.num_layers();
        if n == 0 || n > have {
            return Err(Error::Input(format!(
                "--layers {n} is out of range: {name} has {have} decoder layers (give 1 to {have})"
            )));
        }
    }
    if a.prompt_len.saturating_add(a.gen) > full_cfg.max_position_embeddings {
        return Err(Error::Input(format!(
            "--prompt-len {} + --gen {} exceed {name}'s context of {} (max_position_embeddings)",
            a.prompt_len, a.gen, full_cfg.max_position_embeddings
        )));
    }
    let cfg = random::first_layers(&full_cfg, a.layers);
    let quant = quant_of(a)?;
    if a.baseline.is_some() {
        baseline::check(&cfg)?;
        baseline::check_dtype(baseline_dtype(dtype, quant))?;
    }
    // Refuse before allocating (or drawing random weights) when the weights, KV cache and
    // activations do not fit in the GPU's free memory or the available RAM.
    check_memory(a, &cfg, &name, dtype, wdt, a.batch, device)?;
    let plan = loader::placement_for(
        &cfg,
        precision_of(a, dtype, wdt)?,
        device,
        &loader::PlacementArgs {
            n_cpu_moe: a.n_cpu_moe,
            gpu_memory: a.gpu_memory,
            profile: a.profile.as_deref(),
        },
        a.prompt_len.saturating_add(a.gen) as u64,
        a.batch as u64,
    )?;
    if plan.is_some() && a.baseline.is_some() {
        return Err(Error::Input(
            "--baseline with a hybrid placement: candle's Mixtral has no host experts".into(),
        ));
    }
    let placement = plan.as_ref().map(|p| p.per_layer(cfg.num_layers()));
    let mut base = None;
    let (mut model, weights) = if a.random_weights {
        let w = random::random_weights_as(&cfg, a.seed, dtype, wdt, device, quant)?;
        if a.baseline.is_some() {
            base = Some(match quant {
                // Dense weights are shared with candle as views (no copy).
                None => baseline::BaselineWeights::Tensors(baseline::hf_tensors(&cfg, &w)?),
                // Quantized ones would need a dense copy: drawn again when the baseline runs.
                Some(quant) => baseline::BaselineWeights::Random {
                    seed: a.seed,
                    dtype,
                    quant,
                },
            });
        }
        let what = match quant {
            Some(q) => format!(", {} drawn packed", crate::quant::format_name(q)),
            None => String::new(),
        };
        (
            Model::new(cfg.clone(), w, dtype, device)?,
            format!("random weights (seed {}{what})", a.seed),
        )
    } else {
        let opts = LoadOptions {
            dtype,
            weight_dtype: wdt,
            placement: placement.clone(),
            device: device.clone(),
            quant,
            ..Default::default()
        };
        let src = ModelSource::resolve_at(
            a.model.as_deref(),
            a.weights.as_deref(),
            a.revision.as_deref(),
        )?;
        if a.baseline.is_some() {
            base = Some(match &src {
                ModelSource::Embedded(e) => baseline::BaselineWeights::Tensors(
                    baseline::tensors_from_safetensors(e.safetensors, &cfg, dtype, device)?,
                ),
                ModelSource::Dir(dir) => baseline::BaselineWeights::Dir(dir.clone()),
            });
        }
        let model = if a.layers.is_some_and(|n| n < full_cfg.num_layers()) {
            // Tensors of layers >= N are ignored by the loader's check (`model.layers.*`).
            let ck = match &src {
                ModelSource::Dir(dir) => loader::Checkpoint::open_dir(dir)?,
                ModelSource::Embedded(e) => loader::Checkpoint::from_static(e.name, e.safetensors)?,
            };
            loader::load_checkpoint(cfg.clone(), ck, &opts)?
        } else {
            src.load(&opts)?
        };
        let w = match &src {
            ModelSource::Dir(d) => d.display().to_string(),
            ModelSource::Embedded(_) => "embedded in the binary".to_string(),
        };
        (model, w)
    };
    let mut weights = weights;
    if let Some(p) = &plan {
        if a.random_weights {
            model.place_experts(&p.per_layer(cfg.num_layers()))?;
        }
        weights.push_str(&format!(
            "; hybrid placement: {} of {} routed experts in host memory ({}) on the CPU kernels",
            p.experts_on_cpu(),
            p.experts_total(),
            crate::units::human_bytes(p.host_expert_bytes)
        ));
    }
    let counts = crate::analysis::counts::param_counts(&cfg);
    let desc = ModelDesc {
        name,
        weights,
        layers_run: cfg.num_layers(),
        layers_in_config: full_cfg.num_layers(),
        layer_kinds: layer_kinds(&cfg),
        hidden: cfg.hidden_size,
        vocab: cfg.vocab_size,
        total_params: counts.total,
        active_params: counts.active,
    };
    Ok((model, desc, t0.elapsed().as_secs_f64(), base, plan))
}

/// Errors with the out-of-memory message when analyze's weight bytes, the KV cache of `batch`
/// sequences of prompt + gen tokens and an over-estimate of the prefill activations
/// (`batch x prompt` rows of the logits, hidden states and widest FFN, in f32) do not fit `device`.
pub fn check_memory(
    a: &BenchArgs,
    cfg: &ModelConfig,
    name: &str,
    dtype: DType,
    wdt: Option<DType>,
    batch: usize,
    device: &Device,
) -> Result<()> {
    let tokens = a.prompt_len.saturating_add(a.gen) as u64;
    let kv = kv_bytes_per_sequence(cfg, tokens, dtype.size_in_bytes() as u64)
        .saturating_mul(batch as u64);
    let row = crate::spec::placement::activation_row_bytes(cfg);
    let act = row.saturating_mul((batch as u64).saturating_mul(a.prompt_len as u64));
    let weights = weight_bytes(&tensor_inventory(cfg), precision_of(a, dtype, wdt)?);
    crate::memory::check_device_fits(
        device,
        &format!(
            "{name} ({} layers, batch {batch}: weights, KV cache and activations)",
            cfg.num_layers()
        ),
        weights.saturating_add(kv).saturating_add(act),
    )
}

/// The config named by --model / --weights (tiny-kjv when neither is given).
pub fn resolve_config(a: &BenchArgs) -> Result<(String, ModelConfig)> {
    crate::loader::ModelRef::resolve(a.model.as_deref(), a.weights.as_deref(), None)
        .unwrap_or(crate::loader::ModelRef::Embedded(
            &crate::loader::embedded::TINY_KJV,
        ))
        .config_at(a.revision.as_deref())
}

/// Warm-up, then `--runs` timed runs of `batch` sequences as `a` says (prompt length, decode
/// steps, seed), decoding through CUDA graphs when `graph`.
pub fn timed_runs(
    model: &Model,
    a: &BenchArgs,
    batch: usize,
    graph: bool,
) -> Result<Vec<RunSample>> {
    let ids = measure::prompt_ids(model.cfg.vocab_size, batch, a.prompt_len, a.seed);
    let run = |count: bool| {
        let how = measure::RunHow {
            count_experts: count,
            graph,
        };
        measure::run_once(model, &ids, batch, a.gen, how)
    };
    for _ in 0..a.warmup {
        run(false)?;
    }
    // Only the first timed run also counts distinct experts (in an untimed traced replay).
    (0..a.runs.max(1)).map(|i| run(i == 0)).collect()
}

/// The placement of the run, and on a GPU its prediction: the run's GPU (`--gpu`, else its
/// measured bandwidth, peak and memory), the host's streaming read bandwidth measured now, the
/// other host figures at analyze's defaults.
fn bench_placement(
    a: &BenchArgs,
    cfg: &ModelConfig,
    plan: &crate::spec::placement::Plan,
    device: &Device,
    bw: &Sourced,
    peak: &Sourced,
    total_memory: Option<u64>,
) -> Result<BenchPlacement> {
    use crate::analysis::placement::{predict, HostSpec};
    let prediction = if device.is_cpu() {
        None
    } else {
        let gpu = match a.gpu.as_deref().and_then(crate::analysis::find_gpu) {
            Some(g) => g,
            None => crate::analysis::Gpu::custom(
                bw.value,
                total_memory.unwrap_or(0) as f64 / (1u64 << 30) as f64,
                Some(peak.value),
            ),
        };
        let host = HostSpec {
            bandwidth_gb_s: moe_kernels::cpu::read_bandwidth_gb_s(256 << 20),
            ..HostSpec::default()
        };
        let context = a.prompt_len.saturating_add(a.gen / 2) as u64;
        Some(predict(cfg, plan, &gpu, &host, context))
    };
    Ok(BenchPlacement {
        experts_on_host: plan.experts_on_cpu(),
        experts_total: plan.experts_total(),
        host_expert_bytes: plan.host_expert_bytes,
        device_expert_bytes: plan.gpu_expert_bytes,
        prediction,
    })
}

fn check_shape(a: &BenchArgs) -> Result<()> {
    if a.prompt_len == 0 || a.gen == 0 || a.batch == 0 || a.runs == 0 {
        return Err(Error::Input(
            "--prompt-len, --gen, --batch and --runs must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The run's device, and for `--device emu` the emulator's scope on this thread (the CPU, every op
/// through its kernel plan, run by the emulator), which the caller holds while it measures.
pub(crate) fn bench_device(a: &BenchArgs) -> Result<(Device, Option<moe_kernels::emu::Scope>)> {
    if a.device == "emu" {
        return Ok((Device::Cpu, Some(moe_kernels::emu::enable()?)));
    }
    Ok((crate::loader::parse_device(&a.device)?, None))
}

/// Runs the benchmark (no printing).
pub fn bench(a: &BenchArgs) -> Result<BenchReport> {
    check_shape(a)?;
    let (device, emu_scope) = bench_device(a)?;
    let emu = emu_scope.is_some();
    let dtype = dtype_of(a, &device)?;
    use crate::memory::{device_memory, pool_high_water, reset_pool_high_water};
    let used = |m: Option<(u64, u64)>| m.map(|(free, total)| total.saturating_sub(free));
    let used_before = used(device_memory(&device));
    // Resolved once: without --weight-dtype it reads the checkpoint's headers.
    let wdt = weight_dtype_of(a, dtype, &device)?;
    let (mut model, desc, load_s, base, plan) = build_model(a, dtype, wdt, &device)?;
    if emu {
        model.set_exec_path(crate::model::ExecPath::Kernels);
    }
    device.synchronize()?;
    let used_loaded = used(device_memory(&device));
    reset_pool_high_water(&device);
    let cfg = model.cfg.clone();
    // With --cuda-graph the eager steps run first on the same weights, for the side-by-side.
    let eager_samples = match a.cuda_graph {
        true => Some(timed_runs(&model, a, a.batch, false)?),
        false => None,
    };
    let samples = timed_runs(&model, a, a.batch, a.cuda_graph)?;
    // Read the peak RSS (and the GPU pool's high-water marks) before the ceilings' own buffers
    // (read bandwidth, matmul) can raise them.
    let peak_rss = crate::memory::peak_rss_bytes();
    let pool = pool_high_water(&device);
    let total = device_memory(&device).map(|m| m.1);
    let (bw, peak) = ceilings(a, &device, dtype)?;
    let (b, p, g) = (a.batch, a.prompt_len, a.gen);

    let baseline = match &base {
        Some(w) => {
            let med = |f: fn(&RunSample) -> f64| {
                Stat::of(&samples.iter().map(f).collect::<Vec<_>>()).median
            };
            let ours = (med(|s| s.prefill_s), med(|s| s.decode_s));
            let ids = measure::prompt_ids(cfg.vocab_size, b, p, a.seed);
            let bd = baseline_dtype(dtype, quant_of(a)?);
            Some(baseline::run(
                &cfg,
                w,
                bd,
                &device,
                &ids,
                b,
                g,
                a.runs,
                a.warmup,
                ours,
                &samples[0].tokens,
            )?)
        }
        None => None,
    };
    let placement = match &plan {
        Some(plan) => Some(bench_placement(a, &cfg, plan, &device, &bw, &peak, total)?),
        None => None,
    };
    let prec = precision_of(a, dtype, wdt)?;
    let pre = predict(&cfg, prec, b, p, p as u64, bw.value, peak.value);
    let dec = predict(&cfg, prec, b, 0, (p + g / 2) as u64, bw.value, peak.value);
    let prefill_tps: Vec<f64> = samples
        .iter()
        .map(|s| (b * p) as f64 / s.prefill_s)
        .collect();
    let decode_tps = |samples: &[RunSample]| -> Vec<f64> {
        samples
            .iter()
            .map(|s| (b * g) as f64 / s.decode_s)
            .collect()
    };
    let launches_per_token = |samples: &[RunSample]| {
        samples
            .first()
            .filter(|s| s.decode_launches > 0)
            .map(|s| s.decode_launches as f64 / (b * g).max(1) as f64)
    };
    let throughput = |tps: Vec<f64>, pr: &Prediction, tokens: usize| {
        let st = Stat::of(&tps);
        Throughput {
            pct_of_roofline: 100.0 * st.median / pr.ceiling_tokens_per_s,
            tokens_per_s: st,
            tokens_per_forward: tokens,
            predicted_bytes_per_forward: pr.bytes,
            predicted_flops_per_forward: pr.flops,
            ceiling_tokens_per_s: pr.ceiling_tokens_per_s,
            bound: pr.bound.into(),
        }
    };
    let decode = throughput(decode_tps(&samples), &dec, b);
    let eager = eager_samples.map(|e| {
        let t = throughput(decode_tps(&e), &dec, b);
        EagerDecode {
            graph_speedup: decode.tokens_per_s.median / t.tokens_per_s.median,
            decode: t,
            kernel_launches_per_token: launches_per_token(&e),
            tokens_match: e[0].tokens == samples[0].tokens,
        }
    });
    let is_moe = cfg.layers.iter().any(|l| matches!(l, FfnKind::Moe(_)));
    let touched: Vec<f64> = samples.iter().filter_map(|s| s.experts_touched).collect();
    let moe_mean = {
        let (mut sum, mut n) = (0.0, 0);
        for l in &cfg.layers {
            if let FfnKind::Moe(m) = l {
                sum += expected_experts_touched(m.num_experts, m.top_k, b as u64);
                n += 1;
            }
        }
        (n > 0).then(|| sum / n as f64)
    };
    let inv = tensor_inventory(&cfg);
    let w_pred = weight_bytes(&inv, prec);
    let kv_pred =
        kv_bytes_per_sequence(&cfg, (p + g) as u64, dtype.size_in_bytes() as u64) * b as u64;
    let memory = Memory {
        weights: MemPair {
            measured_bytes: model.weight_bytes() as u64,
            predicted_bytes: w_pred,
        },
        kv_cache: MemPair {
            measured_bytes: samples[0].kv_bytes as u64,
            predicted_bytes: kv_pred,
        },
        // Host RSS is the model's memory only on the CPU (on CUDA see `gpu`).
        peak_rss: peak_rss.filter(|_| device.is_cpu()).map(|r| MemPair {
            measured_bytes: r,
            predicted_bytes: w_pred + kv_pred,
        }),
        gpu: match (total, used_before, used_loaded) {
            (Some(total), Some(u0), Some(u1)) => Some(GpuMemory {
                total_bytes: total,
                load: MemPair {
                    measured_bytes: u1.saturating_sub(u0),
                    predicted_bytes: w_pred,
                },
                pool_used_high: pool.map(|(u, _)| MemPair {
                    measured_bytes: u,
                    predicted_bytes: w_pred + kv_pred,
                }),
                pool_reserved_high_bytes: pool.map(|(_, r)| r),
                activation_peak_bytes: pool.map(|(u, _)| {
                    u.saturating_sub(model.weight_bytes() as u64 + samples[0].kv_bytes as u64)
                }),
            }),
            _ => None,
        },
    };
    let expert_stream = match measure::expert_stream(&model)? {
        Some((gb_s, t, bytes)) => {
            // The ceiling's own figure where it was this measurement (the CPU without
            // --bandwidth; expert_stream runs only on the CPU), else measured here.
            let read = match a.bandwidth {
                None => bw.value,
                Some(_) => measure::read_bandwidth_gb_s(),
            };
            Some(schema::ExpertStream {
                bytes_per_call: bytes,
                median_s: t,
                weight_gb_s: gb_s,
                read_bandwidth_gb_s: read,
                pct_of_read_bandwidth: 100.0 * gb_s / read,
            })
        }
        None => None,
    };
    let mut env = env(&device, dtype);
    if let Some(w) = wdt {
        env.dtype = format!("{}, {} weights", env.dtype, schema::dtype_name(w));
    }
    Ok(BenchReport {
        env,
        model: desc,
        prompt_len: p,
        gen: g,
        batch: b,
        runs: samples.len(),
        warmup: a.warmup,
        bandwidth_gb_s: bw,
        peak_tflops: peak,
        prefill: throughput(prefill_tps, &pre, b * p),
        decode,
        experts_touched_measured: (is_moe && !touched.is_empty())
            .then(|| touched.iter().sum::<f64>() / touched.len() as f64),
        experts_touched_predicted: moe_mean,
        kernel_launches_per_token: launches_per_token(&samples),
        decode_kernels: samples
            .first()
            .map(|s| s.decode_entries.clone())
            .filter(|v| !v.is_empty()),
        cuda_graph_replays_per_token: samples
            .first()
            .filter(|_| a.cuda_graph)
            .map(|s| s.graph_replays as f64 / (b * g).max(1) as f64),
        cuda_graph_nodes: samples.first().and_then(|s| s.graph_nodes),
        eager,
        memory,
        load_s,
        baseline,
        expert_stream,
        placement,
    })
}

/// `moe-run bench`: run, then print a table or JSON (and draw a sweep's plot).
pub fn run(a: &BenchArgs) -> Result<()> {
    // Refuse a bad output path before minutes of measuring, not after.
    let inputs = a
        .weights
        .iter()
        .fold(crate::fsio::Inputs::new(), |i, w| i.with(w));
    if let Some(path) = &a.json_out {
        crate::fsio::check_output(path, "--json-out", &inputs, a.force)?;
    }
    if let Some(path) = &a.plot {
        crate::fsio::check_output(path, "--plot", &inputs, a.force)?;
    }
    let text = if let Some(kind) = a.sweep {
        let r = sweep::sweep(a, kind)?;
        if let Some(path) = &a.plot {
            report::plot_sweep(&r, path)?;
            if !a.json {
                eprintln!("wrote {}", path.display());
            }
        }
        if a.json {
            to_json(&r)?
        } else {
            report::sweep_text(&r)
        }
    } else {
        if a.plot.is_some() {
            return Err(Error::Input(
                "--plot needs --sweep experts|topk|batch".into(),
            ));
        }
        let r = bench(a)?;
        if let Some(path) = &a.json_out {
            crate::fsio::write_bytes(path, (to_json(&r)? + "\n").as_bytes())?;
        }
        if a.json {
            to_json(&r)?
        } else {
            report::bench_text(&r)
        }
    };
    crate::fsio::print(&(text + "\n"))
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::io("stdout", std::io::Error::other(e)))
}
