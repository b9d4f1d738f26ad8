//! Full-size canonical weights drawn from a seeded generator, from the config alone: no
//! download, no disk. Used by `moe-run bench --random-weights`.
//!
//! Scales (chosen so activations stay O(1) and routing is non-degenerate):
//! - every linear `[out, in]` (and each expert's) ~ N(0, 1/sqrt(in));
//! - embedding and lm_head ~ N(0, 1/sqrt(H)); the router ~ N(0, 1/sqrt(H)), so with RMS-normed
//!   inputs the router logits have standard deviation ~1 (softmax neither one-hot nor flat);
//! - norm weights are 1; q/k/v biases and sigmoid routers' selection bias are 0.
//!
//! Determinism: tensor number `i` (in a fixed construction order) is filled in chunks of
//! [`CHUNK`] elements, chunk `c` from a generator seeded by (seed, i, c), so the values do not
//! depend on the number of threads. Values are drawn in f32 and rounded to the dtype.
//!
//! With a quantization format, every tensor the format quantizes (`analysis::bytes::storage`:
//! attention and MLP linears, experts; not MLA's kv_b, routers, embeddings, lm_head) is drawn
//! directly packed, never as a dense tensor: uniform codes (int8 in -127..=127; int4 in 0..=15
//! with zero-point 7.5) and one f16 scale per row or group chosen so the dequantized weights have
//! the same standard deviation 1/sqrt(in) as the dense ones. So an INT4 Mixtral-8x7B needs its
//! ~25 GB of packed weights and nothing more.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::config::{FfnKind, MlaConfig, ModelConfig, MoeConfig, QkNorm, RouterKind};
use crate::error::Result;
use crate::model::moe::MoeWeights;
use crate::model::{
    AttnWeights, FfnWeights, LayerWeights, MlaWeights, MlpWeights, ModelWeights, Weight,
};
use crate::quant::{QFormat, QuantTensor};

