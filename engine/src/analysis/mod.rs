//! `moe-run analyze`: exact parameter, memory, KV and FLOP accounting from a [`ModelConfig`]
//! alone, roofline ceilings on named GPUs, the seed articles' rules of thumb against the exact
//! figures, and a table of published claims.
//!
//! - [`counts`] (in [`crate::spec`]): the tensor inventory and parameter counts (equal to transformers' counts:
//!   `tests/analyze.rs` checks every config against `tests/fixtures/param_counts.json`).
//! - [`bytes`] (in [`crate::spec`]): weight bytes per precision (the quantization rule [`bytes::storage`]), KV
//!   cache bytes, FLOPs per token.
//! - [`gpus`], [`roofline`]: GPU table and the decode / prefill / batch ceilings.
//! - [`naive`], [`claims`]: the formulas and claims side by side with the exact numbers.
//! - [`render`], [`plot`]: text table, JSON, SVG / PNG.

pub mod claims;
pub mod gpus;
pub mod naive;
pub mod plot;
pub mod render;
pub mod roofline;

/// The tensor inventory and its byte rules live in [`crate::spec`]; re-exported here, where the
/// cost model presents them.
pub use crate::spec::{bytes, counts};

use std::path::PathBuf;

use serde::Serialize;

pub use bytes::{storage, Precision, Storage};
pub use claims::{claims_table, ClaimRow};
pub use counts::{param_counts, tensor_inventory, Component, ParamCounts, TensorGroup};
pub use gpus::{builtin_gpus, find_gpu, Gpu};
pub use naive::{naive_formulas, NaiveRow};
pub use roofline::{ceiling, expected_experts_touched, Ceiling, PrecisionBytes};

use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};

/// `moe-run analyze` options.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AnalyzeArgs {
    /// A known model name (see configs/; no download), or ORG/NAME from the local HF cache.
    #[arg(long, conflicts_with_all = ["config", "weights"])]
    pub model: Option<String>,
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

/// A short description of the architecture, for the report header.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Architecture {
    pub model_type: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// "GQA" or "MLA".
    pub attention: &'static str,
    pub moe_layers: usize,
    pub dense_layers: usize,
    pub tied_embeddings: bool,
    /// One line per distinct FFN kind, e.g. "32 MoE layers: 8 experts (F 14336), top-2".
    pub ffn: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuCeilings {
    pub gpu: Gpu,
    pub ceilings: Vec<Ceiling>,
}

/// Everything `analyze` computes for one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub model: String,
    pub architecture: Architecture,
    pub total_params: u64,
    pub active_params: u64,
    pub active_params_excluding_embedding: u64,
    /// Parameters multiplied per token (lm_head in, embedding lookup and norms out).
    pub matmul_params_per_token: u64,
    pub components: Vec<counts::ComponentCount>,
    pub context: u64,
    pub batch: u64,
    pub kv_bytes_per_token_bf16: u64,
    pub kv_bytes_per_token_fp32: u64,
    pub kv_formula: &'static str,
    pub decode_flops_per_token: u64,
    pub prefill_flops_per_token: f64,
    pub attention_flops_formula: &'static str,
    pub precisions: Vec<PrecisionBytes>,
    pub gpus: Vec<GpuCeilings>,
    pub naive: Vec<NaiveRow>,
}

