//! The one generic decoder. Legend used in shapes: B batch, T new tokens, L cached + new tokens,
//! H hidden, V vocab, E experts, A active experts per token (top-k), F expert width.

pub mod attention;
pub mod decoder;
pub mod mla;
pub mod moe;
pub mod norm;
pub mod rope;

use candle_core::{Module, Tensor};

pub use decoder::{Model, Trace};

/// y = x W^T (+ b) for W stored `[out, in]` as in every HF checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear { weight, bias: None }
    }

    pub fn with_bias(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    /// `x [.., in] -> [.., out]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::Linear::new(self.weight.clone(), self.bias.clone()).forward(x)
    }
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
        qkv: Tensor,
        /// `[heads*hd + 2*kv*hd]` when the family has q/k/v biases.
        qkv_bias: Option<Tensor>,
        /// QK-norm weights: `[hd]` per head, or `[heads*hd]` / `[kv*hd]` for a whole-projection
        /// norm.
        q_norm: Option<Tensor>,
        k_norm: Option<Tensor>,
        /// `[H, heads*hd]`
        o: Tensor,
    },
    Mla(MlaWeights),
}

/// DeepSeek MLA weights (shapes in `model/mla.rs`).
pub struct MlaWeights {
    /// `q_proj`, or `(q_a_proj, q_a_layernorm, q_b_proj)`.
    pub q: Result<Tensor, (Tensor, Tensor, Tensor)>,
    pub kv_a: Tensor,
    pub kv_a_norm: Tensor,
    pub kv_b: Tensor,
    pub o: Tensor,
}

/// A SwiGLU MLP: gate_up `[2F, H]` (rows 0..F gate, F..2F up), down `[H, F]`.
pub struct MlpWeights {
    pub gate_up: Tensor,
    pub down: Tensor,
}

pub enum FfnWeights {
    Dense(MlpWeights),
    Moe(moe::MoeWeights),
}
