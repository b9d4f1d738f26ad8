//! `moe-run bench`'s options.

use std::path::PathBuf;

use serde::Serialize;

use super::sweep;

/// `moe-run bench` options.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// `tiny-kjv` (embedded, the default), a known model name (configs/), a HF repo id (the
    /// local cache, else downloaded) or a local folder. With --random-weights only its config is
    /// used.
    #[arg(long, conflicts_with = "weights")]
    pub model: Option<String>,
    /// The Hub revision of --model: a branch, tag or commit (default main).
    #[arg(long, requires = "model", value_parser = crate::loader::hub::parse_revision)]
    pub revision: Option<String>,
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
    /// Dtype of the linear and expert weights when it differs from the compute dtype (as for
    /// run): `--dtype f32 --weight-dtype bf16` keeps them 16-bit, read in place by the CPU kernels.
    #[arg(long)]
    pub weight_dtype: Option<String>,
    /// Weight-only quantization: int8, int4 (group 128), int4:64, int4:32. Random weights are
    /// drawn directly in the packed format; a dense checkpoint is quantized while loading.
    #[arg(long)]
    pub quant: Option<String>,
    /// cpu, cuda[:N] in a build with the `cuda` feature, or emu: the CPU with every op through
    /// its CUDA kernel's own source, emulated (a build with the `emu` feature; slow: for the
    /// launch count, not for speed).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hybrid placement (as for run): the routed experts of the first N MoE layers in host memory.
    #[arg(long, value_name = "N")]
    pub n_cpu_moe: Option<usize>,
    /// Hybrid placement: the device memory budget, e.g. 24GiB (on a bigger GPU: emulates that
    /// card's placement; on the CPU, exercises the split).
    #[arg(long, value_parser = crate::units::byte_size)]
    pub gpu_memory: Option<u64>,
    /// Hybrid placement from a routing profile (`moe-run profile`).
    #[arg(long, value_name = "FILE", conflicts_with = "n_cpu_moe")]
    pub profile: Option<std::path::PathBuf>,
    /// Decode steps replayed as CUDA graphs, one replay per step for all --batch sequences (one
    /// graph captured per set of attention key bounds; a replay counts as one kernel launch). Where
    /// the step cannot be replayed (not CUDA, the candle path, MLA's expanded form, experts in host
    /// memory, ...) it says why on stderr and decodes eagerly. With --sweep, at every point (the
    /// report adds each point's replays per decoded token).
    #[arg(long)]
    pub cuda_graph: bool,
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
    /// measured: a 1 GiB device-to-device copy on CUDA, a parallel streaming read on the CPU).
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
            revision: None,
            weights: None,
            random_weights: false,
            seed: 0,
            layers: None,
            dtype: "auto".into(),
            weight_dtype: None,
            quant: None,
            device: "cpu".into(),
            n_cpu_moe: None,
            gpu_memory: None,
            profile: None,
            cuda_graph: false,
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
