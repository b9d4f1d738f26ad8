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
use crate::model::kv_cache::{DecodeStep, KvCache};

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

    /// `(nh, dn, dr, dv, r)`: heads, no-RoPE and RoPE query-key dims, value dim, latent rank.
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.num_heads,
            self.nope_dim,
            self.rope_dim,
            self.v_dim,
            self.latent_dim,
        )
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
        step: Option<&DecodeStep>,
    ) -> Result<Tensor> {
        let x = kv;
        let (b, t, _) = x.dims3()?;
        if let (
            Some(DecodeStep {
                table,
                mla_mask: Some(mask),
            }),
            1,
            true,
        ) = (step, t, plan.mla_absorbed(1))
        {
            let row = moe_kernels::StepRow { table, row: layer };
            return self.decode_step(q, kv, rope, cache, row, mask);
        }
        let (nh, dn, dr, dv, r) = self.dims();
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

    /// The absorbed decode step of one new token per sequence with its position and cache slot
    /// read from the step table `row` on the device: RoPE through the QK-norm+RoPE kernel, the
    /// cache write through kv_store, and the scores over the cache rows up to the key bound plus
    /// `mask` (`[bound]`, -1e30 on the rows past the step's keys: [`DecodeStep`]). No launch
    /// depends on the position below the bound (a CUDA graph can replay it); the masked rows
    /// weigh exactly 0, so the result is [`Self::core`]'s up to summation order.
    fn decode_step(
        &self,
        q: &Tensor,
        kv: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        row: moe_kernels::StepRow<'_>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        use moe_kernels::At;
        let b = kv.dim(0)?;
        let (nh, dn, dr, dv, r) = self.dims();
        let layer = row.row;
        let (cos, sin, interleaved) = rope.tables();
        let at = At::Step(row);
        let q = q.reshape((b, 1, nh, dn + dr))?; // [B, T=1, nh, dn+dr]
        let q_nope = q.narrow(D::Minus1, 0, dn)?.transpose(1, 2)?.contiguous()?; // [B, nh, 1, dn]
        let q_pe = moe_kernels::qk_norm_rope_at(
            &q.narrow(D::Minus1, dn, dr)?,
            None,
            cos,
            sin,
            at,
            interleaved,
        )?; // [B, nh, 1, dr]
        let c = self
            .kv_a_norm
            .forward(&kv.narrow(D::Minus1, 0, r)?)?
            .reshape((b, 1, 1, r))?;
        let k_pe = moe_kernels::qk_norm_rope_at(
            &kv.narrow(D::Minus1, r, dr)?.reshape((b, 1, 1, dr))?,
            None,
            cos,
            sin,
            at,
            interleaved,
        )?; // [B, 1, 1, dr]
        cache.store_at(layer, &c, &k_pe, at)?;
        // The rows up to the key bound; those past the step's keys are masked below.
        let keys = cache.len() + 1;
        let m = cache.key_bound(layer, keys);
        let (lat, pe) = cache.layer(layer);
        // [B, 1, m, r | dr]: views at batch 1, one copy each for a larger batch.
        let c_all = lat.narrow(2, 0, m)?.contiguous()?;
        let pe_all = pe.narrow(2, 0, m)?.contiguous()?;
        let per_head = |y: &Tensor, d: usize| y.transpose(0, 1)?.reshape((nh, b, d)); // [nh, B, d]
        let q_lat = per_head(&q_nope, dn)?.matmul(&self.w_uk)?; // [nh, B, r]
        let q_lat = q_lat
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, 1, nh, r))?;
        let nope = q_lat.matmul(&c_all.t()?)?; // [B, 1, nh, m]
        let pe_scores = q_pe.reshape((b, 1, nh, dr))?.matmul(&pe_all.t()?)?;
        let s = ((nope + pe_scores)? * self.scale)?;
        if mask.dims() != [m] {
            candle_core::bail!("the MLA step mask covers {:?} rows, not {m}", mask.dims());
        }
        let s = s.broadcast_add(&mask.to_dtype(s.dtype())?)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(kv.dtype())?;
        let lat = probs.matmul(&c_all)?; // [B, 1, nh, r]
        let lat = lat.reshape((b, nh, r))?.transpose(0, 1)?.contiguous()?; // [nh, B, r]
        let out = lat.matmul(&self.w_uv.t()?)?; // [nh, B, dv]
        out.transpose(0, 1)?.reshape((b, 1, nh * dv))
    }
}
