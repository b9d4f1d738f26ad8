//! The KV cache: per layer two tensors allocated once and written in place; nothing is
//! reallocated while decoding.
//! GQA: K and V `[B, kv, slots, hd]`. MLA: the compressed latent `[B, 1, slots, kv_lora_rank]`
//! and the shared rotated key `[B, 1, slots, qk_rope_head_dim]`; per-head K/V are never stored.
//!
//! Without a sliding window a slot is a position (`slots` = capacity). With a window W the cache
//! is a ring of `min(capacity, W)` slots: position p lives in slot `p % W`, so a sequence of any
//! length holds at most W positions, which is all a query can see (it attends to p - W + 1..=p).

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{ModelConfig, Span};

/// What a kernel-path decode step reads from the device instead of the host: the step table
/// ([`KvCache::step_table`]) and, for MLA, the additive mask of the cache rows up to the key bound
/// (`-1e30` on the rows past the step's keys), computed once per step for every layer.
#[derive(Clone)]
pub struct DecodeStep {
    pub table: Tensor,
    pub mla_mask: Option<Tensor>,
}

pub struct KvCache {
    layers: Vec<Layer>,
    /// Tokens already stored (the same for every layer between forward passes).
    len: usize,
    capacity: usize,
    /// The decode step's table on the cache's device, allocated once and rewritten in place before each
    /// kernel-path decode step ([`Self::step_table`]).
    step: Option<Tensor>,
    /// The keys [`Self::key_bound`] sizes launches for at least ([`Self::set_key_floor`]).
    key_floor: usize,
}

struct Layer {
    k: Tensor,
    v: Tensor,
    /// The sliding window that makes this layer a ring of `slots` positions, if any.
    ring: Option<usize>,
    slots: usize,
}

impl KvCache {
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layers = (0..cfg.num_layers())
            .map(|i| {
                // MLA models have no window; a GQA layer's window bounds what it keeps.
                let ring = cfg.window_of(i).filter(|_| cfg.mla.is_none());
                let slots = ring.map_or(capacity, |w| capacity.min(w));
                let (k_shape, v_shape) = match cfg.mla {
                    Some(m) => (
                        (batch, 1, slots, m.kv_lora_rank),
                        (batch, 1, slots, m.qk_rope_head_dim),
                    ),
                    None => {
                        let s = (batch, cfg.num_kv_heads, slots, cfg.head_dim);
                        (s, s)
                    }
                };
                Ok(Layer {
                    k: Tensor::zeros(k_shape, dtype, device)?,
                    v: Tensor::zeros(v_shape, dtype, device)?,
                    ring,
                    slots,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            step: None,
            key_floor: 0,
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
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Bytes one cached position occupies across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes()
                    / l.slots.max(1)
                    / l.k.dim(0).unwrap_or(1).max(1)
            })
            .sum()
    }

    /// Positions `layer` holds at most (the capacity, or its window when it is a ring).
    pub fn slots(&self, layer: usize) -> usize {
        self.layers[layer].slots
    }

    /// Writes `k, v [B, heads, T, d]` (GQA K and V, or MLA latent and rope key) for positions
    /// `pos..pos+T` of `layer` and returns the keys and values of positions `from..pos+T` in
    /// position order (`from` >= `pos + 1 - W` with a window W: older ones are gone). Without a
    /// window these are views of the cache; a ring gathers the old positions before the new ones
    /// overwrite their slots, then appends the new ones.
    pub fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        pos: usize,
        from: usize,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if pos + t > self.capacity {
            candle_core::bail!(
                "KV cache overflow: {} tokens do not fit in {}",
                pos + t,
                self.capacity
            )
        }
        let Some(w) = self.layers[layer].ring else {
            self.store(layer, k, v, pos)?;
            let l = &self.layers[layer];
            return Ok((
                l.k.narrow(2, from, pos + t - from)?,
                l.v.narrow(2, from, pos + t - from)?,
            ));
        };
        if from + w <= pos {
            candle_core::bail!("positions {from}..{pos} are older than the window of {w}")
        }
        let l = &self.layers[layer];
        let (kc, vc) = (&l.k, &l.v);
        let old = |c: &Tensor, new: &Tensor| -> Result<Tensor> {
            let mut parts = ring_runs(l.slots, from, pos, w, |s, n| c.narrow(2, s, n))?;
            parts.push(new.clone());
            Tensor::cat(&parts, 2)
        };
        let (k_all, v_all) = (old(kc, k)?, old(vc, v)?);
        self.store(layer, k, v, pos)?;
        Ok((k_all, v_all))
    }

