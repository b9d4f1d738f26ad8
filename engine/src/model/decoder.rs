//! The decoder stack, driven entirely by [`ModelConfig`]: embedding -> L x (norm, attention,
//! residual, norm, FFN or MoE, residual) -> norm -> lm_head.

use candle_core::{DType, Device, Result, Tensor};

use super::attention::Attention;
use super::mla::{MlaAttention, MlaQuery};
use super::moe::{Mlp, MoeBlock};
use super::norm::Norm;
use super::rope::Rope;
use super::{AttnWeights, ExecPath, FfnWeights, Linear, ModelWeights, PathPlan};
use crate::config::{FfnKind, ModelConfig, NormKind, QkNorm};

/// DeepSeek's q_a_layernorm and kv_a_layernorm use a fixed eps, not `rms_norm_eps`.
const MLA_NORM_EPS: f64 = 1e-6;
use crate::model::kv_cache::{DecodeStep, KvCache};

/// The most positions the RoPE tables cover (1M: 256 MiB of f32 cos/sin at head_dim 128).
pub const ROPE_TABLE_POSITIONS: usize = 1 << 20;

enum Ffn {
    Dense(Mlp),
    Moe(Box<MoeBlock>),
}

enum Attn {
    Gqa(Attention),
    Mla(MlaAttention),
}

impl Attn {
    /// The per-token projections of `x [B, T, H]` (GQA: the fused qkv; MLA: q and the compressed
    /// KV), each `[B, T, ..]`.
    fn project(&self, x: &Tensor, plan: &PathPlan) -> Result<Vec<Tensor>> {
        Ok(match self {
            Attn::Gqa(a) => vec![a.project(x, plan)?],
            Attn::Mla(a) => {
                let (q, kv) = a.project(x, plan)?;
                vec![q, kv]
            }
        })
    }

    /// One sequence's attention from its rows of [`Attn::project`], writing `cache`; returns the
    /// input of the output projection.
    /// `step`: the decode step's table (GQA reads it; MLA takes `pos`).
    #[allow(clippy::too_many_arguments)]
    fn core(
        &self,
        p: &[Tensor],
        pos: usize,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        plan: &PathPlan,
        step: Option<&DecodeStep>,
    ) -> Result<Tensor> {
        match (self, p) {
            (Attn::Gqa(a), [qkv]) => {
                a.core(qkv, pos, rope, cache, layer, plan, step.map(|s| &s.table))
            }
            (Attn::Mla(a), [q, kv]) => a.core(q, kv, pos, rope, cache, layer, plan, step),
            _ => candle_core::bail!("attention projections do not match the attention kind"),
        }
    }

    fn out(&self) -> &Linear {
        match self {
            Attn::Gqa(a) => &a.o,
            Attn::Mla(a) => &a.o,
        }
    }
}

struct Layer {
    attn_norm: Norm,
    attn: Attn,
    ffn_norm: Norm,
    ffn: Ffn,
}

/// One sequence of a [`Model::forward_batch`] step: its new token ids and its own KV cache
/// (batch 1, sized for that sequence alone).
pub struct SeqStep<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// What a forward pass reports besides logits.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    /// Tokens in this pass (B*T).
    pub tokens: usize,
    /// Per layer, the routed expert ids of every token of this pass (`[N*A]`, token-major);
    /// empty for dense layers.
    pub router_ids: Vec<Vec<u32>>,
    /// The matching combine weights (`[N*A]` per layer).
    pub router_weights: Vec<Vec<f32>>,
}

pub struct Model {
    pub cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: Linear,
    rope: Rope,
    /// MLA models: `0..P` as u32 on the device (P = the RoPE tables' positions), from which a
    /// decode step builds its mask of the cache rows past its keys ([`DecodeStep`]).
    mla_positions: Option<Tensor>,
    dtype: DType,
    device: Device,
    /// Every execution-path choice of this model ([`PathPlan`]), made once at load.
    plan: PathPlan,
}

