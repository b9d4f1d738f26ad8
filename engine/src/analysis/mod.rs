//! The cost model behind `moe-run analyze` (the command itself is `crate::cli::analyze`): exact parameter, memory, KV and FLOP accounting from a [`ModelConfig`]
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
pub mod placement;
pub mod plot;
pub mod render;
pub mod roofline;

/// The tensor inventory and its byte rules live in [`crate::spec`]; re-exported here, where the
/// cost model presents them.
pub use crate::spec::{bytes, counts};

use serde::Serialize;

pub use bytes::{storage, Precision, Storage};
pub use claims::{claims_table, ClaimRow};
pub use counts::{param_counts, tensor_inventory, Component, ParamCounts, TensorGroup};
pub use gpus::{builtin_gpus, find_gpu, Gpu};
pub use naive::{naive_formulas, NaiveRow};
pub use roofline::{ceiling, expected_experts_touched, Ceiling, PrecisionBytes};

use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};

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
    /// The routed experts are MXFP4 as published (gpt-oss), at every precision.
    pub experts_mxfp4: bool,
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
        experts_mxfp4: cfg.experts_mxfp4,
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

/// What `moe-run analyze` prints: the report (if a model was given), the claims (if asked).
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    #[serde(flatten)]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<Vec<ClaimRow>>,
    /// With one GPU: the hybrid GPU/CPU placement at the plan's precision and its prediction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementReport>,
}

/// `analyze`'s placement section (see [`placement`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacementReport {
    pub gpu: String,
    /// Where the budget came from ("24 GiB - 768 MiB margin", "--gpu-memory").
    pub budget_source: String,
    pub plan: placement::Plan,
    pub prediction: placement::PlanPrediction,
    /// The profile's file and its hottest-quarter share (routing concentration), if one was given.
    pub profile: Option<(String, f64)>,
}

/// The GPUs to report on: a custom one (bandwidth GB/s, memory GiB, optional TFLOPS), a built-in one by
/// name, or every built-in one.
pub fn select_gpus(
    custom: Option<(f64, f64, Option<f64>)>,
    name: Option<&str>,
) -> Result<Vec<Gpu>> {
    if let Some((bw, mem, tflops)) = custom {
        if !(bw > 0.0 && mem > 0.0) {
            return Err(Error::Input(
                "--bandwidth and --memory must be positive".into(),
            ));
        }
        return Ok(vec![Gpu::custom(bw, mem, tflops)]);
    }
    match name {
        None => Ok(builtin_gpus()),
        Some(name) => find_gpu(name).map(|g| vec![g]).ok_or_else(|| {
            Error::Input(format!(
                "unknown GPU {name:?}; built in: {} (or give --bandwidth GB/s --memory GiB)",
                gpus::gpu_names().join(", ")
            ))
        }),
    }
}