    /// Writes positions `pos..pos+T` of `layer` without reading anything back (a decode kernel
    /// reads the cache in place; see [`Self::attended`]).
    pub fn store(&mut self, layer: usize, k: &Tensor, v: &Tensor, pos: usize) -> Result<()> {
        let t = k.dim(2)?;
        let l = &self.layers[layer];
        let (kc, vc) = (&l.k, &l.v);
        let Some(w) = l.ring else {
            kc.slice_set(k, 2, pos)?;
            return vc.slice_set(v, 2, pos);
        };
        // Only the last W new positions survive; each run of slots is one contiguous write.
        let keep = t.min(w);
        let first = pos + t - keep;
        let mut done = 0;
        for (slot, n) in ring_runs(l.slots, first, pos + t, w, |s, n| Ok((s, n)))? {
            let src = first - pos + done;
            kc.slice_set(&k.narrow(2, src, n)?.contiguous()?, 2, slot)?;
            vc.slice_set(&v.narrow(2, src, n)?.contiguous()?, 2, slot)?;
            done += n;
        }
        Ok(())
    }

    /// Slots a decode step at `len` stored positions (the new one included) attends to in place
    /// (slots `0..keys`), and the window of last keys it must still apply. A sliding window's
    /// ring holds exactly the visible positions (in slot order, which attention does not depend
    /// on); a chunk starts at a multiple of the ring's size, so the query's chunk is slots
    /// `0..=p % c`. Either way no window is left to apply.
    pub fn attended(&self, layer: usize, len: usize, span: Span) -> (usize, Option<usize>) {
        let l = &self.layers[layer];
        match (l.ring, span) {
            (_, Span::Full) => (len, None),
            (Some(_), Span::Chunked(c)) => ((len - 1) % c + 1, None),
            (Some(_), Span::Sliding(_)) => (len.min(l.slots), None),
            (None, s) => (len, Some(len - s.first_visible(len - 1))),
        }
    }

    /// The table of the decode step at position `len` (u32 `[layers, 4]`, moe-kernels' `STEP_*` columns): per
    /// layer the position, the first key and the number of cache rows the new token attends to in place (as
    /// [`Self::attended`] says) and the slot its key and value go to. Written into one tensor on `device`
    /// that lives as long as the cache (the same buffer at every step, which a captured CUDA graph needs); the
    /// kernels read it as they run. `span(layer)` is each layer's attention span.
    pub fn step_table(&mut self, span: impl Fn(usize) -> Span, device: &Device) -> Result<Tensor> {
        let (pos, len) = (self.len, self.len + 1);
        let mut rows = Vec::with_capacity(self.layers.len() * 4);
        for (i, l) in self.layers.iter().enumerate() {
            let (keys, window) = self.attended(i, len, span(i));
            let first = moe_kernels::attention::window_start(keys, window);
            let slot = l.ring.map_or(pos, |w| pos % w);
            for v in [pos, first, keys, slot] {
                rows.push(u32::try_from(v).map_err(|_| {
                    candle_core::Error::Msg(format!("position {v} exceeds the step table's u32"))
                })?);
            }
        }
        match &self.step {
            // One host-to-device copy into the buffer the kernels (and a captured graph) read.
            Some(t) if t.device().same_device(device) => crate::model::host::write_u32(t, &rows)?,
            _ => self.step = Some(Tensor::from_vec(rows, (self.layers.len(), 4), device)?),
        }
        match &self.step {
            Some(t) => Ok(t.clone()),
            None => candle_core::bail!("the step table was not written"),
        }
    }

    /// The table [`Self::step_table`] last wrote, if any.
    pub fn current_step(&self) -> Option<Tensor> {
        self.step.clone()
    }

    /// The bound a decode step's attention launch is sized for when its keys come from the step table:
    /// `keys` rounded up to a power of two (at least one kernel chunk), at most the layer's slots. A
    /// launch, and so a captured graph, serves every step up to its bound.
    /// Never below the key floor ([`Self::set_key_floor`]).
    pub fn key_bound(&self, layer: usize, keys: usize) -> usize {
        let chunk = moe_kernels::attention::DECODE_ATTN_CHUNK;
        keys.max(self.key_floor)
            .next_power_of_two()
            .max(chunk)
            .min(self.layers[layer].slots)
    }

