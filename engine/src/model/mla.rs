//! DeepSeek multi-head latent attention (MLA) with a compressed KV cache.
//! Legend: B batch, T new tokens, L cached + new, H hidden, nh heads, dn/dr = per-head no-RoPE /
//! RoPE query-key dims, dv value dim, r = kv_lora_rank.
//!
//! Per token the cache holds only c = RMSNorm(x W_kva[:r]) `[r]` and the rotated shared key
//! k_pe `[dr]`. Per head, k_nope = W_uk c and v = W_uv c, where kv_b_proj = [W_uk; W_uv].
//! - Expanded path (prefill, T > 1, compute-bound): materialise k_nope and v for the L tokens
//!   with one kv_b_proj matmul, then ordinary attention.
//! - Absorbed path (decode, T = 1, bandwidth-bound): fold W_uk into the query
//!   (q_lat = q_nope W_uk, `[nh, r]`) and W_uv into the output (out = (P c) W_uv^T), so the
//!   cached tokens are only ever read as c and k_pe: no per-head K/V exists for them.
//!   Scores are q_lat . c + q_pe . k_pe either way.

use candle_core::{DType, Result, Tensor, D};

use super::attention::causal_mask;
use super::norm::Norm;
use super::rope::Rope;
use super::{Linear, PathPlan};
use crate::model::kv_cache::KvCache;

pub enum MlaQuery {
    /// `q_proj [nh*(dn+dr), H]`
    Plain(Linear),
    /// `q_b_proj(RMSNorm(q_a_proj x))`: `[qr, H]`, norm `[qr]`, `[nh*(dn+dr), qr]`
    LowRank { a: Linear, norm: Norm, b: Linear },
}

pub struct MlaAttention {
    pub q: MlaQuery,
    /// `kv_a_proj_with_mqa [r + dr, H]`: latent rows first, then the shared rope key.
    pub kv_a: Linear,
    /// RMSNorm over the latent `[r]`.
    pub kv_a_norm: Norm,
    /// `kv_b_proj [nh*(dn+dv), r]` (per head: dn rows of W_uk, then dv rows of W_uv).
    pub kv_b: Linear,
    /// `[nh, dn, r]` and `[nh, dv, r]`: kv_b_proj split per head for the absorbed path, as
    /// strided views of `kv_b`'s storage (no second copy; `kv_b` is always dense).
    pub w_uk: Tensor,
    pub w_uv: Tensor,
    /// `o_proj [H, nh*dv]`
    pub o: Linear,
    pub num_heads: usize,
    pub nope_dim: usize,
    pub rope_dim: usize,
    pub v_dim: usize,
    pub latent_dim: usize,
    /// (dn+dr)^-0.5, times YaRN's mscale^2 where the config asks for it.
    pub scale: f64,
}

impl MlaAttention {
    /// `kv_b [nh*(dn+dv), r]` (contiguous) split into the per-head absorption matrices: views
    /// sharing its storage, batch stride (dn+dv)*r, which batched matmul takes as they are.
    pub fn split_kv_b(kv_b: &Tensor, nh: usize, dn: usize, dv: usize) -> Result<(Tensor, Tensor)> {
        let r = kv_b.dim(1)?;
        let per_head = kv_b.reshape((nh, dn + dv, r))?;
        Ok((per_head.narrow(1, 0, dn)?, per_head.narrow(1, dn, dv)?))
    }

    /// The per-token projections of `x [B, T, H]`: the query `[B, T, nh*(dn+dr)]` (through the
    /// low-rank path if any) and the compressed KV `[B, T, r+dr]`. A ragged batch runs them once
    /// over all its sequences' tokens.
    pub fn project(&self, x: &Tensor, plan: &PathPlan) -> Result<(Tensor, Tensor)> {
        let q = match &self.q {
            MlaQuery::Plain(q) => q.forward_on(x, plan)?,
            MlaQuery::LowRank { a, norm, b } => {
                b.forward_on(&norm.forward(&a.forward_on(x, plan)?)?, plan)?
            }
        };
        Ok((q, self.kv_a.forward_on(x, plan)?))
    }

