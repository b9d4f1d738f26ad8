//! Grouped-query attention with RoPE, an optional sliding window, and a preallocated KV cache.
//! Shapes: x `[B, T, H]`; q `[B, heads, T, hd]`; k, v `[B, kv, T, hd]`; cache `[B, kv, cap, hd]`.
//! The `g = heads / kv` query heads of one KV head are folded into the row dimension
//! (`[B, kv, g*T, hd]`) so K and V are never repeated in memory.

use candle_core::{DType, Device, Result, Tensor, D};

use super::norm::Norm;
use super::rope::Rope;
use super::{Linear, PathPlan};
use crate::config::{AttnConfig, QkNorm, Span};
use crate::model::kv_cache::KvCache;

#[derive(Debug, Clone)]
pub struct Attention {
    /// Fused q/k/v projection `[heads*hd + 2*kv*hd, H]` (+ bias).
    pub qkv: Linear,
    pub o: Linear,
    /// QK-norm weights as `cfg.qk_norm` says.
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub cfg: AttnConfig,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Which earlier keys a query sees (all, a sliding window, its chunk).
    pub span: Span,
    /// Whether this layer applies RoPE (Llama-4's NoPE layers do not).
    pub rope: bool,
    /// Llama-4's query scale by position on NoPE layers, tabulated `[positions]` in the activation
    /// dtype (`AttnTemperature::scale`).
    pub temperature: Option<Tensor>,
    /// gpt-oss's sink logit per head, on the host and as an f32 `[heads]` tensor on the device:
    /// one more logit in each softmax's denominator, with no value.
    pub sinks: Option<(Vec<f32>, Tensor)>,
}

impl Attention {
    /// Applies the QK-norm of `stage` to `x` if this model has one there.
    fn qk_norm(&self, x: Tensor, norm: &Option<Norm>, stage: QkNorm) -> Result<Tensor> {
        match norm {
            Some(n) if self.cfg.qk_norm == stage => n.forward(&x),
            _ => Ok(x),
        }
    }

    /// The fused q/k/v projection of `x [B, T, H]`: `[B, T, (heads + 2 kv) hd]`. Per token, so a
    /// ragged batch runs it once over all its sequences' tokens.
    pub fn project(&self, x: &Tensor, plan: &PathPlan) -> Result<Tensor> {
        self.qkv.forward_on(x, plan)
    }