    /// Sizes this cache's decode launches ([`Self::key_bound`]) for at least `keys` keys from now on
    /// (still at most each layer's slots; the keys themselves come from the step table). Sequences
    /// decoding together in one CUDA graph share the longest one's bound, so the batch's graphs
    /// change when the longest sequence crosses a power of two, not whenever any of them does.
    pub fn set_key_floor(&mut self, keys: usize) {
        self.key_floor = keys;
    }

    /// Writes a decode step's `k, v [B, heads, 1, d]` into `layer`'s slot `slot` in place (the kv_store
    /// kernel on the kernel path: one launch, the slot fixed or read from the step table).
    pub fn store_at(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        slot: moe_kernels::At<'_>,
    ) -> Result<()> {
        let l = &self.layers[layer];
        moe_kernels::kv_store(&l.k, &l.v, k, v, slot)
    }

    /// The whole preallocated K and V (or latent and rope key) of `layer`, `[B, heads, cap, d]`;
    /// only positions below the stored length are meaningful.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let l = &self.layers[layer];
        (&l.k, &l.v)
    }

    /// Marks `t` more tokens as stored (after every layer has written them).
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets the last `t` stored tokens (their slots are overwritten by the next writes).
    pub fn rewind(&mut self, t: usize) {
        self.len = self.len.saturating_sub(t);
    }

    /// Empties the cache for a new sequence (its buffers, and the step table's, stay).
    pub fn reset(&mut self) {
        self.len = 0;
        self.key_floor = 0;
    }
}

