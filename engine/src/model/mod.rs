//! The one generic decoder. Legend used in shapes: B batch, T new tokens, L cached + new tokens,
//! H hidden, V vocab, E experts, A active experts per token (top-k), F expert width.

pub mod assemble;
pub mod attention;
pub mod decoder;
pub mod host;
pub mod kv_cache;
pub mod mla;
pub mod moe;
pub mod norm;
pub mod path;
pub mod rope;

use candle_core::{Module, Tensor};

pub use crate::quant::Weight;
pub use decoder::{Model, SeqStep, Trace};
pub use path::{ExecPath, PathPlan};

/// y = x W^T (+ b) for W stored `[out, in]` as in every HF checkpoint, dense or quantized
/// (INT8/INT4 weight-only, dequantized on the fly; see `crate::quant`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: impl Into<Weight>) -> Self {
        Linear {
            weight: weight.into(),
            bias: None,
        }
    }

    pub fn with_bias(weight: impl Into<Weight>, bias: Option<Tensor>) -> Self {
        Linear {
            weight: weight.into(),
            bias,
        }
    }

    /// `x [.., in] -> [.., out]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.weight {
            // 16-bit weights under f32 compute (`--weight-dtype`) off the CPU kernels' path
            // (`MOE_PATH=reference`): widened per call, correct but slow.
            Weight::Dense(w) if w.dtype() != x.dtype() => {
                candle_nn::Linear::new(w.to_dtype(x.dtype())?, self.bias.clone()).forward(x)
            }
            Weight::Dense(w) => candle_nn::Linear::new(w.clone(), self.bias.clone()).forward(x),
            Weight::Quant(q) => {
                let y = q.forward(x)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// [`Linear::forward`] through the path plan: on the CPU, the CPU linear kernel where
    /// [`PathPlan::cpu_linear`] picks it (bf16/f16/quantized weights read in place), else as
    /// [`Linear::forward`].
    pub fn forward_on(&self, x: &Tensor, plan: &PathPlan) -> candle_core::Result<Tensor> {
        let dims = self.weight.dims();
        let (Some(&k), Some(&n)) = (
            x.dims().last(),
            dims.len().checked_sub(2).and_then(|i| dims.get(i)),
        ) else {
            return self.forward(x);
        };
        let rows = x.elem_count() / k.max(1);
        match plan.cpu_linear(&self.weight, rows) {
            Some(level) if x.device().is_cpu() => {
                let y = moe_kernels::cpu::linear_cpu(level, x, self.weight.kernel_ref(), n)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            _ => self.forward(x),
        }
    }

    /// Bytes of weight and bias in memory.
    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, tensor_bytes)
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Canonical weights of a whole model, as produced by the loader from any family's naming.
pub struct ModelWeights {
    /// `[V, H]`
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    /// `[H]`
    pub final_norm: Tensor,
    /// `[V, H]`; the embedding itself when tied.
    pub lm_head: Tensor,
}

pub struct LayerWeights {
    pub attn_norm: Tensor,
    pub attn: AttnWeights,
    pub ffn_norm: Tensor,
    pub ffn: FfnWeights,
}

pub enum AttnWeights {
    Gqa {
        /// Fused `[heads*hd + 2*kv*hd, H]`: q rows, then k rows, then v rows.
        qkv: Weight,
        /// `[heads*hd + 2*kv*hd]` when the family has q/k/v biases.
        qkv_bias: Option<Tensor>,
        /// QK-norm weights: `[hd]` per head, or `[heads*hd]` / `[kv*hd]` for a whole-projection
        /// norm.
        q_norm: Option<Tensor>,
        k_norm: Option<Tensor>,
        /// `[H, heads*hd]`
        o: Weight,
        /// `[H]` (gpt-oss).
        o_bias: Option<Tensor>,
        /// One sink logit per head `[heads]` (gpt-oss).
        sinks: Option<Tensor>,
    },
    Mla(MlaWeights),
}

/// DeepSeek MLA weights (shapes in `model/mla.rs`).
pub struct MlaWeights {
    pub q: MlaQueryWeights,
    pub kv_a: Weight,
    pub kv_a_norm: Tensor,
    pub kv_b: Weight,
    pub o: Weight,
}

/// MLA's query projection as stored.
pub enum MlaQueryWeights {
    /// `q_proj [nh*(dn+dr), H]`.
    Plain(Weight),
    /// `q_a_proj [qr, H]`, `q_a_layernorm [qr]`, `q_b_proj [nh*(dn+dr), qr]`.
    LowRank { a: Weight, norm: Tensor, b: Weight },
}

/// A SwiGLU MLP: gate_up `[2F, H]` (rows 0..F gate, F..2F up), down `[H, F]`.
pub struct MlpWeights {
    pub gate_up: Weight,
    pub down: Weight,
}

pub enum FfnWeights {
    Dense(MlpWeights),
    Moe(moe::MoeWeights),
}