    /// Everything between the projections for one sequence: QK-norm, RoPE, the cache write and
    /// the attention of `qkv [B, T, ..]` ([`Self::project`]'s output) at positions `pos..pos+T`
    /// to everything cached for `layer` plus themselves; returns `[B, T, heads*hd]`, the input of
    /// the output projection `o`. On [`ExecPath::Kernels`] a single new token per sequence runs
    /// the flash-decoding kernel (`moe_kernels::decode_attention`) over the cache in place.
    /// `step`: a kernel-path decode step's table ([`KvCache::step_table`]); the kernels then read
    /// this layer's position, key range and cache slot from its row `layer` as they run, so the
    /// step's launches do not depend on the position.
    #[allow(clippy::too_many_arguments)]
    pub fn core(
        &self,
        qkv: &Tensor,
        pos: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        plan: &PathPlan,
        step: Option<&Tensor>,
    ) -> Result<Tensor> {
        let x = qkv;
        let step = step.map(|table| moe_kernels::StepRow { table, row: layer });
        let at = step.map_or(moe_kernels::At::Host(pos), moe_kernels::At::Step);
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let g = nh / nkv;
        let q = qkv.narrow(D::Minus1, 0, nh * hd)?;
        let k = qkv.narrow(D::Minus1, nh * hd, nkv * hd)?;
        let v = qkv.narrow(D::Minus1, (nh + nkv) * hd, nkv * hd)?;
        let q = self.qk_norm(q, &self.q_norm, QkNorm::Whole)?;
        let k = self.qk_norm(k, &self.k_norm, QkNorm::Whole)?;
        let clip = |y: Tensor| match self.cfg.clip_qkv {
            Some(c) => y.clamp(-c, c),
            None => Ok(y),
        };
        let (q, k, v) = (clip(q)?, clip(k)?, clip(v)?);
        // [B, T, n*hd] -> [B, n, T, hd], with the per-head norms on either side of RoPE.
        let heads = |y: Tensor, n: usize, norm: &Option<Norm>, pos_emb: bool| -> Result<Tensor> {
            if plan.qk_norm_rope_kernel(pos_emb) {
                if let Some(out) = self.fused_norm_rope(&y, (b, t, n, hd), norm, rope, at)? {
                    return Ok(out);
                }
            }
            let y = self.qk_norm(y.reshape((b, t, n, hd))?, norm, QkNorm::PerHeadBeforeRope)?;
            let y = y.transpose(1, 2)?.contiguous()?;
            if !pos_emb {
                return Ok(y);
            }
            self.qk_norm(rope.apply(&y, pos)?, norm, QkNorm::PerHeadAfterRope)
        };
        let q = heads(q, nh, &self.q_norm, self.rope)?;
        let k = heads(k, nkv, &self.k_norm, self.rope)?;
        let q = match (&self.temperature, step) {
            (None, _) => q,
            // A decode step with a step table gathers its scale at the table's position on the
            // device (the launch does not depend on the position).
            (Some(table), Some(row)) => {
                let at = row
                    .table
                    .narrow(0, row.row, 1)?
                    .narrow(1, moe_kernels::common::STEP_POS, 1)?
                    .flatten_all()?;
                q.broadcast_mul(&table.index_select(&at, 0)?.reshape((1, 1, t, 1))?)?
            }
            (Some(table), None) => {
                q.broadcast_mul(&table.narrow(0, pos, t)?.reshape((1, 1, t, 1))?)?
            }
        };
        let v = heads(v, nkv, &None, false)?;
        let l = pos + t;
        let scale = 1.0 / (hd as f64).sqrt();
        if plan.decode_attention_kernel(t, hd) {
            let (keys, window) = cache.attended(layer, l, self.span);
            let keys = match step {
                // One kv_store launch; the attention launch sized for the key bound, not the keys.
                Some(row) => {
                    cache.store_at(layer, &k, &v, moe_kernels::At::Step(row))?;
                    let max = cache.key_bound(layer, keys);
                    moe_kernels::Keys::Step { row, max }
                }
                None => {
                    cache.store(layer, &k, &v, pos)?;
                    moe_kernels::Keys::Host { len: keys, window }
                }
            };
            let (kc, vc) = cache.layer(layer); // [B, kv, slots, hd]
            let sinks = self.sinks.as_ref().map(|(_, s)| s);
            let out = moe_kernels::decode_attention_keys(&q, kc, vc, keys, scale as f32, sinks)?;
            return out.reshape((b, 1, nh * hd)); // [B, nh, 1, hd] -> [B, 1, nh*hd]
        }

        // Keys before the first new query's first visible key are invisible to every new query.
        let start = self.span.first_visible(pos);
        let (k_all, v_all) = cache.write(layer, &k, &v, pos, start)?; // [B, kv, l - start, hd]

        // [B, heads, T, hd] -> [B, kv, g*T, hd]: heads h = j*g + i share kv head j.
        // A CPU prefill computes the scores and the weighted sum in f32 whatever the model's dtype:
        // candle's CPU matmul has no 16-bit kernel and widened its operands on every call (a bf16
        // random-Mixtral prefill of 512 tokens went from 289 to 526 tok/s); the result is rounded
        // back once. A decode step keeps the cache's dtype: widening the whole cache per step cost
        // more than the one-row products it serves.
        let core = if x.device().is_cpu() && t > 1 {
            DType::F32
        } else {
            x.dtype()
        };
        let q = q.reshape((b, nkv, g * t, hd))?.to_dtype(core)?;
        let (k_all, v_all) = (k_all.to_dtype(core)?, v_all.to_dtype(core)?);
        let raw = q.matmul(&k_all.t()?)?; // [B, kv, g*T, L']
        let probs = if x.device().is_cpu() && core == DType::F32 {
            let (span, cols) = (self.span, l - start);
            let sinks = self.sinks.as_ref().map(|(h, _)| h.as_slice());
            causal_softmax_cpu(&raw, scale as f32, cols, |r| {
                // Row r is query pos + (r % T) of head (r / T) % heads (rows run (batch, kv,
                // group, token)); it sees keys max(start, first visible) ..= p.
                let p = pos + r % t;
                let lo = span.first_visible(p).max(start);
                let sink = sinks.and_then(|s| s.get((r / t) % nh).copied());
                (lo - start, (p + 1).min(l) - start, sink)
            })?
        } else {
            let scores = (raw * scale)?;
            let scores = match causal_mask(t, g, pos, start, l, self.span, x.device())? {
                Some(mask) => scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?,
                None => scores,
            };
            let scores = scores.to_dtype(DType::F32)?;
            match &self.sinks {
                None => candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(core)?,
                Some((_, s)) => {
                    // One more column per row, the row's head's sink, softmaxed with the
                    // scores and dropped.
                    let (bb, _, rows, cols) = scores.dims4()?;
                    let col = s
                        .reshape((nkv, g, 1))?
                        .broadcast_as((nkv, g, t))?
                        .reshape((1, nkv, rows, 1))?
                        .broadcast_as((bb, nkv, rows, 1))?;
                    let all = Tensor::cat(&[&scores, &col], 3)?;
                    candle_nn::ops::softmax_last_dim(&all)?
                        .narrow(3, 0, cols)?
                        .to_dtype(core)?
                }
            }
        };
        let out = probs.matmul(&v_all.contiguous()?)?.to_dtype(x.dtype())?; // [B, kv, g*T, hd]
        out.reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))
    }

    /// Whether this layer's RoPE (with its per-head QK-norm, if any) takes the fused kernel for
    /// activations of `dtype`: head dims the kernel stages in shared memory, tables of `dtype` no
    /// wider than half a head (partial rotary included), an RMS per-head norm in `dtype`. The one
    /// test both the kernel path and [`crate::model::Model::graph_blocker`] use: where it fails,
    /// RoPE takes the host's position.
    pub fn rope_fuses(&self, rope: &Rope, dtype: DType) -> bool {
        use crate::config::NormKind;
        let (cos, _, _) = rope.tables();
        let norm_ok = match self.cfg.qk_norm {
            QkNorm::PerHeadBeforeRope | QkNorm::PerHeadAfterRope => {
                [&self.q_norm, &self.k_norm].iter().all(|n| {
                    n.as_ref().is_none_or(|n| {
                        matches!(n.kind, NormKind::Rms { .. }) && n.weight.dtype() == dtype
                    })
                })
            }
            _ => true,
        };
        self.head_dim <= moe_kernels::rope::QK_NORM_ROPE_MAX_D
            && cos.dtype() == dtype
            && cos.dim(1).is_ok_and(|h| 2 * h <= self.head_dim)
            && norm_ok
    }

    /// The per-head QK-norm (if this model has one around RoPE) and RoPE in one kernel,
    /// `[B, T, n*hd] -> [B, n, T, hd]`; `None` where the kernel does not apply (a whole-projection
    /// norm is applied before this, so RoPE alone is fused then).
    fn fused_norm_rope(
        &self,
        y: &Tensor,
        (b, t, n, hd): (usize, usize, usize, usize),
        norm: &Option<Norm>,
        rope: &Rope,
        pos: moe_kernels::At<'_>,
    ) -> Result<Option<Tensor>> {
        use crate::config::NormKind;
        if !self.rope_fuses(rope, y.dtype()) || hd != self.head_dim {
            return Ok(None);
        }
        let head_norm = match (norm, self.cfg.qk_norm) {
            (Some(nm), QkNorm::PerHeadBeforeRope | QkNorm::PerHeadAfterRope) => match nm.kind {
                NormKind::Rms { eps } => Some(moe_kernels::HeadNorm {
                    weight: &nm.weight,
                    eps: eps as f32,
                    after_rope: self.cfg.qk_norm == QkNorm::PerHeadAfterRope,
                }),
                _ => return Ok(None), // not reached: rope_fuses checked the kind
            },
            _ => None,
        };
        let (cos, sin, interleaved) = rope.tables();
        let x = y.reshape((b, t, n, hd))?;
        moe_kernels::qk_norm_rope_at(&x, head_norm, cos, sin, pos, interleaved).map(Some)
    }
}

