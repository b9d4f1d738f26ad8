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

pub mod baseline;
pub mod measure;
pub mod random;
pub mod report;
pub mod results;
pub mod sweep;

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::analysis::bytes::{
    decode_flops_per_token, kv_bytes_per_sequence, prefill_flops_per_token, weight_bytes, Precision,
};
use crate::analysis::counts::{counts_of, tensor_inventory};
use crate::analysis::roofline::{batch_step_bytes, expected_experts_touched};
use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};
use crate::loader::{self, LoadOptions, ModelSource};
use crate::model::Model;
use crate::quant::QFormat;
use measure::{RunSample, Stat};

/// `moe-run bench` options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// `tiny-kjv` (embedded, the default), a known model name (configs/) or a HF repo id in the
    /// local cache. With --random-weights only its config is used.
    #[arg(long, conflicts_with = "weights")]
    pub model: Option<String>,
    /// A checkpoint directory (config.json + safetensors).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Build full-size random weights from the config alone (seeded; no download, no disk).
    #[arg(long)]
    pub random_weights: bool,
    /// Seed of --random-weights and of the prompt ids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep only the first N decoder layers (1 to the model's layer count).
    #[arg(long, value_parser = crate::units::at_least_one)]
    pub layers: Option<usize>,
    /// Compute dtype: auto (f32 on the CPU, bf16 on a GPU, as for run), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Weight-only quantization: int8, int4 (group 128), int4:64, int4:32. Random weights are
    /// drawn directly in the packed format; a dense checkpoint is quantized while loading.
    #[arg(long)]
    pub quant: Option<String>,
    /// cpu, or cuda[:N] in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    /// Decode steps per run.
    #[arg(long, default_value_t = 32)]
    pub gen: usize,
    /// Sequences per forward.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed runs (median, p10, p90 over them), at least 1.
    #[arg(long, default_value_t = 5, value_parser = crate::units::at_least_one)]
    pub runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Memory bandwidth for the ceiling, GB/s (default: the --gpu table entry on CUDA, else
    /// measured: a 1 GiB device-to-device copy on CUDA, a memcpy on the CPU).
    #[arg(long, value_parser = crate::units::positive)]
    pub bandwidth: Option<f64>,
    /// A built-in GPU for the CUDA ceiling (see `analyze --gpu`).
    #[arg(long)]
    pub gpu: Option<String>,
    /// Matmul peak for the compute ceiling, TFLOPS (default: the GPU table, else measured with
    /// a 1024^3 matmul in the bench dtype).
    #[arg(long, value_parser = crate::units::positive)]
    pub tflops: Option<f64>,
    /// One JSON object with every number and the environment.
    #[arg(long)]
    pub json: bool,
    /// Also write that JSON object to this file (the table still goes to stdout): how a run
    /// is recorded in benches/results/.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// With --sweep: draw measured vs predicted to FILE.png or FILE.svg.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Replace an existing --json-out or --plot file.
    #[arg(long)]
    pub force: bool,
    /// Sweep one parameter on a small random Mixtral-shaped model.
    #[arg(long, value_enum)]
    pub sweep: Option<sweep::SweepKind>,
    /// Sweep points: one number N = the first N of the default series (experts 2,4,8,16,32..;
    /// topk 1,2,4,8..; batch 1,2,4,8,16,32..), two or more = exactly those values (default:
    /// the series shown).
    #[arg(long, value_delimiter = ',')]
    pub points: Option<Vec<usize>>,
    /// Sweep model: hidden size.
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// Sweep model: expert width F.
    #[arg(long, default_value_t = 1024)]
    pub ffn: usize,
    /// Sweep model: experts per layer (fixed unless sweeping experts).
    #[arg(long, default_value_t = 8)]
    pub experts: usize,
    /// Sweep model: experts per token (fixed unless sweeping topk).
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Sweep model: vocabulary size.
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    /// Also time another implementation on the same weights and shapes (Mixtral only: with
    /// --random-weights, the embedded model or --weights DIR).
    #[arg(long, value_enum)]
    pub baseline: Option<Baseline>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// candle-transformers' own Mixtral.
    Candle,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            model: None,
            weights: None,
            random_weights: false,
            seed: 0,
            layers: None,
            dtype: "auto".into(),
            quant: None,
            device: "cpu".into(),
            prompt_len: 32,
            gen: 32,
            batch: 1,
            runs: 5,
            warmup: 1,
            bandwidth: None,
            gpu: None,
            tflops: None,
            json: false,
            json_out: None,
            plot: None,
            force: false,
            sweep: None,
            points: None,
            hidden: 512,
            ffn: 1024,
            experts: 8,
            top_k: 2,
            vocab: 1024,
            baseline: None,
        }
    }
}

