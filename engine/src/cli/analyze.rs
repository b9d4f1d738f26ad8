//! `moe-run analyze`: its options, and the orchestration of the cost model ([`crate::analysis`]):
//! resolve the model, pick the GPUs, compute, print, plot.

use std::path::PathBuf;

use crate::analysis::{
    analyze, claims_table, plot, render, select_gpus, Gpu, Output, PlacementReport,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// `moe-run analyze` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AnalyzeArgs {
    /// A known model name (see configs/) or its repo id, or ORG/NAME: the config.json of its
    /// snapshot in the local HF cache when there is one, else (known models) the built-in copy;
    /// nothing is downloaded.
    #[arg(long, conflicts_with_all = ["config", "weights"])]
    pub model: Option<String>,
    /// The cached snapshot of --model to read: a branch, tag or commit (default main).
    #[arg(long, requires = "model", value_parser = crate::loader::hub::parse_revision)]
    pub revision: Option<String>,
    /// A config.json file.
    #[arg(long, conflicts_with = "weights")]
    pub config: Option<PathBuf>,
    /// A checkpoint directory (only its config.json is read).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// A built-in GPU (rtx4090, rtx3090, a100, h100, h100-pcie, h200); default: all of them.
    #[arg(long)]
    pub gpu: Option<String>,
    /// Any other GPU: memory bandwidth in GB/s (with --memory).
    #[arg(long, requires = "memory", conflicts_with = "gpu", value_parser = crate::units::positive)]
    pub bandwidth: Option<f64>,
    /// Any other GPU: memory in GiB (with --bandwidth).
    #[arg(long, requires = "bandwidth", value_parser = crate::units::positive)]
    pub memory: Option<f64>,
    /// Any other GPU: dense bf16 tensor peak in TFLOPS, for the prefill ceiling (tf32 = half).
    #[arg(long, requires = "bandwidth", value_parser = crate::units::positive)]
    pub tflops: Option<f64>,
    /// Context length for the KV cache, the attention FLOPs and the decode ceiling (1 to 2^26).
    #[arg(long, default_value_t = 4096, value_parser = crate::units::context)]
    pub context: u64,
    /// Sequences decoded together: expected experts touched per layer and tokens/s (1 to 2^20).
    #[arg(long, default_value_t = 1, value_parser = crate::units::batch)]
    pub batch: u64,
    /// With one GPU (--gpu or --bandwidth/--memory): the precision of the GPU/CPU placement plan
    /// (int8, int4, int4:64, int4:32; default bf16).
    #[arg(long)]
    pub quant: Option<String>,
    /// The plan's GPU memory budget, e.g. 24GiB or 20000MB (default: the GPU's memory minus
    /// 768 MiB for the CUDA context and allocator).
    #[arg(long, value_parser = crate::units::byte_size)]
    pub gpu_memory: Option<u64>,
    /// Keep the routed experts of the first N MoE layers on the CPU (the rest on the GPU).
    #[arg(long, value_name = "N")]
    pub n_cpu_moe: Option<usize>,
    /// A routing profile from `moe-run profile`: the hottest experts go on the GPU first.
    #[arg(long, value_name = "FILE", conflicts_with = "n_cpu_moe")]
    pub profile: Option<PathBuf>,
    /// Host memory bandwidth the CPU experts stream at, GB/s (default 60: dual-channel DDR5).
    #[arg(long, value_parser = crate::units::positive)]
    pub host_bandwidth: Option<f64>,
    /// Host matmul peak for the CPU experts at prefill, TFLOPS (default 1).
    #[arg(long, value_parser = crate::units::positive)]
    pub host_tflops: Option<f64>,
    /// Host <-> GPU link, GB/s (default 25: PCIe 4.0 x16).
    #[arg(long, value_parser = crate::units::positive)]
    pub pcie: Option<f64>,
    /// Print the table of published parameter claims (no model needed).
    #[arg(long)]
    pub claims: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Draw total vs active parameters and the decode ceilings to FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Replace an existing --plot file.
    #[arg(long)]
    pub force: bool,
}

/// The config `analyze` reads: a known name or repo in the local HF cache (else a known model's
/// built-in config), a config.json or a checkpoint directory ([`crate::loader::ModelRef`]). Returns a display name and the parsed
/// config.
pub fn resolve_config(a: &AnalyzeArgs) -> Result<Option<(String, ModelConfig)>> {
    crate::loader::ModelRef::resolve(
        a.model.as_deref(),
        a.weights.as_deref(),
        a.config.as_deref(),
    )
    .map(|r| r.config_at(a.revision.as_deref()))
    .transpose()
}

/// The GPUs to report on: `--gpu`, or `--bandwidth/--memory`, or every built-in one.
pub fn selected_gpus(a: &AnalyzeArgs) -> Result<Vec<Gpu>> {
    let custom = match (a.bandwidth, a.memory) {
        (Some(bw), Some(mem)) => Some((bw, mem, a.tflops)),
        _ => None,
    };
    select_gpus(custom, a.gpu.as_deref())
}

