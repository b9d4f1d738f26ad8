//! The one generic decoder. Legend used in shapes: B batch, T new tokens, L cached + new tokens,
//! H hidden, V vocab, E experts, A active experts per token (top-k), F expert width.

pub mod attention;
pub mod decoder;
pub mod moe;
pub mod norm;
pub mod rope;

use candle_core::{Module, Tensor};

pub use decoder::{Model, Trace};

/// y = x W^T for W stored `[out, in]` as in every HF checkpoint.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear { weight }
    }

    /// `x [.., in] -> [.., out]`
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::Linear::new(self.weight.clone(), None).forward(x)
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
    /// `[heads*hd, H]`, `[kv*hd, H]`, `[kv*hd, H]`, `[H, heads*hd]`
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub ffn_norm: Tensor,
    pub ffn: FfnWeights,
}

pub enum FfnWeights {
    /// A dense SwiGLU MLP: gate_up `[2F, H]` (rows 0..F gate, F..2F up), down `[H, F]`.
    Dense {
        gate_up: Tensor,
        down: Tensor,
    },
    Moe(moe::MoeWeights),
}