/// Where the run happened and how it was asked for.
#[derive(Debug, Clone, Serialize)]
pub struct Env {
    pub device: String,
    /// The GPU's name and compute capability (CUDA), or the CPU model (`/proc/cpuinfo`).
    pub device_name: String,
    /// The CUDA driver version (`cuDriverGetVersion`), or "-" on the CPU.
    pub driver: String,
    pub dtype: String,
    /// `git rev-parse HEAD` (+ "-dirty" with uncommitted changes), or "unknown".
    pub commit: String,
    pub command: String,
    pub cpu_threads: usize,
}

/// A ceiling input and where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct Sourced {
    pub value: f64,
    pub source: String,
}

/// What exactly ran.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDesc {
    pub name: String,
    /// "random weights (seed S)", "embedded", or the checkpoint directory.
    pub weights: String,
    pub layers_run: usize,
    pub layers_in_config: usize,
    /// e.g. "2 x MoE(E=8, k=2, F=1024)".
    pub layer_kinds: String,
    pub hidden: usize,
    pub vocab: usize,
    pub total_params: u64,
    pub active_params: u64,
}

/// One throughput figure: measured, its roofline ceiling and the ratio.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Tokens per second over the runs.
    pub tokens_per_s: Stat,
    /// Tokens per forward (B*P for prefill, B for a decode step).
    pub tokens_per_forward: usize,
    /// Predicted bytes read per forward.
    pub predicted_bytes_per_forward: f64,
    pub predicted_flops_per_forward: f64,
    /// min(bandwidth / bytes, peak / FLOPs) x tokens per forward.
    pub ceiling_tokens_per_s: f64,
    /// "memory" or "compute": which term sets the ceiling.
    pub bound: String,
    /// Median measured / ceiling, in percent.
    pub pct_of_roofline: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemPair {
    pub measured_bytes: u64,
    pub predicted_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Sum of the loaded tensors' bytes vs `analysis::bytes::weight_bytes`.
    pub weights: MemPair,
    /// Allocated KV cache (B sequences of P+G) vs `kv_bytes_per_sequence` x B.
    pub kv_cache: MemPair,
    /// Process peak RSS vs weights + KV predicted (activations not modelled); CPU runs only.
    pub peak_rss: Option<MemPair>,
    /// CUDA runs: what the driver reports.
    pub gpu: Option<GpuMemory>,
}

/// GPU memory as the CUDA driver reports it (`cuMemGetInfo`, and the high-water marks of the
/// default memory pool that candle's stream-ordered allocations come from).
#[derive(Debug, Clone, Serialize)]
pub struct GpuMemory {
    pub total_bytes: u64,
    /// Growth of the device's used memory (total - free) over loading vs the predicted weights.
    pub load: MemPair,
    /// The pool's used high-water mark over the timed runs vs predicted weights + KV
    /// (activations are not modelled); `None` without a stream-ordered allocator.
    pub pool_used_high: Option<MemPair>,
    /// The pool's reserved high-water mark over the timed runs.
    pub pool_reserved_high_bytes: Option<u64>,
    /// Used high-water minus the measured weights and KV cache: the activations' peak.
    pub activation_peak_bytes: Option<u64>,
}

