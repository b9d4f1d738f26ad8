//! A sparse MoE block as four stages, each a function with its own tests:
//! route (router logits -> top-k ids + weights), dispatch (group token slots by expert),
//! experts (per-expert SwiGLU MLP over its tokens), combine (weighted sum back per token).
//! Legend: N = B*T tokens, E experts, A = top-k, H hidden, F expert width.

pub mod combine;
pub mod dispatch;
pub mod experts;
pub mod route;

use candle_core::{Result, Tensor};

pub use combine::combine;
pub use dispatch::{dispatch, Dispatch};
pub use experts::experts;
pub use route::{route, Routing};

use super::Linear;
use crate::config::MoeConfig;

/// Canonical expert weights: stacked `[E, N, K]` (experts, out, in) per projection.
pub struct MoeWeights {
    /// `[E, H]`
    pub router: Tensor,
    /// `[E, 2F, H]`: rows 0..F are the gate (w1), rows F..2F are up (w3).
    pub gate_up: Tensor,
    /// `[E, H, F]`
    pub down: Tensor,
}

pub struct MoeBlock {
    pub cfg: MoeConfig,
    pub router: Linear,
    pub gate_up: Tensor,
    pub down: Tensor,
}

impl MoeBlock {
    pub fn new(cfg: MoeConfig, w: MoeWeights) -> Self {
        MoeBlock {
            cfg,
            router: Linear::new(w.router),
            gate_up: w.gate_up,
            down: w.down,
        }
    }

    /// `x [B, T, H] -> ([B, T, H], routing)`
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        let shape = x.shape().clone();
        let h = x.dim(candle_core::D::Minus1)?;
        let x = x.reshape(((), h))?; // [N, H]
        let logits = self.router.forward(&x)?; // [N, E] in the activation dtype, as HF
        let routing = route(&logits, self.cfg.router, self.cfg.top_k)?;
        let d = dispatch(&routing.ids, self.cfg.top_k, self.cfg.num_experts);
        let y = experts(&x, &d, &self.gate_up, &self.down)?; // [N*A, H], expert-sorted
        let out = combine(&y, &d, &routing)?; // [N, H]
        Ok((out.reshape(shape)?, routing))
    }
}