/// Additive mask `[g*T, L-start]` (0 or -inf) for queries at `pos..pos+T` over keys
/// `start..L`; row r is query `r % T` (the g heads of a group are stacked). A query at p sees
/// key j iff `span.first_visible(p) <= j <= p`. `None` when nothing is masked.
/// `softmax(scale * raw)` over each row's visible keys `visible(row) = (lo, hi, sink)` (columns
/// `lo..hi` of `cols`), zero elsewhere: the CPU prefill's scale, causal (and sliding-window) mask
/// and softmax in one pass over f32 scores, computing exp only where a key is visible. The same
/// arithmetic as scaling, adding a -inf mask and `softmax_last_dim` (max, exp(x - max), sum,
/// divide), on rows in parallel. A `sink` logit joins the max and the denominator only.
fn causal_softmax_cpu(
    raw: &Tensor,
    scale: f32,
    cols: usize,
    visible: impl Fn(usize) -> (usize, usize, Option<f32>) + Sync,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let shape = raw.shape().clone();
    let mut v: Vec<f32> = raw.flatten_all()?.to_vec1()?;
    if cols == 0 {
        return Tensor::from_vec(v, shape, raw.device());
    }
    v.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let (lo, hi, sink) = visible(r);
        let (lo, hi) = (lo.min(cols), hi.min(cols));
        let mut max = sink.unwrap_or(f32::NEG_INFINITY);
        for x in &mut row[lo..hi] {
            *x *= scale;
            max = max.max(*x);
        }
        let mut sum = sink.map_or(0.0, |s| (s - max).exp());
        for x in &mut row[lo..hi] {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in &mut row[lo..hi] {
            *x /= sum;
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
    });
    Tensor::from_vec(v, shape, raw.device())
}