/// `moe-run bench` without --sweep.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub env: Env,
    pub model: ModelDesc,
    pub prompt_len: usize,
    pub gen: usize,
    pub batch: usize,
    pub runs: usize,
    pub warmup: usize,
    pub bandwidth_gb_s: Sourced,
    pub peak_tflops: Sourced,
    pub prefill: Throughput,
    pub decode: Throughput,
    /// Distinct experts per MoE layer per decode step: measured (router trace) and
    /// E(1-(1-k/E)^B); absent for dense models.
    pub experts_touched_measured: Option<f64>,
    pub experts_touched_predicted: Option<f64>,
    pub memory: Memory,
    /// Seconds to build or load the weights.
    pub load_s: f64,
    /// `--baseline candle`: the same weights through candle-transformers' Mixtral.
    pub baseline: Option<baseline::BaselineReport>,
}

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

/// `--quant` parsed (`None` without it).
pub fn quant_of(a: &BenchArgs) -> Result<Option<QFormat>> {
    match &a.quant {
        Some(q) => crate::quant::parse_quant(q),
        None => Ok(None),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// `git rev-parse HEAD` of the current directory's repository, or "unknown".
pub fn git_commit() -> String {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let mut c = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let dirty = std::process::Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no"])
                .output()
                .is_ok_and(|s| s.status.success() && !s.stdout.is_empty());
            if dirty {
                c.push_str("-dirty");
            }
            c
        }
        _ => "unknown".into(),
    }
}

/// The device's name and driver version for the report (see [`Env`]).
pub fn device_description(device: &Device) -> (String, String) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let stream = d.cuda_stream();
        let ctx = stream.context();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx
            .compute_capability()
            .map_or(String::new(), |(a, b)| format!(" (sm_{a}{b})"));
        let mut v: std::ffi::c_int = 0;
        // SAFETY: writes one int.
        let driver = match unsafe { sys::cuDriverGetVersion(&mut v) }.result() {
            Ok(()) => format!("CUDA driver {}.{}", v / 1000, (v % 1000) / 10),
            Err(e) => format!("unknown ({e})"),
        };
        return (format!("{name}{cc}"), driver);
    }
    let _ = device;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    (cpu, "-".into())
}