/// Computes what the arguments ask for (no printing, no files).
pub fn compute(a: &AnalyzeArgs) -> Result<Output> {
    if a.context == 0 || a.batch == 0 {
        return Err(Error::Input(
            "--context and --batch must be at least 1".into(),
        ));
    }
    let model = resolve_config(a)?;
    if model.is_none() && !a.claims {
        return Err(Error::Input(
            "give --model NAME (e.g. mixtral-8x7b), --config PATH or --weights DIR, or --claims"
                .into(),
        ));
    }
    let gpus = selected_gpus(a)?;
    let placement = match (&model, gpus.as_slice()) {
        (Some((_, cfg)), [gpu]) => Some(placement_report(a, cfg, gpu)?),
        _ if a.quant.is_some() || a.gpu_memory.is_some() || a.n_cpu_moe.is_some() || a.profile.is_some() => {
            return Err(Error::Input(
                "--quant, --gpu-memory, --n-cpu-moe and --profile plan a placement on one GPU: add --gpu NAME (or --bandwidth/--memory) and a model".into(),
            ))
        }
        _ => None,
    };
    let report = model.map(|(name, cfg)| analyze(&name, &cfg, a.context, a.batch, &gpus));
    Ok(Output {
        report,
        claims: a.claims.then(claims_table),
        placement,
    })
}

/// The placement of `cfg` on `gpu` by the arguments, and its prediction.
fn placement_report(a: &AnalyzeArgs, cfg: &ModelConfig, gpu: &Gpu) -> Result<PlacementReport> {
    use crate::analysis::placement::{self, HostSpec, PlanRequest, RoutingProfile};
    use crate::analysis::Precision;
    let quant = crate::quant::parse_quant_flag(a.quant.as_deref())?;
    let precision = Precision::of(candle_core::DType::BF16, quant);
    let (budget_bytes, budget_source) = match a.gpu_memory {
        Some(b) => (b, "--gpu-memory".to_string()),
        None => {
            let mem = gpu.memory_bytes() as u64;
            (
                mem.saturating_sub(placement::SAFETY_MARGIN_BYTES),
                format!(
                    "{} - {} margin",
                    crate::units::human_bytes(mem),
                    crate::units::human_bytes(placement::SAFETY_MARGIN_BYTES)
                ),
            )
        }
    };
    let profile = match &a.profile {
        Some(path) => Some((path.display().to_string(), RoutingProfile::read(path)?)),
        None => None,
    };
    let plan = placement::plan(
        cfg,
        &PlanRequest {
            precision,
            budget_bytes,
            context: a.context,
            batch: a.batch,
            n_cpu_moe: a.n_cpu_moe,
            profile: profile.as_ref().map(|(_, p)| p),
        },
    )?;
    let d = HostSpec::default();
    let host = HostSpec {
        bandwidth_gb_s: a.host_bandwidth.unwrap_or(d.bandwidth_gb_s),
        tflops: a.host_tflops.unwrap_or(d.tflops),
        pcie_gb_s: a.pcie.unwrap_or(d.pcie_gb_s),
        ..d
    };
    let prediction = placement::predict(cfg, &plan, gpu, &host, a.context);
    Ok(PlacementReport {
        gpu: gpu.name.clone(),
        budget_source,
        plan,
        prediction,
        profile: profile.map(|(f, p)| (f, p.hottest_quarter_share())),
    })
}

/// `moe-run analyze`: compute, print (text or JSON), and draw the plot if asked.
pub fn run(a: &AnalyzeArgs) -> Result<()> {
    if let Some(path) = &a.plot {
        let mut inputs = crate::fsio::Inputs::new();
        for p in a.config.iter().chain(&a.weights) {
            inputs = inputs.with(p);
        }
        crate::fsio::check_output(path, "--plot", &inputs, a.force)?;
    }
    let out = compute(a)?;
    if let Some(path) = &a.plot {
        let Some(report) = &out.report else {
            return Err(Error::Input(
                "--plot needs a model (--model, --config or --weights)".into(),
            ));
        };
        plot::plot(report, path)?;
        if !a.json {
            eprintln!("wrote {}", path.display());
        }
    }
    let text = if a.json {
        serde_json::to_string(&out).map_err(|e| Error::io("stdout", std::io::Error::other(e)))?
    } else {
        let mut s = String::new();
        if let Some(r) = &out.report {
            s.push_str(&render::report_text(
                r,
                a.gpu.is_some() || a.bandwidth.is_some(),
            ));
        }
        if let Some(p) = &out.placement {
            s.push('\n');
            s.push_str(&render::placement_text(p));
        }
        if let Some(c) = &out.claims {
            if !s.is_empty() {
                s.push('\n');
            }
            s.push_str(&render::claims_text(c));
        }
        s
    };
    crate::fsio::print(&(text + "\n"))
}
