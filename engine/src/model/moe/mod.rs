//! A sparse MoE block as four stages, each a function with its own tests:
//! route (router logits -> top-k ids + weights), dispatch (group token slots by expert),
//! experts (per-expert SwiGLU MLP over its tokens), combine (weighted sum back per token).
//! Legend: N = B*T tokens, E experts, A = top-k, H hidden, F expert width.

pub mod combine;
pub mod dispatch;
pub mod experts;
pub mod route;

use candle_core::{DType, Result, Tensor};

pub use combine::combine;
pub use dispatch::{dispatch, Dispatch};
pub use experts::experts;
pub use route::{route, Routing};

use super::{Linear, MlpWeights, Weight};
use crate::config::MoeConfig;

/// Canonical expert weights: stacked `[E, N, K]` (experts, out, in) per projection.
pub struct MoeWeights {
    /// `[E, H]` (kept in f32 when the config says `router_f32`).
    pub router: Tensor,
    /// `[E, 2F, H]`: rows 0..F are the gate (w1), rows F..2F are up (w3).
    pub gate_up: Weight,
    /// `[E, H, F]`
    pub down: Weight,
    /// The selection-only correction bias `[E]` of sigmoid routers (f32).
    pub score_bias: Option<Tensor>,
    /// Always-on shared experts (one MLP) and, for sigmoid gating, the gate `[1, H]`.
    pub shared: Option<MlpWeights>,
    pub shared_gate: Option<Tensor>,
}

pub struct MoeBlock {
    pub cfg: MoeConfig,
    pub router: Linear,
    pub gate_up: Weight,
    pub down: Weight,
    pub shared: Option<Mlp>,
    pub shared_gate: Option<Linear>,
    /// `score_bias` on the host: routing runs on the host in the CPU path.
    pub score_bias: Option<Vec<f32>>,
}

impl MoeBlock {
    pub fn new(cfg: MoeConfig, w: MoeWeights) -> Result<Self> {
        let score_bias = w
            .score_bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        Ok(MoeBlock {
            cfg,
            router: Linear::new(w.router),
            gate_up: w.gate_up,
            down: w.down,
            shared: w.shared.map(Mlp::new),
            shared_gate: w.shared_gate.map(Linear::new),
            score_bias,
        })
    }

    /// `x [B, T, H] -> ([B, T, H], routing)`
    /// Bytes of weights in memory (router, experts, shared experts).
    pub fn bytes(&self) -> usize {
        self.router.bytes()
            + self.gate_up.bytes()
            + self.down.bytes()
            + self.shared.as_ref().map_or(0, Mlp::bytes)
            + self.shared_gate.as_ref().map_or(0, Linear::bytes)
            + self.score_bias.as_ref().map_or(0, |b| 4 * b.len())
    }

    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Routing)> {
        let shape = x.shape().clone();
        let h = x.dim(candle_core::D::Minus1)?;
        let x = x.reshape(((), h))?; // [N, H]
                                     // Router logits [N, E] in the activation dtype as transformers computes them, or in f32
                                     // for families that keep the router in f32.
        let logits = if self.cfg.router_f32 {
            self.router.forward(&x.to_dtype(DType::F32)?)?
        } else {
            self.router.forward(&x)?
        };
        let routing = route(
            &logits,
            self.cfg.router,
            self.cfg.top_k,
            self.score_bias.as_deref(),
        )?;
        let d = dispatch(&routing.ids, self.cfg.top_k, self.cfg.num_experts)?;
        let y = experts::experts_w(&x, &d, &self.gate_up, &self.down)?; // [N*A, H], expert-sorted
        let mut out = combine(&y, &d, &routing)?; // [N, H]
        if let Some(shared) = &self.shared {
            let s = shared.forward(&x)?;
            let s = match &self.shared_gate {
                Some(g) => s.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward(&x)?)?)?,
                None => s,
            };
            out = (out + s)?;
        }
        Ok((out.reshape(shape)?, routing))
    }
}

/// A dense SwiGLU MLP `down(silu(gate x) * up x)` with gate and up fused into one matmul.
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn new(w: MlpWeights) -> Self {
        Mlp {
            gate_up: Linear::new(w.gate_up),
            down: Linear::new(w.down),
        }
    }

    /// `x [.., H] -> [.., H]`
    /// Bytes of weights in memory.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gu = self.gate_up.forward(x)?;
        let f = gu.dim(candle_core::D::Minus1)? / 2;
        let act = (candle_nn::ops::silu(&gu.narrow(candle_core::D::Minus1, 0, f)?)?
            * gu.narrow(candle_core::D::Minus1, f, f)?)?;
        self.down.forward(&act)
    }
}