pub fn env(device: &Device, dtype: DType) -> Env {
    let (device_name, driver) = device_description(device);
    Env {
        device_name,
        driver,
        device: match device {
            Device::Cpu => "cpu".into(),
            d => format!("{:?}", d.location()),
        },
        dtype: dtype_name(dtype).into(),
        commit: git_commit(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
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

/// The ceilings' inputs: bandwidth (GB/s) and matmul peak (TFLOPS), with their sources.
pub fn ceilings(a: &BenchArgs, device: &Device, dtype: DType) -> Result<(Sourced, Sourced)> {
    let gpu = match &a.gpu {
        Some(name) => Some(crate::analysis::gpus::find_gpu(name).ok_or_else(|| {
            Error::Input(format!(
                "unknown GPU {name:?}; built in: {}",
                crate::analysis::gpus::gpu_names().join(", ")
            ))
        })?),
        None => None,
    };
    let is_cuda = !matches!(device, Device::Cpu);
    let bw = match (a.bandwidth, &gpu) {
        (Some(b), _) if b > 0.0 => Sourced {
            value: b,
            source: "--bandwidth".into(),
        },
        (Some(_), _) => return Err(Error::Input("--bandwidth must be positive".into())),
        (None, Some(g)) if is_cuda => Sourced {
            value: g.bandwidth_gb_s,
            source: format!("GPU table: {}", g.name),
        },
        _ if is_cuda => Sourced {
            value: measure::device_copy_bandwidth_gb_s(device)?,
            source: "measured: 1 GiB device-to-device copy, read + write bytes".into(),
        },
        _ => Sourced {
            value: measure::memcpy_bandwidth_gb_s(),
            source: "measured: 128 MiB memcpy on the CPU, read + write bytes".into(),
        },
    };
    let peak_table = gpu.as_ref().filter(|_| is_cuda).and_then(|g| match dtype {
        DType::F32 => g.tf32_tflops,
        _ => g.bf16_tflops,
    });
    let peak = match (a.tflops, peak_table) {
        (Some(t), _) => Sourced {
            value: t,
            source: "--tflops".into(),
        },
        (None, Some(t)) => Sourced {
            value: t,
            source: "GPU table".into(),
        },
        (None, None) => {
            // A GPU needs a larger product than the CPU to approach its peak.
            let n = if is_cuda { 8192 } else { 1024 };
            Sourced {
                value: measure::matmul_peak_tflops(device, dtype, n)?,
                source: format!("measured: {n}^3 matmul in {}", dtype_name(dtype)),
            }
        }
    };
    Ok((bw, peak))
}

/// Predicted bytes, FLOPs and ceiling for one forward of `tokens` new tokens (each sequence
/// attending to `context` keys on average).
#[derive(Debug, Clone)]
pub struct Prediction {
    pub bytes: f64,
    pub flops: f64,
    pub experts_touched: f64,
    pub ceiling_tokens_per_s: f64,
    pub bound: &'static str,
}

/// `tokens` tokens in one forward of `batch` sequences; `prefill_len` > 0 for a prefill of
/// that many tokens per sequence, else a decode step at `context`.
pub fn predict(
    cfg: &ModelConfig,
    p: Precision,
    batch: usize,
    prefill_len: usize,
    context: u64,
    bw_gb_s: f64,
    peak_tflops: f64,
) -> Prediction {
    let inv = tensor_inventory(cfg);
    let counts = counts_of(&inv, cfg.tie_word_embeddings);
    let tokens = if prefill_len > 0 {
        batch * prefill_len
    } else {
        batch
    };
    // Bytes: the weights once for all tokens of the forward, experts as expected distinct.
    let (mut bytes, touched) = batch_step_bytes(cfg, &inv, p, context, tokens as u64);
    let flops = if prefill_len > 0 {
        // KV read in a prefill is the keys just written; replace the decode KV term.
        let kv = crate::analysis::bytes::kv_read_bytes(cfg, context, p.kv_elem_bytes()) as f64;
        bytes -= tokens as f64 * kv;
        bytes += batch as f64 * kv;
        prefill_flops_per_token(cfg, counts.matmul_active, prefill_len as u64) * tokens as f64
    } else {
        decode_flops_per_token(cfg, counts.matmul_active, context) as f64 * tokens as f64
    };
    let t_mem = bytes / (bw_gb_s * 1e9);
    let t_cmp = flops / (peak_tflops * 1e12);
    Prediction {
        bytes,
        flops,
        experts_touched: touched,
        ceiling_tokens_per_s: tokens as f64 / t_mem.max(t_cmp),
        bound: if t_mem >= t_cmp { "memory" } else { "compute" },
    }
}

/// Builds the model the arguments ask for: random weights from a config, or a checkpoint.
/// Returns the model, its description and the seconds it took.
pub fn build_model(
    a: &BenchArgs,
    dtype: DType,
    device: &Device,
) -> Result<(Model, ModelDesc, f64, Option<baseline::BaselineWeights>)> {
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
    check_memory(a, &cfg, &name, dtype, quant, a.batch, device)?;
    let mut base = None;
    let (model, weights) = if a.random_weights {
        let w = random::random_weights(&cfg, a.seed, dtype, device, quant)?;
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
            device: device.clone(),
            quant,
            ..Default::default()
        };
        let src = ModelSource::resolve(a.model.as_deref(), a.weights.as_deref())?;
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
    Ok((model, desc, t0.elapsed().as_secs_f64(), base))
}

/// Errors with the out-of-memory message when analyze's weight bytes, the KV cache of `batch`
/// sequences of prompt + gen tokens and an over-estimate of the prefill activations
/// (`batch x prompt` rows of the logits, hidden states and widest FFN, in f32) do not fit `device`.
pub fn check_memory(
    a: &BenchArgs,
    cfg: &ModelConfig,
    name: &str,
    dtype: DType,
    quant: Option<QFormat>,
    batch: usize,
    device: &Device,
) -> Result<()> {
    let tokens = a.prompt_len.saturating_add(a.gen) as u64;
    let kv = kv_bytes_per_sequence(cfg, tokens, dtype.size_in_bytes() as u64)
        .saturating_mul(batch as u64);
    let widest = cfg
        .layers
        .iter()
        .map(|l| match l {
            FfnKind::Dense { intermediate } => *intermediate,
            FfnKind::Moe(m) => m.expert_ffn * m.top_k + m.shared.map_or(0, |s| s.ffn),
        })
        .max()
        .unwrap_or(0);
    let row = (cfg.vocab_size + 8 * cfg.hidden_size + 3 * widest) as u64 * 4;
    let act = row.saturating_mul((batch as u64).saturating_mul(a.prompt_len as u64));
    let weights = weight_bytes(&tensor_inventory(cfg), Precision::of(dtype, quant));
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
        .config()
}

/// Warm-up, then `runs` timed runs.
pub fn timed_runs(
    model: &Model,
    batch: usize,
    prompt_len: usize,
    gen: usize,
    runs: usize,
    warmup: usize,
    seed: u64,
) -> Result<Vec<RunSample>> {
    let ids = measure::prompt_ids(model.cfg.vocab_size, batch, prompt_len, seed);
    for _ in 0..warmup {
        measure::run_once(model, &ids, batch, gen, false)?;
    }
    // Only the first timed run also counts distinct experts (in an untimed traced replay).
    (0..runs.max(1))
        .map(|i| measure::run_once(model, &ids, batch, gen, i == 0))
        .collect()
}

fn check_shape(a: &BenchArgs) -> Result<()> {
    if a.prompt_len == 0 || a.gen == 0 || a.batch == 0 || a.runs == 0 {
        return Err(Error::Input(
            "--prompt-len, --gen, --batch and --runs must be at least 1".into(),
        ));
    }
    Ok(())
}

/// Runs the benchmark (no printing).
pub fn bench(a: &BenchArgs) -> Result<BenchReport> {
    check_shape(a)?;
    let device = crate::loader::parse_device(&a.device)?;
    let dtype = dtype_of(a, &device)?;
    use crate::memory::{device_memory, pool_high_water, reset_pool_high_water};
    let used = |m: Option<(u64, u64)>| m.map(|(free, total)| total.saturating_sub(free));
    let used_before = used(device_memory(&device));
    let (model, desc, load_s, base) = build_model(a, dtype, &device)?;
    device.synchronize()?;
    let used_loaded = used(device_memory(&device));
    reset_pool_high_water(&device);
    let cfg = model.cfg.clone();
    let samples = timed_runs(
        &model,
        a.batch,
        a.prompt_len,
        a.gen,
        a.runs,
        a.warmup,
        a.seed,
    )?;
    // Read the peak RSS (and the GPU pool's high-water marks) before the ceilings' own buffers
    // (memcpy, matmul) can raise them.
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
                &cfg, w, bd, &device, &ids, b, g, a.runs, a.warmup, ours,
            )?)
        }
        None => None,
    };
    let prec = Precision::of(dtype, quant_of(a)?);
    let pre = predict(&cfg, prec, b, p, p as u64, bw.value, peak.value);
    let dec = predict(&cfg, prec, b, 0, (p + g / 2) as u64, bw.value, peak.value);
    let prefill_tps: Vec<f64> = samples
        .iter()
        .map(|s| (b * p) as f64 / s.prefill_s)
        .collect();
    let decode_tps: Vec<f64> = samples
        .iter()
        .map(|s| (b * g) as f64 / s.decode_s)
        .collect();
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
    Ok(BenchReport {
        env: env(&device, dtype),
        model: desc,
        prompt_len: p,
        gen: g,
        batch: b,
        runs: samples.len(),
        warmup: a.warmup,
        bandwidth_gb_s: bw,
        peak_tflops: peak,
        prefill: throughput(prefill_tps, &pre, b * p),
        decode: throughput(decode_tps, &dec, b),
        experts_touched_measured: (is_moe && !touched.is_empty())
            .then(|| touched.iter().sum::<f64>() / touched.len() as f64),
        experts_touched_predicted: moe_mean,
        memory,
        load_s,
        baseline,
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
