//! The roofline of a bench run: the ceilings' inputs (bandwidth, matmul peak: given, from the
//! GPU table, or measured) and the predicted bytes, FLOPs and ceiling of one forward.

use candle_core::{DType, Device};

use super::schema::dtype_name;
use super::{measure, BenchArgs, Sourced};
use crate::analysis::bytes::{decode_flops_per_token, prefill_flops_per_token, Precision};
use crate::analysis::counts::{counts_of, tensor_inventory};
use crate::analysis::roofline::batch_step_bytes;
use crate::config::ModelConfig;
use crate::error::{Error, Result};

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
        // Decode streams weights: the ceiling is what the compute pool can read, measured with
        // the same threads (a one-thread memcpy understated it by 2x on 2 threads).
        _ => Sourced {
            value: measure::read_bandwidth_gb_s(),
            source: format!(
                "measured: parallel streaming read of 256 MiB on the CPU, {} threads",
                rayon::current_num_threads()
            ),
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