    /// The attention of one sequence from [`Self::project`]'s `q` and `kv` at positions
    /// `pos..pos+T`, appending (c, k_pe) to the cache; returns `[B, T, nh*dv]`, the input of `o`.
    #[allow(clippy::too_many_arguments)]
    pub fn core(
        &self,
        q: &Tensor,
        kv: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        plan: &PathPlan,
    ) -> Result<Tensor> {
        let x = kv;
        let (b, t, _) = x.dims3()?;
        let (nh, dn, dr, dv, r) = (
            self.num_heads,
            self.nope_dim,
            self.rope_dim,
            self.v_dim,
            self.latent_dim,
        );
        let q = q.reshape((b, t, nh, dn + dr))?.transpose(1, 2)?; // [B, nh, T, dn+dr]
        let q_nope = q.narrow(D::Minus1, 0, dn)?.contiguous()?;
        let q_pe = rope.apply(&q.narrow(D::Minus1, dn, dr)?, pos)?;

        let c = self
            .kv_a_norm
            .forward(&kv.narrow(D::Minus1, 0, r)?)?
            .unsqueeze(1)?
            .contiguous()?;
        let k_pe = rope.apply(&kv.narrow(D::Minus1, r, dr)?.unsqueeze(1)?, pos)?; // [B, 1, T, dr]
        let (c_all, pe_all) = cache.write(layer, &c, &k_pe, pos, 0)?; // [B, 1, L, r], [B, 1, L, dr]
        let l = pos + t;

        // Rope part, shared key for every head: [B, 1, nh*T, dr] x [B, 1, dr, L].
        let pe_scores = q_pe
            .reshape((b, 1, nh * t, dr))?
            .matmul(&pe_all.t()?)?
            .reshape((b, nh, t, l))?;
        let mask = causal_mask(t, 1, pos, 0, l, crate::config::Span::Full, x.device())?;
        let softmax = |nope_scores: Tensor| -> Result<Tensor> {
            let s = ((nope_scores + &pe_scores)? * self.scale)?;
            let s = match &mask {
                Some(m) => s.broadcast_add(&m.to_dtype(s.dtype())?)?,
                None => s,
            };
            candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
        };

        let out = if plan.mla_absorbed(t) {
            // q_lat[h] = q_nope[h] W_uk[h]: heads as the batch of one matmul.
            let per_head = |y: &Tensor, d: usize| y.transpose(0, 1)?.reshape((nh, b * t, d)); // [nh, B*T, d]
            let from_heads = |y: Tensor, d: usize| y.reshape((nh, b, t, d))?.transpose(0, 1); // [B, nh, T, d]
            let q_lat = from_heads(per_head(&q_nope, dn)?.matmul(&self.w_uk)?, r)?; // [B, nh, T, r]
            let c_all = c_all.contiguous()?;
            let nope = q_lat
                .contiguous()?
                .reshape((b, 1, nh * t, r))?
                .matmul(&c_all.t()?)?
                .reshape((b, nh, t, l))?;
            let probs = softmax(nope)?; // [B, nh, T, L]
            let lat = probs
                .reshape((b, 1, nh * t, l))?
                .matmul(&c_all)?
                .reshape((b, nh, t, r))?;
            let out = per_head(&lat, r)?.matmul(&self.w_uv.t()?)?; // [nh, B*T, dv]
            from_heads(out, dv)? // [B, nh, T, dv]
        } else {
            let kv = self.kv_b.forward_on(&c_all.squeeze(1)?, plan)?; // [B, L, nh*(dn+dv)]
            let kv = kv.reshape((b, l, nh, dn + dv))?.transpose(1, 2)?; // [B, nh, L, dn+dv]
            let k_nope = kv.narrow(D::Minus1, 0, dn)?.contiguous()?;
            let v = kv.narrow(D::Minus1, dn, dv)?.contiguous()?;
            let probs = softmax(q_nope.matmul(&k_nope.t()?)?)?;
            probs.matmul(&v)? // [B, nh, T, dv]
        };
        out.transpose(1, 2)?.reshape((b, t, nh * dv))
    }
}
