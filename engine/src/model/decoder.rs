//! The decoder stack, driven entirely by [`ModelConfig`]: embedding -> L x (norm, attention,
//! residual, norm, FFN or MoE, residual) -> norm -> lm_head.

use candle_core::{DType, Device, Result, Tensor, D};

use super::attention::Attention;
use super::moe::{MoeBlock, Routing};
use super::norm::RmsNorm;
use super::rope::Rope;
use super::{FfnWeights, Linear, ModelWeights};
use crate::config::{FfnKind, ModelConfig, NormKind};
use crate::runtime::kv_cache::KvCache;

enum Ffn {
    /// gate_up `[2F, H]`, down `[H, F]`
    Dense {
        gate_up: Linear,
        down: Linear,
    },
    Moe(MoeBlock),
}

struct Layer {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    ffn: Ffn,
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
    final_norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Model {
    /// Builds the model from canonical weights (already in `dtype` on `device`).
    pub fn new(cfg: ModelConfig, w: ModelWeights, dtype: DType, device: &Device) -> Result<Self> {
        let NormKind::Rms { eps } = cfg.norm;
        let rope = Rope::new(
            &cfg.rope,
            cfg.head_dim,
            cfg.max_position_embeddings,
            dtype,
            device,
        )?;
        let layers = w
            .layers
            .into_iter()
            .zip(&cfg.layers)
            .map(|(lw, kind)| {
                let ffn = match (lw.ffn, kind) {
                    (FfnWeights::Moe(mw), FfnKind::Moe(mc)) => {
                        Ffn::Moe(MoeBlock::new(mc.clone(), mw))
                    }
                    (FfnWeights::Dense { gate_up, down }, FfnKind::Dense { .. }) => Ffn::Dense {
                        gate_up: Linear::new(gate_up),
                        down: Linear::new(down),
                    },
                    _ => candle_core::bail!("layer weights do not match the config's layer kind"),
                };
                Ok(Layer {
                    attn_norm: RmsNorm::new(lw.attn_norm, eps),
                    attn: Attention {
                        q: Linear::new(lw.q),
                        k: Linear::new(lw.k),
                        v: Linear::new(lw.v),
                        o: Linear::new(lw.o),
                        num_heads: cfg.num_heads,
                        num_kv_heads: cfg.num_kv_heads,
                        head_dim: cfg.head_dim,
                        sliding_window: cfg.sliding_window,
                    },
                    ffn_norm: RmsNorm::new(lw.ffn_norm, eps),
                    ffn,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            embed: w.embed,
            layers,
            final_norm: RmsNorm::new(w.final_norm, eps),
            lm_head: Linear::new(w.lm_head),
            rope,
            dtype,
            device: device.clone(),
            cfg,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
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
        mut trace: Option<&mut Trace>,
    ) -> Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let pos = cache.len();
        if pos + t > cache.capacity() || pos + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{} tokens exceed the context ({} in the cache, max_position_embeddings {})",
                pos + t,
                cache.capacity(),
                self.cfg.max_position_embeddings
            )
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr.tokens = ids.elem_count();
            tr.router_ids.clear();
            tr.router_weights.clear();
        }
        let mut x = self
            .embed
            .embedding(&ids.flatten_all()?)?
            .reshape((ids.dim(0)?, t, ()))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer
                .attn
                .forward(&layer.attn_norm.forward(&x)?, pos, &self.rope, cache, i)?;
            x = (x + h)?;
            let h = layer.ffn_norm.forward(&x)?;
            let (h, routing) = match &layer.ffn {
                Ffn::Moe(moe) => {
                    let (y, r) = moe.forward(&h)?;
                    (y, Some(r))
                }
                Ffn::Dense { gate_up, down } => {
                    let gu = gate_up.forward(&h)?;
                    let f = gu.dim(D::Minus1)? / 2;
                    let act = (candle_nn::ops::silu(&gu.narrow(D::Minus1, 0, f)?)?
                        * gu.narrow(D::Minus1, f, f)?)?;
                    (down.forward(&act)?, None)
                }
            };
            if let Some(tr) = trace.as_deref_mut() {
                let r = routing.unwrap_or(Routing {
                    top_k: 0,
                    ids: vec![],
                    weights: vec![],
                });
                tr.router_ids.push(r.ids);
                tr.router_weights.push(r.weights);
            }
            x = (x + h)?;
        }
        cache.advance(t);
        let x = if all_logits {
            x
        } else {
            x.narrow(1, t - 1, 1)?
        };
        let x = self.final_norm.forward(&x)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }
}