/// Everything for one model at `context` tokens and `batch` sequences on `gpus`.
pub fn analyze(name: &str, cfg: &ModelConfig, context: u64, batch: u64, gpus: &[Gpu]) -> Report {
    let inv = tensor_inventory(cfg);
    let counts = counts::counts_of(&inv, cfg.tie_word_embeddings);
    let precisions: Vec<PrecisionBytes> = Precision::ALL
        .iter()
        .map(|&p| roofline::precision_bytes(cfg, &inv, p, context))
        .collect();
    let gpus = gpus
        .iter()
        .map(|g| GpuCeilings {
            gpu: g.clone(),
            ceilings: Precision::ALL
                .iter()
                .map(|&p| ceiling(cfg, &inv, counts.matmul_active, g, p, context, batch))
                .collect(),
        })
        .collect();
    let (kv_formula, attention_flops_formula) = match cfg.mla {
        Some(_) => (
            "MLA: layers x (kv_lora_rank + qk_rope_head_dim) x bytes",
            "MLA, absorbed latent: 2 x layers x heads x (2 x kv_lora_rank + qk_rope_head_dim) x keys",
        ),
        None => (
            "GQA: 2 x layers x kv_heads x head_dim x bytes",
            "4 x layers x heads x head_dim x keys",
        ),
    };
    Report {
        model: name.to_string(),
        architecture: architecture(cfg),
        total_params: counts.total,
        active_params: counts.active,
        active_params_excluding_embedding: counts.active_excluding_embedding,
        matmul_params_per_token: counts.matmul_active,
        components: counts.by_component.clone(),
        context,
        batch,
        kv_bytes_per_token_bf16: bytes::kv_bytes_per_token(cfg, 2),
        kv_bytes_per_token_fp32: bytes::kv_bytes_per_token(cfg, 4),
        kv_formula,
        decode_flops_per_token: bytes::decode_flops_per_token(cfg, counts.matmul_active, context),
        prefill_flops_per_token: bytes::prefill_flops_per_token(cfg, counts.matmul_active, context),
        attention_flops_formula,
        naive: naive_formulas(cfg, &counts, &precisions, context),
        precisions,
        gpus,
    }
}

fn architecture(cfg: &ModelConfig) -> Architecture {
    let mut ffn: Vec<(String, usize)> = Vec::new();
    for layer in &cfg.layers {
        let d = match layer {
            FfnKind::Dense { intermediate } => format!("dense (F {intermediate})"),
            FfnKind::Moe(m) => {
                let shared = m
                    .shared
                    .map_or(String::new(), |s| format!(" + shared F {}", s.ffn));
                format!(
                    "MoE: {} experts (F {}), top-{}{shared}",
                    m.num_experts, m.expert_ffn, m.top_k
                )
            }
        };
        match ffn.iter_mut().find(|(s, _)| *s == d) {
            Some((_, n)) => *n += 1,
            None => ffn.push((d, 1)),
        }
    }
    let moe_layers = cfg
        .layers
        .iter()
        .filter(|l| matches!(l, FfnKind::Moe(_)))
        .count();
    Architecture {
        model_type: cfg.model_type.clone(),
        layers: cfg.num_layers(),
        hidden_size: cfg.hidden_size,
        vocab_size: cfg.vocab_size,
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        attention: if cfg.mla.is_some() { "MLA" } else { "GQA" },
        moe_layers,
        dense_layers: cfg.num_layers() - moe_layers,
        tied_embeddings: cfg.tie_word_embeddings,
        ffn: ffn.into_iter().map(|(d, n)| format!("{n} x {d}")).collect(),
    }
}

/// The config `analyze` reads: a known name, a repo in the local HF cache, a config.json or
/// a checkpoint directory ([`crate::loader::ModelRef`]). Returns a display name and the parsed
/// config.
pub fn resolve_config(a: &AnalyzeArgs) -> Result<Option<(String, ModelConfig)>> {
    crate::loader::ModelRef::resolve(
        a.model.as_deref(),
        a.weights.as_deref(),
        a.config.as_deref(),
    )
    .map(|r| r.config())
    .transpose()
}

/// The GPUs to report on: `--gpu`, or `--bandwidth/--memory`, or every built-in one.
pub fn selected_gpus(a: &AnalyzeArgs) -> Result<Vec<Gpu>> {
    if let (Some(bw), Some(mem)) = (a.bandwidth, a.memory) {
        if !(bw > 0.0 && mem > 0.0) {
            return Err(Error::Input(
                "--bandwidth and --memory must be positive".into(),
            ));
        }
        return Ok(vec![Gpu::custom(bw, mem, a.tflops)]);
    }
    match &a.gpu {
        None => Ok(builtin_gpus()),
        Some(name) => find_gpu(name).map(|g| vec![g]).ok_or_else(|| {
            Error::Input(format!(
                "unknown GPU {name:?}; built in: {} (or give --bandwidth GB/s --memory GiB)",
                gpus::gpu_names().join(", ")
            ))
        }),
    }
}

/// What `moe-run analyze` prints: the report (if a model was given), the claims (if asked).
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    #[serde(flatten)]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Vec<ClaimRow>>,
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
    let report = model.map(|(name, cfg)| analyze(&name, &cfg, a.context, a.batch, &gpus));
    Ok(Output {
        report,
        claims: a.claims.then(claims_table),
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
