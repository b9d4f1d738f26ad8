//! The KV cache: per layer two tensors allocated once for the whole context and written in
//! place; nothing is concatenated or reallocated while decoding.
//! GQA: K and V `[B, kv, cap, hd]`. MLA: the compressed latent `[B, 1, cap, kv_lora_rank]` and
//! the shared rotated key `[B, 1, cap, qk_rope_head_dim]`; per-head K/V are never stored.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::ModelConfig;

pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Tokens already stored (the same for every layer between forward passes).
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (k_shape, v_shape) = match cfg.mla {
            Some(m) => (
                (batch, 1, capacity, m.kv_lora_rank),
                (batch, 1, capacity, m.qk_rope_head_dim),
            ),
            None => {
                let s = (batch, cfg.num_kv_heads, capacity, cfg.head_dim);
                (s, s)
            }
        };
        let layers = (0..cfg.num_layers())
            .map(|_| {
                Ok((
                    Tensor::zeros(k_shape, dtype, device)?,
                    Tensor::zeros(v_shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the cache (allocated, not just used).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Bytes one token occupies across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.bytes()
            / self.capacity.max(1)
            / self
                .layers
                .first()
                .map_or(1, |(k, _)| k.dim(0).unwrap_or(1))
    }

    /// Writes `k, v [B, heads, T, d]` (GQA K and V, or MLA latent and rope key) for positions
    /// `pos..pos+T` of `layer` and returns views of positions `0..pos+T`.
    pub fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if pos + t > self.capacity {
            candle_core::bail!(
                "KV cache overflow: {} tokens do not fit in {}",
                pos + t,
                self.capacity
            )
        }
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(k, 2, pos)?;
        vc.slice_set(v, 2, pos)?;
        Ok((kc.narrow(2, 0, pos + t)?, vc.narrow(2, 0, pos + t)?))
    }

    /// The whole preallocated K and V (or latent and rope key) of `layer`, `[B, heads, cap, d]`;
    /// only positions below the stored length are meaningful.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Marks `t` more tokens as stored (after every layer has written them).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    pub fn reset(&mut self) {
        self.len = 0;
    }
}
