//! Roofline ceilings on a GPU: what bandwidth and tensor-core peak allow, before any kernel.
//!
//! - Decode (batch 1) is memory-bound: tokens/s <= bandwidth / (active weight bytes + KV read).
//! - Prefill is compute-bound: tokens/s <= tensor peak / FLOPs per prompt token.
//! - Batch B decode: the B tokens of one step share every weight but the experts; with
//!   uniform routing a layer's expert is chosen by one token with probability k/E, so B
//!   tokens touch E x (1 - (1 - k/E)^B) distinct experts in expectation. Bytes per step =
//!   non-expert active weights + distinct experts' weights + B x (KV read + one embedding
//!   row); tokens/s = B x bandwidth / bytes per step.

use serde::Serialize;

use super::bytes::{
    decode_weight_bytes, expert_bytes, kv_bytes_per_sequence, kv_read_bytes,
    prefill_flops_per_token, storage, unquantized_elem_bytes, weight_bytes, Precision,
};
use super::counts::{TensorGroup, TensorKind};
use super::gpus::Gpu;
use crate::config::{FfnKind, ModelConfig};

/// Expected distinct experts that `batch` tokens choose in one layer under uniform routing.
pub fn expected_experts_touched(experts: usize, top_k: usize, batch: u64) -> f64 {
    let (e, k) = (experts as f64, top_k as f64);
    e * (1.0 - (1.0 - k / e).powf(batch as f64))
}

/// Byte figures of one precision that do not depend on the GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrecisionBytes {
    pub precision: Precision,
    /// Every stored weight.
    pub weight_bytes: u64,
    /// Weights read per decoded token at batch 1 (k experts, one embedding row).
    pub decode_weight_bytes: u64,
    /// KV cache of one sequence at the context (all positions, as allocated).
    pub kv_bytes_per_sequence: u64,
    /// KV read by one decode step at the context (window-capped).
    pub kv_read_bytes: u64,
    /// decode_weight_bytes + kv_read_bytes: the batch-1 decode traffic per token.
    pub decode_bytes_per_token: u64,
}

pub fn precision_bytes(
    cfg: &ModelConfig,
    inv: &[TensorGroup],
    p: Precision,
    context: u64,
) -> PrecisionBytes {
    let kv_read = kv_read_bytes(cfg, context, p.kv_elem_bytes());
    let w = decode_weight_bytes(inv, p);
    PrecisionBytes {
        precision: p,
        weight_bytes: weight_bytes(inv, p),
        decode_weight_bytes: w,
        kv_bytes_per_sequence: kv_bytes_per_sequence(cfg, context, p.kv_elem_bytes()),
        kv_read_bytes: kv_read,
        decode_bytes_per_token: w + kv_read,
    }
}

/// Batch-B decode under uniform routing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchDecode {
    pub batch: u64,
    /// Mean over MoE layers of E x (1 - (1 - k/E)^B).
    pub experts_touched_per_moe_layer: f64,
    pub bytes_per_step: f64,
    pub tokens_per_s: f64,
}

/// Bytes one decode step of `batch` tokens reads (see the module doc).
pub fn batch_step_bytes(
    cfg: &ModelConfig,
    inv: &[TensorGroup],
    p: Precision,
    context: u64,
    batch: u64,
) -> (f64, f64) {
    let mut bytes = decode_weight_bytes(inv, p) as f64;
    let (mut touched, mut moe_layers) = (0.0, 0usize);
    for (i, ffn) in cfg.layers.iter().enumerate() {
        if let FfnKind::Moe(m) = ffn {
            let d = expected_experts_touched(m.num_experts, m.top_k, batch);
            // Batch 1 already counted k experts of this layer; replace them by d.
            bytes += (d - m.top_k as f64) * expert_bytes(cfg, i, p) as f64;
            touched += d;
            moe_layers += 1;
        }
    }
    let row: u64 = inv
        .iter()
        .filter_map(|t| match t.kind {
            TensorKind::Lookup { cols, .. } => {
                Some(cols as u64 * unquantized_elem_bytes(storage(t), p))
            }
            _ => None,
        })
        .sum();
    let extra_tokens = batch.saturating_sub(1) as f64;
    bytes += extra_tokens * row as f64;
    bytes += batch as f64 * kv_read_bytes(cfg, context, p.kv_elem_bytes()) as f64;
    (bytes, touched / moe_layers.max(1) as f64)
}

/// Ceilings of one precision on one GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ceiling {
    pub precision: Precision,
    /// Weights + `batch` sequences of KV at the context.
    pub memory_needed_bytes: u64,
    pub fits: bool,
    /// Batch-1 decode ceiling: bandwidth / decode bytes per token.
    pub decode_tokens_per_s: f64,
    /// Compute ceiling for a prompt of `context` tokens; `None` without a known peak.
    pub prefill_tokens_per_s: Option<f64>,
    /// TFLOPS used for the prefill ceiling (TF32 for fp32; bf16 for bf16 and for the
    /// weight-only int8 / int4 formats, which dequantize to bf16 before the MMA).
    pub prefill_peak_tflops: Option<f64>,
    /// A W8A8 kernel could use the int8 peak instead (int8 only).
    pub prefill_tokens_per_s_w8a8: Option<f64>,
    pub batch: BatchDecode,
}

pub fn ceiling(
    cfg: &ModelConfig,
    inv: &[TensorGroup],
    matmul_active: u64,
    gpu: &Gpu,
    p: Precision,
    context: u64,
    batch: u64,
) -> Ceiling {
    let b = precision_bytes(cfg, inv, p, context);
    let needed = b
        .weight_bytes
        .saturating_add(batch.saturating_mul(b.kv_bytes_per_sequence));
    let bw = gpu.bandwidth_bytes_s();
    let flops = prefill_flops_per_token(cfg, matmul_active, context);
    let peak = match p {
        Precision::Fp32 => gpu.tf32_tflops,
        _ => gpu.bf16_tflops,
    };
    let (step, touched) = batch_step_bytes(cfg, inv, p, context, batch);
    Ceiling {
        precision: p,
        memory_needed_bytes: needed,
        fits: (needed as f64) <= gpu.memory_bytes(),
        decode_tokens_per_s: bw / b.decode_bytes_per_token as f64,
        prefill_tokens_per_s: peak.map(|t| t * 1e12 / flops),
        prefill_peak_tflops: peak,
        prefill_tokens_per_s_w8a8: match p {
            Precision::Int8 | Precision::Int8F32 => gpu.int8_tops.map(|t| t * 1e12 / flops),
            _ => None,
        },
        batch: BatchDecode {
            batch,
            experts_touched_per_moe_layer: touched,
            bytes_per_step: step,
            tokens_per_s: batch as f64 * bw / step,
        },
    }
}
