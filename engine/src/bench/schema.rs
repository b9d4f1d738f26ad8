//! The report of one `moe-run bench` run (what `--json` prints and `benches/results/` holds),
//! and the environment it records: device, driver, commit, command.

use candle_core::{DType, Device};
use serde::Serialize;

use super::measure::Stat;

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
    /// Threads of the compute pool (`--threads`, else `RAYON_NUM_THREADS`, else the physical cores).
    pub cpu_threads: usize,
    /// The CPU kernels' instruction set ("avx2+fma", "portable"), or "reference" when the plain
    /// references run instead (`MOE_PATH=reference`); "-" on a GPU.
    pub cpu_kernels: String,
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

/// `--cuda-graph`'s eager decode of the same weights and prompts, beside the graph run's.
#[derive(Debug, Clone, Serialize)]
pub struct EagerDecode {
    pub decode: Throughput,
    /// moe-kernels launches per decoded token of the eager run (absent on the CPU references).
    pub kernel_launches_per_token: Option<f64>,
    /// The graph run's median decode tokens/s over the eager run's.
    pub graph_speedup: f64,
    /// Whether the first timed runs of the two produced the same greedy ids (prefill's and every
    /// decode step's): a replayed graph must compute what the eager steps do.
    pub tokens_match: bool,
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
    /// moe-kernels launches per decoded token (on CUDA or `--device emu`; absent where the ops
    /// ran their CPU references). candle's own ops in the step are not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_launches_per_token: Option<f64>,
    /// The moe-kernels entry points a decode step launches, sorted (which INT4/INT8 GEMV ran:
    /// `qmma_*`, `qgemv_*` or `qmatmul_*`), from the untimed traced replay of the first timed run;
    /// absent where the ops ran their CPU references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_kernels: Option<Vec<String>>,
    /// `--cuda-graph`: CUDA graph replays per decoded token (each counted as one launch above; the
    /// steps that warm up and capture a graph launch eagerly). 0 when graphs were off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graph_replays_per_token: Option<f64>,
    /// `--cuda-graph` on CUDA: the nodes of a captured decode step, i.e. every launch and copy of
    /// one eager step (candle's and cuBLAS's too, which `kernel_launches_per_token` does not see).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graph_nodes: Option<crate::runtime::graph::NodeCensus>,
    /// `--cuda-graph`: the same weights and prompts decoded eagerly first (same warm-up and runs),
    /// so a report holds eager and graph decode side by side (`decode` is the graph run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eager: Option<EagerDecode>,
    pub memory: Memory,
    /// Seconds to build or load the weights.
    pub load_s: f64,
    /// `--baseline candle`: the same weights through candle-transformers' Mixtral.
    pub baseline: Option<super::baseline::BaselineReport>,
    /// The CPU expert kernel alone at a decode step, against the read bandwidth measured in the
    /// same run on the same threads; absent off the CPU kernels or without MoE layers.
    pub expert_stream: Option<ExpertStream>,
    /// `--n-cpu-moe` / `--gpu-memory` / `--profile`: the hybrid placement the run used.
    pub placement: Option<BenchPlacement>,
}

/// The hybrid placement of a bench run, and on a GPU the speed `analyze` predicts for it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchPlacement {
    pub experts_on_host: usize,
    pub experts_total: usize,
    pub host_expert_bytes: u64,
    pub device_expert_bytes: u64,
    /// On a GPU: the prediction from the run's GPU bandwidth and peak and the host's read
    /// bandwidth measured now; `None` on the CPU (both sides are the CPU there).
    pub prediction: Option<crate::analysis::placement::PlanPrediction>,
}

/// Weight bytes the CPU expert kernel streams per second at a decode step (one token, top-k experts of
/// the first MoE layer) next to the machine's read bandwidth.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertStream {
    /// Weight bytes of the k experts one decode step reads (gate, up, down with their params).
    pub bytes_per_call: u64,
    /// Median seconds per call.
    pub median_s: f64,
    pub weight_gb_s: f64,
    /// A parallel streaming read of 256 MiB on the same pool (bytes read only).
    pub read_bandwidth_gb_s: f64,
    pub pct_of_read_bandwidth: f64,
}

pub(crate) fn dtype_name(d: DType) -> &'static str {
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
        cpu_threads: rayon::current_num_threads(),
        cpu_kernels: match crate::model::PathPlan::from_env(device) {
            Ok(p) if device.is_cpu() => p.cpu.map_or("reference", |l| l.name()).into(),
            _ => "-".into(),
        },
    }
}