pub(crate) fn causal_mask(
    t: usize,
    g: usize,
    pos: usize,
    start: usize,
    l: usize,
    span: Span,
    device: &Device,
) -> Result<Option<Tensor>> {
    let visible = |p: usize, j: usize| j <= p && j >= span.first_visible(p);
    let width = l - start;
    let mut mask = Vec::with_capacity(g * t * width);
    let mut any = false;
    for _ in 0..g {
        for i in 0..t {
            for j in start..l {
                let ok = visible(pos + i, j);
                any |= !ok;
                mask.push(if ok { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    if !any {
        return Ok(None);
    }
    Tensor::from_vec(mask, (g * t, width), device).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_windowed() {
        // 3 new queries at positions 2,3,4 over keys 0..5, window 2 -> start = 1.
        let m = causal_mask(3, 1, 2, 1, 5, Span::Sliding(2), &Device::Cpu)
            .unwrap()
            .unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(m[0], vec![0., 0., inf, inf]); // q=2 sees keys 1,2
        assert_eq!(m[1], vec![inf, 0., 0., inf]); // q=3 sees 2,3
        assert_eq!(m[2], vec![inf, inf, 0., 0.]); // q=4 sees 3,4
    }

    /// The fused CPU softmax equals scaling, adding the mask and candle's softmax: causal and
    /// windowed, several kv groups, a cached prefix (pos > 0).
    #[test]
    fn fused_causal_softmax_equals_mask_then_softmax() {
        for (t, g, pos, span) in [
            (5usize, 2usize, 0usize, Span::Full),
            (4, 3, 6, Span::Full),
            (6, 2, 3, Span::Sliding(4)),
            (7, 2, 3, Span::Chunked(4)),
            (3, 1, 9, Span::Chunked(4)),
        ] {
            let l = pos + t;
            let start = span.first_visible(pos);
            let cols = l - start;
            let raw = Tensor::randn(0f32, 3.0, (2, 1, g * t, cols), &Device::Cpu).unwrap();
            let scale = 0.37f32;
            let want = {
                let s = (&raw * scale as f64).unwrap();
                let s = match causal_mask(t, g, pos, start, l, span, &Device::Cpu).unwrap() {
                    Some(m) => s.broadcast_add(&m).unwrap(),
                    None => s,
                };
                candle_nn::ops::softmax_last_dim(&s).unwrap()
            };
            let got = causal_softmax_cpu(&raw, scale, cols, |r| {
                let p = pos + r % t;
                let lo = span.first_visible(p).max(start);
                (lo - start, (p + 1).min(l) - start, None)
            })
            .unwrap();
            let (w, gt): (Vec<f32>, Vec<f32>) = (
                want.flatten_all().unwrap().to_vec1().unwrap(),
                got.flatten_all().unwrap().to_vec1().unwrap(),
            );
            for (a, b) in w.iter().zip(&gt) {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "t {t} g {g} pos {pos} span {span:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn single_decode_step_needs_no_mask() {
        assert!(causal_mask(1, 4, 7, 0, 8, Span::Full, &Device::Cpu)
            .unwrap()
            .is_none());
        // With a window, the narrowing to `start` already hides the old keys.
        assert!(causal_mask(1, 4, 7, 4, 8, Span::Sliding(4), &Device::Cpu)
            .unwrap()
            .is_none());
    }

    #[test]
    fn mask_rows_repeat_per_group() {
        let m = causal_mask(2, 3, 0, 0, 2, Span::Full, &Device::Cpu)
            .unwrap()
            .unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(m.len(), 6);
        for (r, row) in m.iter().enumerate() {
            assert_eq!(row[1] == 0.0, r % 2 == 1);
        }
    }
}