/// Elements per independently seeded chunk.
pub const CHUNK: usize = 1 << 16;

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` chunk by chunk on all threads: chunk `c` of tensor `tensor` by `fill` from a
/// splitmix64 state seeded by (seed, tensor, c), so the values do not depend on the thread count.
fn fill_chunks<T: Send>(
    out: &mut [T],
    seed: u64,
    tensor: u64,
    fill: impl Fn(&mut u64, &mut [T]) + Sync,
) {
    let fill_chunk = |c: usize, chunk: &mut [T]| {
        let mut s = seed
            ^ tensor.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ (c as u64).wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
        splitmix(&mut s);
        fill(&mut s, chunk);
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n_chunks = out.len().div_ceil(CHUNK);
    if threads <= 1 || n_chunks < 4 {
        for (c, chunk) in out.chunks_mut(CHUNK).enumerate() {
            fill_chunk(c, chunk);
        }
        return;
    }
    let per_thread = n_chunks.div_ceil(threads);
    std::thread::scope(|sc| {
        for (t, part) in out.chunks_mut(per_thread * CHUNK).enumerate() {
            let fill_chunk = &fill_chunk;
            sc.spawn(move || {
                for (j, chunk) in part.chunks_mut(CHUNK).enumerate() {
                    fill_chunk(t * per_thread + j, chunk);
                }
            });
        }
    });
}

/// Fills `out` with N(0, std^2) (Box-Muller on splitmix64).
fn fill_normal<T: Copy + Send>(
    out: &mut [T],
    seed: u64,
    tensor: u64,
    std: f32,
    conv: fn(f32) -> T,
) {
    fill_chunks(out, seed, tensor, |s, chunk| {
        let mut i = 0;
        while i < chunk.len() {
            let r = splitmix(s);
            // Two uniforms in (0, 1] and [0, 1).
            let u1 = ((r >> 40) as f32 + 1.0) * (1.0 / (1u64 << 24) as f32);
            let u2 = ((r & 0xFF_FFFF) as f32) * (1.0 / (1u64 << 24) as f32);
            let rad = (-2.0 * u1.ln()).sqrt() * std;
            let (sn, cs) = (std::f32::consts::TAU * u2).sin_cos();
            chunk[i] = conv(rad * cs);
            if i + 1 < chunk.len() {
                chunk[i + 1] = conv(rad * sn);
            }
            i += 2;
        }
    });
}

/// Fills `out` with uniform bytes, each mapped by `code` (the format's codes).
fn fill_codes(out: &mut [u8], seed: u64, tensor: u64, code: fn(u8) -> u8) {
    fill_chunks(out, seed, tensor, |s, chunk| {
        for bytes in chunk.chunks_mut(8) {
            for (b, v) in bytes.iter_mut().zip(splitmix(s).to_le_bytes()) {
                *b = code(v);
            }
        }
    });
}

/// Builds tensors in a fixed order, numbering them for their seeds.
struct Gen<'a> {
    seed: u64,
    next: u64,
    dtype: DType,
    device: &'a Device,
    quant: Option<QFormat>,
}

impl Gen<'_> {
    /// N(0, std^2) of `shape` in `dtype` on the device.
    fn normal_as(&mut self, shape: &[usize], std: f64, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let (seed, id, std) = (self.seed, self.next, std as f32);
        self.next += 1;
        let t = match dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                fill_normal(&mut v, seed, id, std, |x| x);
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            DType::BF16 => {
                let mut v = vec![bf16::ZERO; n];
                fill_normal(&mut v, seed, id, std, bf16::from_f32);
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            DType::F16 => {
                let mut v = vec![f16::ZERO; n];
                fill_normal(&mut v, seed, id, std, f16::from_f32);
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            other => {
                return Err(crate::Error::Input(format!(
                    "random weights: unsupported dtype {other:?} (use f32, bf16 or f16)"
                )))
            }
        };
        Ok(t.to_device(self.device)?)
    }

    /// A linear weight `[.., out, in]` ~ N(0, 1/sqrt(in)).
    fn linear(&mut self, shape: &[usize]) -> Result<Tensor> {
        let fan_in = *shape.last().expect("non-empty shape");
        self.normal_as(shape, 1.0 / (fan_in as f64).sqrt(), self.dtype)
    }

    /// A linear weight the quantization format applies to: dense as [`Self::linear`], or drawn
    /// packed in the format with the same standard deviation.
    fn qlinear(&mut self, shape: &[usize]) -> Result<Weight> {
        let Some(fmt) = self.quant else {
            return Ok(self.linear(shape)?.into());
        };
        let k = *shape.last().expect("non-empty shape");
        let std = 1.0 / (k as f32).sqrt();
        let (qs, ps) = QuantTensor::stored_shapes(fmt, shape);
        let mut q = vec![0u8; qs.iter().product()];
        let (id, seed) = (self.next, self.seed);
        self.next += 1;
        // Uniform codes: int8 q in -127..=127 (std sqrt((255^2 - 1) / 12)); int4 two nibbles per
        // byte in 0..=15, read against z = 7.5 (std sqrt((16^2 - 1) / 12)).
        let (q_std, zero) = match fmt {
            QFormat::Int8 => {
                fill_codes(&mut q, seed, id, |b| if b == 0x80 { 0 } else { b });
                (((255f32 * 255.0 - 1.0) / 12.0).sqrt(), None)
            }
            QFormat::Int4 { .. } => {
                fill_codes(&mut q, seed, id, |b| b);
                if k % 2 == 1 {
                    // The pad nibble of an odd row is 0, as the quantizer writes it.
                    let kb = fmt.row_bytes(k);
                    for row in q.chunks_mut(kb) {
                        row[kb - 1] &= 0x0f;
                    }
                }
                (
                    ((16f32 * 16.0 - 1.0) / 12.0).sqrt(),
                    Some(f16::from_f32(7.5)),
                )
            }
        };
        let scale = f16::from_f32(std / q_std);
        let n_params: usize = ps.iter().product();
        let params: Vec<f16> = match zero {
            None => vec![scale; n_params],
            Some(z) => (0..n_params)
                .map(|i| if i % 2 == 0 { scale } else { z })
                .collect(),
        };
        Ok(Weight::Quant(QuantTensor {
            fmt,
            shape: shape.to_vec(),
            qweight: Tensor::from_vec(q, qs, self.device)?,
            params: Tensor::from_vec(params, ps, self.device)?,
        }))
    }

    fn ones(&self, len: usize) -> Result<Tensor> {
        Ok(Tensor::ones(len, self.dtype, self.device)?)
    }

    fn zeros(&self, len: usize, dtype: DType) -> Result<Tensor> {
        Ok(Tensor::zeros(len, dtype, self.device)?)
    }
}

/// `cfg` restricted to its first `n` layers (all of them if `n` is `None` or too large).
pub fn first_layers(cfg: &ModelConfig, n: Option<usize>) -> ModelConfig {
    let mut c = cfg.clone();
    if let Some(n) = n {
        c.layers.truncate(n.max(1));
    }
    c
}

/// Every weight `cfg` calls for, in the canonical layout and shapes of the loader
/// (`loader/naming.rs`), drawn from `seed` directly in `dtype` (and, with `quant`, the packed
/// format for the tensors it applies to) on `device`.
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
    quant: Option<QFormat>,
) -> Result<ModelWeights> {
    let mut g = Gen {
        seed,
        next: 0,
        dtype,
        device,
        quant,
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let inv_h = 1.0 / (h as f64).sqrt();
    // Full-size models take minutes to draw: show a bar per layer when stderr is a terminal.
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(cfg.num_layers() as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "drawing random weights {bar:40} layer {pos}/{len} {elapsed}",
        ) {
            b.set_style(style);
        }
        Some(b)
    } else {
        None
    };
    let embed = g.normal_as(&[v, h], inv_h, dtype)?;
    let mut layers = Vec::with_capacity(cfg.num_layers());
    for kind in &cfg.layers {
        if let Some(b) = &bar {
            b.inc(1);
        }
        let attn = match &cfg.mla {
            Some(m) => AttnWeights::Mla(mla(&mut g, cfg, m)?),
            None => gqa(&mut g, cfg)?,
        };
        let ffn = match kind {
            FfnKind::Dense { intermediate } => FfnWeights::Dense(mlp(&mut g, *intermediate, h)?),
            FfnKind::Moe(m) => FfnWeights::Moe(moe(&mut g, m, h)?),
        };
        layers.push(LayerWeights {
            attn_norm: g.ones(h)?,
            attn,
            ffn_norm: g.ones(h)?,
            ffn,
        });
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let final_norm = g.ones(h)?;
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        g.normal_as(&[v, h], inv_h, dtype)?
    };
    Ok(ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

fn gqa(g: &mut Gen, cfg: &ModelConfig) -> Result<AttnWeights> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let qkv = g.qlinear(&[q_out + 2 * kv_out, h])?;
    let qkv_bias = if cfg.attn.qkv_bias {
        Some(g.zeros(q_out + 2 * kv_out, g.dtype)?)
    } else {
        None
    };
    let (qn, kn) = match cfg.attn.qk_norm {
        QkNorm::None => (None, None),
        QkNorm::Whole => (Some(q_out), Some(kv_out)),
        QkNorm::PerHeadBeforeRope | QkNorm::PerHeadAfterRope => (Some(hd), Some(hd)),
    };
    Ok(AttnWeights::Gqa {
        qkv,
        qkv_bias,
        q_norm: qn.map(|n| g.ones(n)).transpose()?,
        k_norm: kn.map(|n| g.ones(n)).transpose()?,
        o: g.qlinear(&[h, q_out])?,
    })
}

fn mla(g: &mut Gen, cfg: &ModelConfig, m: &MlaConfig) -> Result<MlaWeights> {
    let (h, nh) = (cfg.hidden_size, cfg.num_heads);
    let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    let q = match m.q_lora_rank {
        None => crate::model::MlaQueryWeights::Plain(g.qlinear(&[nh * qk, h])?),
        Some(r) => crate::model::MlaQueryWeights::LowRank {
            a: g.qlinear(&[r, h])?,
            norm: g.ones(r)?,
            b: g.qlinear(&[nh * qk, r])?,
        },
    };
    let r = m.kv_lora_rank;
    Ok(MlaWeights {
        q,
        kv_a: g.qlinear(&[r + m.qk_rope_head_dim, h])?,
        kv_a_norm: g.ones(r)?,
        kv_b: g
            .linear(&[nh * (m.qk_nope_head_dim + m.v_head_dim), r])?
            .into(),
        o: g.qlinear(&[h, nh * m.v_head_dim])?,
    })
}

fn mlp(g: &mut Gen, f: usize, h: usize) -> Result<MlpWeights> {
    Ok(MlpWeights {
        gate_up: g.qlinear(&[2 * f, h])?,
        down: g.qlinear(&[h, f])?,
    })
}

fn moe(g: &mut Gen, m: &MoeConfig, h: usize) -> Result<MoeWeights> {
    let (e, f) = (m.num_experts, m.expert_ffn);
    let router_dtype = if m.router_f32 { DType::F32 } else { g.dtype };
    let router = g.normal_as(&[e, h], 1.0 / (h as f64).sqrt(), router_dtype)?;
    let gate_up = g.qlinear(&[e, 2 * f, h])?;
    let down = g.qlinear(&[e, h, f])?;
    let (shared, shared_gate) = match m.shared {
        None => (None, None),
        Some(s) => {
            let gate = if s.sigmoid_gate {
                Some(g.linear(&[1, h])?)
            } else {
                None
            };
            (Some(mlp(g, s.ffn, h)?), gate)
        }
    };
    let score_bias = match m.router {
        RouterKind::SigmoidBiasGrouped { .. } => Some(g.zeros(e, DType::F32)?),
        _ => None,
    };
    Ok(MoeWeights {
        router,
        score_bias,
        gate_up,
        down,
        shared,
        shared_gate,
    })
}