/// `f(slot, n)` for the (at most two) runs of a `slots`-slot ring (window `w`) holding positions
/// `lo..hi`.
fn ring_runs<T>(
    slots: usize,
    lo: usize,
    hi: usize,
    w: usize,
    mut f: impl FnMut(usize, usize) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(2);
    let mut p = lo;
    while p < hi {
        let slot = p % w;
        let n = (hi - p).min(slots - slot);
        out.push(f(slot, n)?);
        p += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, kv, t, hd]` whose every element is its position.
    fn at(cfg: &ModelConfig, positions: std::ops::Range<usize>) -> Tensor {
        let (kv, hd) = (cfg.num_kv_heads, cfg.head_dim);
        let t = positions.len();
        let v: Vec<f32> = (0..kv)
            .flat_map(|_| {
                positions
                    .clone()
                    .flat_map(|p| std::iter::repeat_n(p as f32, hd))
            })
            .collect();
        Tensor::from_vec(v, (1, kv, t, hd), &Device::Cpu).unwrap()
    }

    /// The positions a returned `[1, kv, n, hd]` holds, in order.
    fn positions(t: &Tensor) -> Vec<usize> {
        let v: Vec<Vec<Vec<f32>>> = t.squeeze(0).unwrap().to_vec3().unwrap();
        v[0].iter().map(|row| row[0] as usize).collect()
    }

    #[test]
    fn a_sliding_window_keeps_a_ring_of_w_positions() {
        let text = include_str!("../../../tests/fixtures/mixtral-swa/config.json");
        let mut cfg = ModelConfig::from_json_str(text, std::path::Path::new("swa")).unwrap();
        // Two KV heads, so a run of positions is a strided view of a chunk (one head would hide
        // a missing copy to contiguous memory).
        cfg.num_kv_heads = 2;
        let w = cfg.sliding_window.unwrap(); // 5
        let mut c = KvCache::new(&cfg, 1, 40, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c.slots(0), w);
        let ring = KvCache::new(&cfg, 1, 40, DType::F32, &Device::Cpu).unwrap();
        let plain = {
            let mut p = cfg.clone();
            p.sliding_window = None;
            KvCache::new(&p, 1, 40, DType::F32, &Device::Cpu).unwrap()
        };
        assert_eq!(ring.bytes() * 40, plain.bytes() * w);
        // A prompt longer than the window: every position comes back, the ring keeps the last W.
        let (k, v) = c.write(0, &at(&cfg, 0..7), &at(&cfg, 0..7), 0, 0).unwrap();
        assert_eq!(positions(&k), (0..7).collect::<Vec<_>>());
        assert_eq!(positions(&v), (0..7).collect::<Vec<_>>());
        let (kc, _) = c.layer(0);
        // Slots hold 5, 6, 2, 3, 4 (position p in slot p % 5).
        assert_eq!(positions(kc), [5, 6, 2, 3, 4]);
        // A chunk that wraps: positions 3..9 in order, read before 7 and 8 overwrite 2 and 3.
        let (k, _) = c.write(0, &at(&cfg, 7..9), &at(&cfg, 7..9), 7, 3).unwrap();
        assert_eq!(positions(&k), [3, 4, 5, 6, 7, 8]);
        assert_eq!(positions(c.layer(0).0), [5, 6, 7, 8, 4]);
        // A decode step reads the ring in place: all W slots, no window left to apply.
        c.store(0, &at(&cfg, 9..10), &at(&cfg, 9..10), 9).unwrap();
        assert_eq!(positions(c.layer(0).0), [5, 6, 7, 8, 9]);
        assert_eq!(c.attended(0, 10, Span::Sliding(w)), (w, None));
        assert_eq!(c.attended(0, 3, Span::Sliding(w)), (3, None));
        assert_eq!(plain.attended(0, 10, Span::Sliding(w)), (10, Some(w)));
        // Positions older than the window cannot be asked for.
        assert!(c
            .write(0, &at(&cfg, 10..11), &at(&cfg, 10..11), 10, 2)
            .is_err());
    }

    /// Windows on some layers (Qwen2-MoE: layers 0 and 2 of 4): those layers are rings, the others
    /// keep every position, and the bytes are what analyze predicts.
    #[test]
    fn windowed_layers_are_rings_and_the_others_are_not() {
        let text = include_str!("../../../tests/fixtures/qwen2-moe-swa/config.json");
        let cfg = ModelConfig::from_json_str(text, std::path::Path::new("q2")).unwrap();
        let c = KvCache::new(&cfg, 1, 40, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            (0..4).map(|l| c.slots(l)).collect::<Vec<_>>(),
            [5, 40, 5, 40]
        );
        let want = crate::spec::bytes::kv_bytes_per_sequence(&cfg, 40, 4);
        assert_eq!(c.bytes() as u64, want);
        assert_eq!(c.attended(1, 30, Span::Sliding(5)), (30, Some(5)));
        assert_eq!(c.attended(2, 30, Span::Sliding(5)), (5, None));
    }

    /// Llama-4's chunked attention: a ring of C slots where a chunk (starting at a multiple of C)
    /// fills slots from 0, so a decode step reads slots `0..=p % C`.
    #[test]
    fn a_chunk_is_the_first_slots_of_its_ring() {
        let text = include_str!("../../../tests/fixtures/mixtral-swa/config.json");
        let mut cfg = ModelConfig::from_json_str(text, std::path::Path::new("swa")).unwrap();
        cfg.sliding_window = Some(4);
        cfg.chunked_window = true;
        let span = cfg.span_of(0);
        assert_eq!(span, Span::Chunked(4));
        let mut c = KvCache::new(&cfg, 1, 40, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(c.slots(0), 4);
        let (k, _) = c.write(0, &at(&cfg, 0..7), &at(&cfg, 0..7), 0, 0).unwrap();
        assert_eq!(positions(&k), (0..7).collect::<Vec<_>>());
        c.store(0, &at(&cfg, 7..8), &at(&cfg, 7..8), 7).unwrap();
        assert_eq!(positions(c.layer(0).0), [4, 5, 6, 7]);
        assert_eq!(c.attended(0, 8, span), (4, None));
        // Position 8 opens the next chunk in slot 0: it sees itself only.
        c.store(0, &at(&cfg, 8..9), &at(&cfg, 8..9), 8).unwrap();
        assert_eq!(positions(c.layer(0).0)[0], 8);
        assert_eq!(c.attended(0, 9, span), (1, None));
        // A prompt chunk at 9..11 gathers its chunk's keys from position 8.
        let (k, _) = c
            .write(
                0,
                &at(&cfg, 9..11),
                &at(&cfg, 9..11),
                9,
                span.first_visible(9),
            )
            .unwrap();
        assert_eq!(positions(&k), [8, 9, 10]);
    }
}
