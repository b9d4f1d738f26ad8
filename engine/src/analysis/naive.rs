//! The seed articles' rules of thumb, next to the exact figures, with the error of each.
//!
//! - memory = params x {4, 2, 1, 0.5} bytes: exact at fp32, off by the f32 routers at bf16,
//!   by the scales and the 16-bit tensors at int8 / int4.
//! - MoE active = total / experts x top-k: spreads attention, embeddings, dense layers and
//!   shared experts over the experts as if they were routed (DeepSeek-V3: ~21B for 37B).
//! - KV cache = 2 x params x context x 2 bytes, as written: it multiplies the parameter
//!   count where the per-layer K/V width belongs, so it is off by a factor ~params/(L x kv
//!   width). What it presumably means, 2 x L x hidden x context x 2 bytes, is the MHA cache:
//!   GQA stores nkv/nh of that, MLA (kv_lora_rank + rope dims)/(2 x hidden).
//! - FLOPs/token = 2 x params: counts every expert and no attention.

use serde::Serialize;

use super::bytes::{decode_flops_per_token, kv_bytes_per_sequence, Precision};
use super::counts::ParamCounts;
use super::roofline::PrecisionBytes;
use crate::config::{FfnKind, ModelConfig};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NaiveRow {
    pub quantity: String,
    pub formula: &'static str,
    pub naive: f64,
    pub exact: f64,
    pub unit: &'static str,
    /// (naive - exact) / exact x 100.
    pub error_pct: f64,
    pub note: &'static str,
}

fn row(
    quantity: String,
    formula: &'static str,
    naive: f64,
    exact: f64,
    unit: &'static str,
    note: &'static str,
) -> NaiveRow {
    NaiveRow {
        quantity,
        formula,
        naive,
        exact,
        unit,
        error_pct: (naive - exact) / exact * 100.0,
        note,
    }
}

/// Every rule of thumb for this model at `context` tokens. `bytes` holds the exact figures
/// of each precision.
pub fn naive_formulas(
    cfg: &ModelConfig,
    counts: &ParamCounts,
    bytes: &[PrecisionBytes],
    context: u64,
) -> Vec<NaiveRow> {
    let total = counts.total as f64;
    let mut rows = Vec::new();
    for b in bytes {
        let p = b.precision;
        rows.push(row(
            format!("weights {}", p.name()),
            "params x {4, 2, 1, 0.5} B",
            total * p.nominal_bytes(),
            b.weight_bytes as f64,
            "B",
            match p {
                Precision::Fp32 => "exact: every tensor 4 B",
                Precision::Bf16 => "exact unless a router is kept in f32",
                Precision::Int8 => "misses one 16-bit scale per row and the 16-bit embeddings, norms, routers, lm_head",
                Precision::Int4 { .. } => "misses scale + zero per 128 and the 16-bit embeddings, norms, routers, lm_head",
                Precision::Int8F32 | Precision::Int4F32 { .. } => "also misses the f32 embeddings, norms, routers, lm_head",
                Precision::Bf16F32 => "misses the f32 embeddings, norms, routers, lm_head",
                Precision::Mxfp4 => "exact for the weights (4.25 bits); misses the 16-bit embeddings, norms, routers, lm_head",
                Precision::Mxfp4F32 => "also misses the f32 embeddings, norms, routers, lm_head",
            },
        ));
    }

    // The first MoE layer's E and k (the rule has one of each).
    if let Some(m) = cfg.layers.iter().find_map(|f| match f {
        FfnKind::Moe(m) => Some(m),
        FfnKind::Dense { .. } => None,
    }) {
        rows.push(row(
            "active params / token".into(),
            "total / experts x top-k",
            total / m.num_experts as f64 * m.top_k as f64,
            counts.active as f64,
            "params",
            "treats attention, embeddings, dense layers and shared experts as routed",
        ));
    }

    let kv = kv_bytes_per_sequence(cfg, context, 2) as f64;
    rows.push(row(
        format!("KV cache, {context} tokens, bf16"),
        "2 x params x context x 2 B (as written)",
        2.0 * total * context as f64 * 2.0,
        kv,
        "B",
        "params where the per-layer K/V width belongs",
    ));
    rows.push(row(
        format!("KV cache, {context} tokens, bf16"),
        "2 x layers x hidden x context x 2 B",
        2.0 * cfg.num_layers() as f64 * cfg.hidden_size as f64 * context as f64 * 2.0,
        kv,
        "B",
        if cfg.mla.is_some() {
            "full multi-head K and V; MLA caches only the latent + rope key"
        } else {
            "full multi-head K and V; GQA caches only the KV heads"
        },
    ));
    rows.push(row(
        format!("FLOPs / token at {context}"),
        "2 x params",
        2.0 * total,
        decode_flops_per_token(cfg, counts.matmul_active, context) as f64,
        "FLOP",
        "counts every expert, no attention over the context",
    ));
    rows
}
