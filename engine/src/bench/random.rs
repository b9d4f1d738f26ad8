//! Full-size canonical weights drawn from a seeded generator, from the config alone: no
//! download, no disk. Used by `moe-run bench --random-weights`. Which tensors, their shapes and
//! classes are the tensor spec's (`spec::tensors`), in its order.
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
//! With a quantization format, every tensor the format quantizes (`spec::bytes::storage`:
//! attention and MLP linears, experts; not MLA's kv_b, routers, embeddings, lm_head) is drawn
//! directly packed, never as a dense tensor: uniform codes (int8 in -127..=127; int4 in 0..=15
//! with zero-point 7.5) and one f16 scale per row or group chosen so the dequantized weights have
//! the same standard deviation 1/sqrt(in) as the dense ones. So an INT4 Mixtral-8x7B needs its
//! ~25 GB of packed weights and nothing more.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::assemble::build_weights;
use crate::model::{ModelWeights, Weight};
use crate::quant::{QFormat, QuantTensor};
use crate::spec::bytes::Storage;
use crate::spec::tensors::{Class, Role, TensorSpec};

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
    /// `--weight-dtype`: the tensors `quant` would pack, drawn in this dtype instead of `dtype`.
    weight_dtype: Option<DType>,
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

    /// One tensor of the spec: a matrix (or stack of them) `[.., out, in]` ~ N(0, 1/sqrt(in)),
    /// drawn packed when the quantization format applies to it; norm weights 1; biases 0.
    fn tensor(&mut self, t: &TensorSpec) -> Result<Weight> {
        let dtype = if t.f32 { DType::F32 } else { self.dtype };
        let device = self.device;
        match t.class {
            Class::Norm => Ok(Tensor::ones(t.shape.as_slice(), dtype, device)?.into()),
            Class::Bias | Class::Buffer | Class::ExpertBias { .. } => {
                Ok(Tensor::zeros(t.shape.as_slice(), dtype, device)?.into())
            }
            Class::Lookup | Class::Linear | Class::Experts { .. } | Class::Tied => {
                let fan_in = t.shape.last().copied().unwrap_or(1);
                let dtype = match (self.weight_dtype, t.storage()) {
                    (Some(w), Storage::Quantized) => w,
                    _ => dtype,
                };
                match (self.quant, t.storage()) {
                    (Some(fmt), Storage::Quantized) => self.qlinear(&t.shape, fmt),
                    (_, Storage::Mxfp4) => self.qlinear(&t.shape, QFormat::Mxfp4),
                    _ => Ok(self
                        .normal_as(&t.shape, 1.0 / (fan_in as f64).sqrt(), dtype)?
                        .into()),
                }
            }
        }
    }

    /// A linear weight drawn packed in `fmt`, with the dense draw's standard deviation.
    fn qlinear(&mut self, shape: &[usize], fmt: QFormat) -> Result<Weight> {
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
            QFormat::Mxfp4 => {
                // Uniform codes: E2M1 values with E[v^2] = 68.5 / 8, one power-of-two scale per 32
                // nearest to std / sqrt(68.5 / 8) (the pad nibble of an odd row 0, as above).
                fill_codes(&mut q, seed, id, |b| b);
                if k % 2 == 1 {
                    let kb = fmt.row_bytes(k);
                    for row in q.chunks_mut(kb) {
                        row[kb - 1] &= 0x0f;
                    }
                }
                let e = ((std / (68.5f32 / 8.0).sqrt()).log2().round() as i32 + 127).clamp(0, 254);
                let params = vec![e as u8; ps.iter().product()];
                return Ok(Weight::Quant(QuantTensor {
                    fmt,
                    shape: shape.to_vec(),
                    qweight: Tensor::from_vec(q, qs, self.device)?,
                    params: Tensor::from_vec(params, ps, self.device)?,
                }));
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
}

/// `cfg` restricted to its first `n` layers (all of them if `n` is `None` or too large).
pub fn first_layers(cfg: &ModelConfig, n: Option<usize>) -> ModelConfig {
    let mut c = cfg.clone();
    if let Some(n) = n {
        c.layers.truncate(n.max(1));
    }
    c
}

/// Every weight `cfg` calls for: the tensors of the spec (`spec::tensors`), as the loader builds
/// them, drawn from `seed` directly in `dtype` (and, with `quant`, the packed
/// format for the tensors it applies to) on `device`.
pub fn random_weights(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
    quant: Option<QFormat>,
) -> Result<ModelWeights> {
    random_weights_as(cfg, seed, dtype, None, device, quant)
}

/// [`random_weights`] with the linear and expert weights in `weight_dtype` (`--weight-dtype`;
/// `None`: `dtype`). The values are the same draws, rounded to the storage dtype.
pub fn random_weights_as(
    cfg: &ModelConfig,
    seed: u64,
    dtype: DType,
    weight_dtype: Option<DType>,
    device: &Device,
    quant: Option<QFormat>,
) -> Result<ModelWeights> {
    let mut g = Gen {
        seed,
        next: 0,
        dtype,
        weight_dtype,
        device,
        quant,
    };
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
    let w = build_weights(cfg, |t| {
        if let (Some(b), Role::AttnNorm) = (&bar, t.role) {
            b.inc(1); // the first tensor of each layer
        }
        g.tensor(t)
    })?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::assemble::{expected, layout};
    use crate::spec::tensors::{every_config, tensors};

    /// Random weights are the spec's tensors, packed exactly where the quantization rule says,
    /// for every config small enough to draw.
    #[test]
    fn random_weights_are_the_spec() {
        let mut n = 0;
        for (name, cfg) in every_config() {
            if tensors(&cfg).iter().map(TensorSpec::numel).sum::<u64>() > 4 << 20 {
                continue;
            }
            for quant in [None, Some(QFormat::Int8), Some(QFormat::Int4 { group: 32 })] {
                let w = random_weights(&cfg, 1, DType::F32, &Device::Cpu, quant).unwrap();
                assert_eq!(
                    layout(&w),
                    expected(&cfg, quant.is_some()),
                    "{name} {quant:?}"
                );
            }
            n += 1;
        }
        assert!(n >= 16, "only {n} configs");
    }
}