impl Model {
    /// Builds the model from canonical weights (already in `dtype` on `device`).
    pub fn new(cfg: ModelConfig, w: ModelWeights, dtype: DType, device: &Device) -> Result<Self> {
        let norm = cfg.norm;
        // QK-norms use the model's eps; MLA's latent norms use a fixed 1e-6 (as DeepSeek does).
        let rms = |w: Tensor, eps: f64| Norm::new(w, NormKind::Rms { eps });
        let rope_dim = cfg
            .mla
            .map_or(cfg.rope.rotary_dim.unwrap_or(cfg.head_dim), |m| {
                m.qk_rope_head_dim
            });
        // Tables for every position up to the context, or up to ROPE_TABLE_POSITIONS for the
        // multi-million-token contexts (Llama-4 Scout's 10M would be gigabytes of cos/sin).
        let positions = cfg.max_position_embeddings.min(ROPE_TABLE_POSITIONS);
        let rope = Rope::new(&cfg.rope, rope_dim, positions, dtype, device)?;
        let mla_positions = cfg
            .mla
            .map(|_| Tensor::arange(0u32, positions as u32, device))
            .transpose()?;
        // Llama-4's weightless QK-norm: one unit weight shared by every RoPE layer.
        let unit_weight = (cfg.attn.qk_norm == QkNorm::UnitAfterRope)
            .then(|| Tensor::ones(cfg.head_dim, dtype, device))
            .transpose()?;
        // Llama-4's query scale of NoPE layers per position, tabulated once like RoPE's cos/sin
        // (a decode step narrows it instead of uploading a new one).
        let temperature = match cfg.nope.as_ref().and_then(|n| n.temperature) {
            None => None,
            Some(t) => {
                let v: Vec<f32> = (0..positions).map(|p| t.scale(p) as f32).collect();
                Some(Tensor::from_vec(v, positions, device)?.to_dtype(dtype)?)
            }
        };
        let layers = w
            .layers
            .into_iter()
            .zip(&cfg.layers)
            .enumerate()
            .map(|(i, (lw, kind))| {
                let ffn = match (lw.ffn, kind) {
                    (FfnWeights::Moe(mw), FfnKind::Moe(mc)) => {
                        Ffn::Moe(Box::new(MoeBlock::new(mc.clone(), mw)?))
                    }
                    (FfnWeights::Dense(mlp), FfnKind::Dense { .. }) => Ffn::Dense(Mlp::new(mlp)),
                    _ => candle_core::bail!("layer weights do not match the config's layer kind"),
                };
                let attn = match (lw.attn, cfg.mla) {
                    (
                        AttnWeights::Gqa {
                            qkv,
                            qkv_bias,
                            q_norm,
                            k_norm,
                            o,
                            o_bias,
                            sinks,
                        },
                        None,
                    ) => {
                        if (cfg.attn.qk_norm == QkNorm::None || unit_weight.is_some())
                            != q_norm.is_none()
                        {
                            candle_core::bail!("QK-norm weights do not match the config's qk_norm");
                        }
                        let rope_on = cfg.rope_on(i);
                        // Llama-4's weightless QK-norm is an RMSNorm with unit weights, after
                        // RoPE, on the layers that apply RoPE only.
                        let (mut layer_cfg, mut q_norm, mut k_norm) = (
                            cfg.attn,
                            q_norm.map(|w| rms(w, norm.eps())),
                            k_norm.map(|w| rms(w, norm.eps())),
                        );
                        if let Some(ones) = &unit_weight {
                            layer_cfg.qk_norm = QkNorm::None;
                            if rope_on {
                                layer_cfg.qk_norm = QkNorm::PerHeadAfterRope;
                                q_norm = Some(rms(ones.clone(), norm.eps()));
                                k_norm = Some(rms(ones.clone(), norm.eps()));
                            }
                        }
                        Attn::Gqa(Attention {
                            qkv: Linear::with_bias(qkv, qkv_bias),
                            o: Linear::with_bias(o, o_bias),
                            sinks: sinks
                                .map(|s| -> Result<_> {
                                    Ok((s.to_vec1::<f32>()?, s.to_dtype(DType::F32)?))
                                })
                                .transpose()?,
                            q_norm,
                            k_norm,
                            cfg: layer_cfg,
                            num_heads: cfg.num_heads,
                            num_kv_heads: cfg.num_kv_heads,
                            head_dim: cfg.head_dim,
                            span: cfg.span_of(i),
                            rope: rope_on,
                            temperature: temperature.clone().filter(|_| !rope_on),
                        })
                    }
                    (AttnWeights::Mla(m), Some(mc)) => {
                        let (nh, dn, dr, dv) = (
                            cfg.num_heads,
                            mc.qk_nope_head_dim,
                            mc.qk_rope_head_dim,
                            mc.v_head_dim,
                        );
                        // One dense kv_b serves both paths: the expanded prefill's linear and
                        // the absorbed decode's per-head views of it. The loader keeps kv_b
                        // dense; one stored quantized is dequantized here, once.
                        let kv_b = m.kv_b.to_dense(dtype)?;
                        let (w_uk, w_uv) = MlaAttention::split_kv_b(&kv_b, nh, dn, dv)?;
                        Attn::Mla(MlaAttention {
                            q: match m.q {
                                crate::model::MlaQueryWeights::Plain(q) => {
                                    MlaQuery::Plain(Linear::new(q))
                                }
                                crate::model::MlaQueryWeights::LowRank { a, norm, b } => {
                                    MlaQuery::LowRank {
                                        a: Linear::new(a),
                                        norm: rms(norm, MLA_NORM_EPS),
                                        b: Linear::new(b),
                                    }
                                }
                            },
                            kv_a: Linear::new(m.kv_a),
                            kv_a_norm: rms(m.kv_a_norm, MLA_NORM_EPS),
                            kv_b: Linear::new(kv_b),
                            w_uk,
                            w_uv,
                            o: Linear::new(m.o),
                            num_heads: nh,
                            nope_dim: dn,
                            rope_dim: dr,
                            v_dim: dv,
                            latent_dim: mc.kv_lora_rank,
                            scale: ((dn + dr) as f64).powf(-0.5)
                                * cfg.rope.scaling.mla_softmax_scale(),
                        })
                    }
                    _ => candle_core::bail!(
                        "attention weights do not match the config's attention kind"
                    ),
                };
                Ok(Layer {
                    attn_norm: Norm::new(lw.attn_norm, norm),
                    attn,
                    ffn_norm: Norm::new(lw.ffn_norm, norm),
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = PathPlan::from_env(device)?;
        moe_kernels::set_gemv_kernel(plan.gemv);
        Ok(Model {
            embed: w.embed,
            layers,
            final_norm: Norm::new(w.final_norm, norm),
            lm_head: Linear::new(w.lm_head),
            rope,
            mla_positions,
            dtype,
            plan,
            device: device.clone(),
            cfg,
        })
    }

    /// Which implementation runs the hot ops ([`exec_path`]: kernels on CUDA, candle on the CPU,
    /// `MOE_EXEC_PATH` overrides).
    pub fn exec_path(&self) -> ExecPath {
        self.plan.exec
    }

    /// Every execution-path choice of this model.
    pub fn plan(&self) -> &PathPlan {
        &self.plan
    }

    /// The MoE layers' blocks in layer order (what `bench` times the expert kernel on).
    pub fn moe_blocks(&self) -> impl Iterator<Item = &super::moe::MoeBlock> {
        self.layers.iter().filter_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some(&**m),
            Ffn::Dense(_) => None,
        })
    }

    /// Hybrid placement: `per_layer[i]` (for MoE layers) says which routed experts of layer i stay
    /// on the model's device; the others move to host memory and run on the CPU kernels
    /// ([`MoeBlock::place`]). A `None` entry keeps every expert of that layer on the device.
    pub fn place_experts(&mut self, per_layer: &[Option<Vec<bool>>]) -> Result<()> {
        if per_layer.len() != self.layers.len() {
            candle_core::bail!(
                "expert placement for {} layers, the model has {}",
                per_layer.len(),
                self.layers.len()
            );
        }
        for (i, (l, p)) in self.layers.iter_mut().zip(per_layer).enumerate() {
            match (&mut l.ffn, p) {
                (Ffn::Moe(m), Some(on)) => m.place(on, &self.device)?,
                // No entry: every expert on the device (moved there if a placed load read it
                // into host memory).
                (Ffn::Moe(m), None) => m.place(&vec![true; m.cfg.num_experts], &self.device)?,
                (Ffn::Dense(_), Some(_)) => {
                    candle_core::bail!("expert placement for layer {i}, a dense layer")
                }
                (Ffn::Dense(_), None) => {}
            }
        }
        Ok(())
    }

    /// Sets the CPU kernels' level (`None`: the plain references and candle's own ops), as
    /// `MOE_PATH=simd|q8act|portable|reference` would at load.
    pub fn set_cpu_kernels(&mut self, level: Option<moe_kernels::cpu::Level>) {
        self.plan.cpu = level;
    }

    /// Switches the implementation of the hot ops (tests and the self-test compare the two).
    pub fn set_exec_path(&mut self, path: ExecPath) {
        self.plan.exec = path;
    }

    /// Overrides the CPU kernels' level (`MOE_PATH=simd|q8act|portable|reference` in-process; no
    /// effect on a GPU): e.g. f32 activations for quantized weights instead of the default int8.
    pub fn set_cpu_level(&mut self, level: Option<moe_kernels::cpu::Level>) {
        if self.device.is_cpu() {
            self.plan.cpu = level;
        }
    }

    /// The eps of `n` when the kernel path runs it as the RMSNorm kernel (an RMSNorm whose weight
    /// has the activations' dtype); `None` for candle's ops.
    fn kernel_rms_eps(&self, n: &Norm, x: &Tensor) -> Option<f32> {
        match n.kind {
            NormKind::Rms { eps }
                if self.plan.rms_norm_kernel(true, n.weight.dtype(), x.dtype()) =>
            {
                Some(eps as f32)
            }
            _ => None,
        }
    }

    /// `norm(x)` for a decoder-layer or final norm: the RMSNorm kernel on the kernel path.
    fn norm(&self, n: &Norm, x: &Tensor) -> Result<Tensor> {
        let Some(eps) = self.kernel_rms_eps(n, x) else {
            return n.forward(x);
        };
        let h = x.dim(candle_core::D::Minus1)?;
        moe_kernels::rms_norm(&x.reshape(((), h))?, &n.weight, eps)?.reshape(x.shape())
    }

    /// `(x + h, norm(x + h))`: the residual add fused into the next RMSNorm on the kernel path.
    fn add_norm(&self, n: &Norm, x: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let Some(eps) = self.kernel_rms_eps(n, x) else {
            let sum = (x + h)?;
            let out = n.forward(&sum)?;
            return Ok((sum, out));
        };
        let d = x.dim(candle_core::D::Minus1)?;
        let (sum, out) =
            moe_kernels::add_rms_norm(&h.reshape(((), d))?, &x.reshape(((), d))?, &n.weight, eps)?;
        Ok((sum.reshape(x.shape())?, out.reshape(x.shape())?))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of all weights in memory (quantized linears at their packed size; a tied lm_head
    /// counted once; MLA's per-head `w_uk`/`w_uv` are views of kv_b, not counted again).
    pub fn weight_bytes(&self) -> usize {
        use super::tensor_bytes;
        let norm = |n: &Norm| tensor_bytes(&n.weight);
        let mut total = tensor_bytes(&self.embed) + norm(&self.final_norm);
        let tied =
            matches!(&self.lm_head.weight, super::Weight::Dense(w) if w.id() == self.embed.id());
        if !tied {
            total += self.lm_head.bytes();
        }
        // Llama-4's weightless QK-norm holds unit weights the checkpoint does not have.
        let unit = self.cfg.attn.qk_norm == QkNorm::UnitAfterRope;
        for l in &self.layers {
            total += norm(&l.attn_norm) + norm(&l.ffn_norm);
            total += match &l.attn {
                Attn::Gqa(a) => {
                    let qk = match unit {
                        true => 0,
                        false => {
                            a.q_norm.as_ref().map_or(0, norm) + a.k_norm.as_ref().map_or(0, norm)
                        }
                    };
                    a.qkv.bytes()
                        + a.o.bytes()
                        + qk
                        + a.sinks.as_ref().map_or(0, |(_, s)| tensor_bytes(s))
                }
                Attn::Mla(a) => {
                    let q = match &a.q {
                        MlaQuery::Plain(q) => q.bytes(),
                        MlaQuery::LowRank { a, norm: n, b } => a.bytes() + norm(n) + b.bytes(),
                    };
                    q + a.kv_a.bytes() + norm(&a.kv_a_norm) + a.kv_b.bytes() + a.o.bytes()
                }
            };
            total += match &l.ffn {
                Ffn::Dense(m) => m.bytes(),
                Ffn::Moe(m) => m.bytes(),
            };
        }
        total
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.cfg, batch, capacity, self.dtype, &self.device)
    }

    /// Runs `ids [B, T]` at positions `cache.len()..+T`, appending to the cache. Returns f32
    /// logits `[B, T, V]` if `all_logits`, else only the last position's `[B, 1, V]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        all_logits: bool,
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        self.check_fits(cache.len(), t, cache.capacity())?;
        let step = self.step_table(cache, t)?;
        let step = step.map(|s| self.decode_step(cache, s)).transpose()?;
        let out = self.forward_at(ids, cache, all_logits, trace, step.as_ref())?;
        cache.advance(t);
        Ok(out)
    }

    /// Writes the step table of a batch-1 decode step at `cache.len()` into the cache's table
    /// (what [`Model::forward`] does first); `false` when this model's decode step takes none.
    pub fn write_step_table(&self, cache: &mut KvCache) -> Result<bool> {
        self.check_fits(cache.len(), 1, cache.capacity())?;
        Ok(self.step_table(cache, 1)?.is_some())
    }

    /// The decode step of `ids [B, 1]` at `cache.len()` with the step table the cache already holds
    /// ([`Model::write_step_table`]), neither writing the table nor advancing the cache: the pass a
    /// CUDA graph captures (every launch in it reads its per-step numbers from device memory, see
    /// [`Model::graph_blocker`]). Returns `[B, 1, V]` f32 logits.
    pub fn decode_step_in_place(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let Some(table) = cache.current_step() else {
            candle_core::bail!("no step table written for this decode step")
        };
        if ids.dim(1)? != 1 {
            candle_core::bail!("a decode step takes one token per sequence")
        }
        let step = self.decode_step(cache, table)?;
        self.forward_at(ids, cache, false, None, Some(&step))
    }

    /// The decode step of one token per sequence, `ids [B]` (u32 on the device), at each cache's
    /// `len()` with the step table it already holds ([`Model::write_step_table`] on each), neither
    /// writing the tables nor advancing the caches: the pass a CUDA graph captures at batch B > 1,
    /// as [`Model::forward_batch`] computes it (projections, MoE and lm_head once over the B tokens,
    /// the attention core per sequence from its table). Returns `[B, V]` f32 logits.
    pub fn decode_batch_in_place(
        &self,
        ids: &Tensor,
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        if ids.dims() != [caches.len()] {
            candle_core::bail!(
                "a batched decode step takes one token per sequence: ids {:?} for {} caches",
                ids.dims(),
                caches.len()
            )
        }
        let steps = caches
            .iter()
            .map(|c| match c.current_step() {
                Some(table) => self.decode_step(c, table),
                None => candle_core::bail!("no step table written for this decode step"),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut seqs: Vec<_> = caches
            .iter_mut()
            .zip(&steps)
            .map(|(c, st)| (1, &mut **c, Some(st)))
            .collect();
        let x = self.embed.embedding(ids)?.unsqueeze(0)?; // [1, B, H]
        let x = self.run_layers(
            x,
            |i, attn, xn| self.attend_seqs(attn, xn, i, &mut seqs),
            None,
        )?;
        self.logits(&x)?.squeeze(0)
    }

    /// Why this model's decode step cannot be replayed as one CUDA graph (something in it reads
    /// the position on the host or reads back to the host), or `None` when it can.
    pub fn graph_blocker(&self) -> Option<String> {
        if self.plan.exec != ExecPath::Kernels {
            return Some("the decode step runs candle's ops (the kernel path is off)".into());
        }
        if self.cfg.mla.is_some() && !self.plan.mla_absorbed(1) {
            return Some("MLA's expanded decode path takes its position on the host".into());
        }
        if self.cfg.mla.is_none() && !self.plan.decode_attention_kernel(1, self.cfg.head_dim) {
            return Some(format!(
                "head dim {} is past the decode attention kernel's limit",
                self.cfg.head_dim
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if let Attn::Gqa(a) = &l.attn {
                if a.rope && !a.rope_fuses(&self.rope, self.dtype) {
                    return Some(format!(
                        "layer {i}'s RoPE does not take the fused kernel (it takes the host's position)"
                    ));
                }
            }
            if let Ffn::Moe(m) = &l.ffn {
                if let Some(why) = m.graph_blocker(&self.plan) {
                    return Some(format!("layer {i}: {why}"));
                }
            }
        }
        None
    }

    /// Per layer, the key bound of the decode step at `cache.len()` ([`KvCache::key_bound`]): the
    /// steps with the same bounds launch the same kernels, so one captured graph serves them all.
    pub fn step_bounds(&self, cache: &KvCache) -> Vec<usize> {
        let len = cache.len() + 1;
        (0..self.layers.len())
            .map(|i| cache.key_bound(i, cache.attended(i, len, self.cfg.span_of(i)).0))
            .collect()
    }

    /// [`Model::forward`]'s pass at `cache.len()` with the step table `step`, without advancing
    /// the cache.
    fn forward_at(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        all_logits: bool,
        trace: Option<&mut Trace>,
        step: Option<&DecodeStep>,
    ) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let pos = cache.len();
        let x = self
            .embed
            .embedding(&ids.flatten_all()?)?
            .reshape((ids.dim(0)?, t, ()))?;
        let x = self.run_layers(
            x,
            |i, attn, xn| self.attend(attn, xn, pos, cache, i, step),
            trace,
        )?;
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        self.logits(&x)
    }

    /// One step of a ragged batch: every sequence's new tokens (a prompt chunk or one decoded
    /// token) at its own positions `cache.len()..`, attending only to its own cache, while the
    /// norms, projections and MoE stages see all `N = sum T_s` tokens at once (the experts read
    /// their weights once for the whole batch). Returns f32 logits `[S, V]` of each sequence's
    /// last new token. Each row is computed as a batch-1 [`Model::forward`] of that sequence
    /// would compute it, up to the kernels' summation order for N rows.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqStep<'_>],
        trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut last = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            if s.ids.is_empty() {
                candle_core::bail!("a sequence in the batch has no new tokens");
            }
            self.check_fits(s.cache.len(), s.ids.len(), s.cache.capacity())?;
            ids.extend_from_slice(s.ids);
            last.push((ids.len() - 1) as u32);
        }
        let n = ids.len();
        // Each decoding sequence's step table: its attention kernels read their position from it.
        let steps = seqs
            .iter_mut()
            .map(|s| {
                self.step_table(s.cache, s.ids.len())?
                    .map(|table| self.decode_step(s.cache, table))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        let x = self
            .embed
            .embedding(&Tensor::from_vec(ids, n, &self.device)?)?
            .unsqueeze(0)?; // [1, N, H]
        let mut views: Vec<_> = seqs
            .iter_mut()
            .zip(&steps)
            .map(|(s, st)| (s.ids.len(), &mut *s.cache, st.as_ref()))
            .collect();
        let x = self.run_layers(
            x,
            |i, attn, xn| self.attend_seqs(attn, xn, i, &mut views),
            trace,
        )?;
        for (t, cache, _) in views {
            cache.advance(t);
        }
        let s = last.len();
        // Every sequence's last token, [1, S, H]: all of x when each brought one (a decode step).
        let x = match s == n {
            true => x,
            false => x.index_select(&Tensor::from_vec(last, s, &self.device)?, 1)?,
        };
        self.logits(&x)?.squeeze(0)
    }

    /// Refuses `t` new tokens after `pos` cached ones beyond the cache or the context.
    fn check_fits(&self, pos: usize, t: usize, capacity: usize) -> Result<()> {
        if pos + t > ROPE_TABLE_POSITIONS {
            candle_core::bail!(
                "{} tokens exceed the {ROPE_TABLE_POSITIONS} positions this build tabulates RoPE for",
                pos + t
            )
        }
        if pos + t > capacity || pos + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{} tokens exceed the context ({} in the cache, max_position_embeddings {})",
                pos + t,
                capacity,
                self.cfg.max_position_embeddings
            )
        }
        Ok(())
    }

    /// The decode step's table ([`KvCache::step_table`]) when `t` new tokens make a decode step on
    /// the kernel path with GQA attention: the attention kernels read their position, key range and
    /// cache slot from it, so the step's launches are the same at every position (up to the key
    /// bound). `None` otherwise.
    fn step_table(&self, cache: &mut KvCache, t: usize) -> Result<Option<Tensor>> {
        let takes = match self.cfg.mla {
            None => self.plan.decode_attention_kernel(t, self.cfg.head_dim),
            Some(_) => self.plan.exec == ExecPath::Kernels && t == 1 && self.plan.mla_absorbed(1),
        };
        if !takes {
            return Ok(None);
        }
        cache
            .step_table(|i| self.cfg.span_of(i), &self.device)
            .map(Some)
    }

    /// The decode step's device inputs from its `table`: for MLA also the mask of the cache rows
    /// up to the key bound, `-1e30` where the row is at or past the table's key count (every MLA
    /// layer has the same keys and bound), computed on the device from the table.
    fn decode_step(&self, cache: &KvCache, table: Tensor) -> Result<DecodeStep> {
        let mla_mask = match &self.mla_positions {
            None => None,
            Some(positions) => {
                let bound = cache.key_bound(0, cache.len() + 1);
                let keys = table
                    .narrow(0, 0, 1)?
                    .narrow(1, moe_kernels::common::STEP_KEYS, 1)?
                    .flatten_all()?;
                let past = positions.narrow(0, 0, bound)?.broadcast_ge(&keys)?;
                Some((past.to_dtype(self.dtype)? * -1e30)?)
            }
        };
        Ok(DecodeStep { table, mla_mask })
    }

    /// The attention of layer `i` for `xn [1, N, H]`, the new tokens of the sequences `seqs` (new
    /// tokens, cache, decode step) one after another. The projections are per token: once over all
    /// N tokens, so each weight row is read once per step, not once per sequence; only the
    /// attention core is per sequence. One sequence is [`Model::attend`].
    fn attend_seqs(
        &self,
        attn: &Attn,
        xn: &Tensor,
        i: usize,
        seqs: &mut [(usize, &mut KvCache, Option<&DecodeStep>)],
    ) -> Result<Tensor> {
        if let [(_, cache, step)] = seqs {
            let pos = cache.len();
            return self.attend(attn, xn, pos, cache, i, *step);
        }
        let (rope, plan) = (&self.rope, &self.plan);
        let proj = attn.project(xn, plan)?;
        let mut parts = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for (t, cache, step) in seqs.iter_mut() {
            let (t, pos) = (*t, cache.len());
            let rows = proj
                .iter()
                .map(|p| p.narrow(1, off, t))
                .collect::<Result<Vec<_>>>()?;
            parts.push(attn.core(&rows, pos, rope, cache, i, plan, *step)?);
            off += t;
        }
        attn.out().forward_on(&Tensor::cat(&parts, 1)?, plan)
    }

    /// The attention of layer `i` for `xn [B, T, H]` at positions `pos..pos+T` of `cache`, with the
    /// decode step's table if there is one.
    fn attend(
        &self,
        attn: &Attn,
        xn: &Tensor,
        pos: usize,
        cache: &mut KvCache,
        i: usize,
        step: Option<&DecodeStep>,
    ) -> Result<Tensor> {
        let proj = attn.project(xn, &self.plan)?;
        let y = attn.core(&proj, pos, &self.rope, cache, i, &self.plan, step)?;
        attn.out().forward_on(&y, &self.plan)
    }

    /// The decoder layers over the embedded `x [B, T, H]`, attention through `attend(layer,
    /// attention, normed x)`; fills `trace` with every MoE layer's routing.
    fn run_layers(
        &self,
        mut x: Tensor,
        mut attend: impl FnMut(usize, &Attn, &Tensor) -> Result<Tensor>,
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        if let Some(tr) = trace.as_deref_mut() {
            tr.tokens = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
            tr.router_ids.clear();
            tr.router_weights.clear();
        }
        // A layer's FFN output joins the residual stream in the next layer's attention norm (one
        // add_rms_norm launch on the kernel path instead of an add and a norm); the last one after
        // the loop.
        let mut pending: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let xn = match pending.take() {
                Some(h) => {
                    let (sum, xn) = self.add_norm(&layer.attn_norm, &x, &h)?;
                    x = sum;
                    xn
                }
                None => self.norm(&layer.attn_norm, &x)?,
            };
            let h = attend(i, &layer.attn, &xn)?;
            let (sum, h) = self.add_norm(&layer.ffn_norm, &x, &h)?;
            x = sum;
            let (h, routing) = match &layer.ffn {
                Ffn::Moe(moe) => {
                    let (y, r) = moe.forward(&h, &self.plan)?;
                    (y, Some(r))
                }
                Ffn::Dense(mlp) => (mlp.forward(&h, &self.plan)?, None),
            };
            if let Some(tr) = trace.as_deref_mut() {
                // Routing statistics are the one thing that reads routing back to the host.
                let (ids, weights) = match routing {
                    Some(r) => {
                        let r = r.to_host()?;
                        (r.ids, r.weights)
                    }
                    None => (vec![], vec![]),
                };
                tr.router_ids.push(ids);
                tr.router_weights.push(weights);
            }
            pending = Some(h);
        }
        match pending {
            Some(h) => x + h,
            None => Ok(x),
        }
    }

    /// Final norm and lm_head: `[.., H] -> [.., V]` f32.
    fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm(&self.final_norm, x)?;
        self.lm_head
            .forward_on(&x, &self.plan)?
            .to_dtype(DType::F32)
    }
}
