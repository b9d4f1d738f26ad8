//! The weight-only quantization formats of the quantized matmuls (`crate::qmatmul`, `crate::qexperts`): how a
//! row of f32 weights is quantized, packed and dequantized. The kernels (`cuda/qmatmul.cu`) and the CPU
//! references dequantize exactly as [`dequantize_row`].
//!
//! Legend: N output features (rows), K input features (the reduction dim), G = ceil(K / group) groups per row,
//! Kb bytes per packed row.
//!
//! ```text
//! INT8 (per output channel, symmetric):
//!   qweight [.., N, K]   u8 = two's-complement i8 q in -127..=127
//!   params  [.., N]      f16 scale s;           w[n, k] = s[n] * q[n, k]
//! INT4 (group-wise along K, asymmetric):
//!   qweight [.., N, Kb]  u8, Kb = ceil(K / 2): byte j of a row = q[2j] | q[2j+1] << 4 (low nibble
//!                        first; a pad nibble of 0 when K is odd). Rows are contiguous along K, so
//!                        a 16-byte load is 32 consecutive weights of one row (coalesced when the
//!                        threads of a warp walk K, as the GEMV kernel does).
//!   params  [.., N, G, 2] f16 (scale s, zero z) per group of `group` consecutive k (the last
//!                        group may be partial);  w[n, k] = s[n, g] * (q[n, k] - z[n, g]), g = k / group
//! ```
//!
//! Quantization (host side, from f32): INT8 s = f16(absmax / 127), q = clamp(round(w / s)).
//! INT4: the group's range [lo, hi] is widened to contain 0, s = f16((hi - lo) / 15),
//! z = f16(-lo / s) in [0, 15] (a real zero-point, so both ends of the range are hit exactly),
//! q = clamp(round(w / s + z), 0, 15). Scales are rounded to f16 *before* q is computed, so the
//! stored scale is the one the weights were rounded against. A zero scale (all-zero row or group)
//! stores q = 0 and dequantizes to exactly 0.

use half::f16;

use crate::common::Elem;

/// A weight-only quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// Per-output-channel symmetric int8.
    Int8,
    /// Asymmetric int4 in groups of `group` consecutive input features (a multiple of 2).
    Int4 { group: usize },
}

impl QFormat {
    /// Bytes of one packed row of `k` weights.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            QFormat::Int8 => k,
            QFormat::Int4 { .. } => k.div_ceil(2),
        }
    }

    /// The f16 params of one row: `[]` + 1 scale (int8) or `[G, 2]` (int4).
    pub fn params_shape(self, k: usize) -> Vec<usize> {
        match self {
            QFormat::Int8 => vec![],
            QFormat::Int4 { group } => vec![k.div_ceil(group), 2],
        }
    }

    pub(crate) fn params_per_row(self, k: usize) -> usize {
        self.params_shape(k).iter().product::<usize>()
    }
}

/// Quantizes one row `w [K]` into `q [row_bytes(K)]` and `p [params_per_row]` (see module docs).
pub fn quantize_row(fmt: QFormat, w: &[f32], q: &mut [u8], p: &mut [f16]) {
    match fmt {
        QFormat::Int8 => {
            let absmax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = f16::from_f32(absmax / 127.0);
            p[0] = s;
            let s = s.f32();
            for (q, &v) in q.iter_mut().zip(w) {
                let x = if s > 0.0 {
                    (v / s).round().clamp(-127.0, 127.0)
                } else {
                    0.0
                };
                *q = (x as i8) as u8;
            }
        }
        QFormat::Int4 { group } => {
            q.fill(0);
            for (g, chunk) in w.chunks(group).enumerate() {
                let lo = chunk.iter().fold(0f32, |m, &v| m.min(v));
                let hi = chunk.iter().fold(0f32, |m, &v| m.max(v));
                let s = f16::from_f32((hi - lo) / 15.0);
                let sf = s.f32();
                let z = if sf > 0.0 {
                    f16::from_f32(-lo / sf)
                } else {
                    f16::ZERO
                };
                let zf = z.f32();
                p[2 * g] = s;
                p[2 * g + 1] = z;
                for (i, &v) in chunk.iter().enumerate() {
                    let x = if sf > 0.0 {
                        (v / sf + zf).round().clamp(0.0, 15.0) as u8
                    } else {
                        0
                    };
                    let k = g * group + i;
                    q[k / 2] |= x << (4 * (k % 2));
                }
            }
        }
    }
}

/// Dequantizes one row into `w [K]` (the inverse of [`quantize_row`] up to rounding).
pub fn dequantize_row(fmt: QFormat, q: &[u8], p: &[f16], w: &mut [f32]) {
    match fmt {
        QFormat::Int8 => {
            let s = p[0].f32();
            for (w, &q) in w.iter_mut().zip(q) {
                *w = s * (q as i8) as f32;
            }
        }
        QFormat::Int4 { group } => {
            // Per group (even size, so it starts on a byte): convert (s, z) once, then one byte =
            // two weights, low nibble first. Same f32 ops per weight as the one-at-a-time form.
            for (g, wg) in w.chunks_mut(group).enumerate() {
                let (s, z) = (p[2 * g].f32(), p[2 * g + 1].f32());
                let qg = &q[g * group / 2..];
                for (pair, &b) in wg.chunks_mut(2).zip(qg) {
                    pair[0] = s * ((b & 0xf) as f32 - z);
                    if let Some(hi) = pair.get_mut(1) {
                        *hi = s * ((b >> 4) as f32 - z);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    pub(crate) fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn roundtrip_error_is_within_half_a_step() {
        for fmt in [
            QFormat::Int8,
            QFormat::Int4 { group: 32 },
            QFormat::Int4 { group: 128 },
        ] {
            for k in [1usize, 7, 32, 33, 200] {
                let w = lcg(k, k as u64);
                let mut q = vec![0u8; fmt.row_bytes(k)];
                let mut p = vec![f16::ZERO; fmt.params_per_row(k)];
                quantize_row(fmt, &w, &mut q, &mut p);
                let mut back = vec![0f32; k];
                dequantize_row(fmt, &q, &p, &mut back);
                for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                    let step = match fmt {
                        QFormat::Int8 => p[0].f32(),
                        QFormat::Int4 { group } => p[2 * (i / group)].f32(),
                    };
                    // The step is no larger than the format needs (an oversized scale would
                    // pass the half-step test): absmax / 127 for INT8; for INT4 the group's
                    // range, widened to contain 0, / 15. 0.1% for the f16 rounding of the scale.
                    let need = match fmt {
                        QFormat::Int8 => w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
                        QFormat::Int4 { group } => {
                            let g = &w[(i / group) * group..((i / group + 1) * group).min(k)];
                            let hi = g.iter().fold(0f32, |m, &v| m.max(v));
                            let lo = g.iter().fold(0f32, |m, &v| m.min(v));
                            (hi - lo) / 15.0
                        }
                    };
                    assert!(
                        step <= need * 1.001 + 1e-12,
                        "{fmt:?} k={k} i={i}: step {step} > {need}"
                    );
                    // Half a step, plus the f16 rounding of the zero-point (int4).
                    assert!(
                        (a - b).abs() <= 0.5 * step * 1.02 + 1e-7,
                        "{fmt:?} k={k} i={i}: {a} vs {b}, step {step}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_rows_and_constant_groups() {
        let fmt = QFormat::Int4 { group: 4 };
        let w = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5];
        let mut q = vec![0u8; 4];
        let mut p = vec![f16::ZERO; 4];
        quantize_row(fmt, &w, &mut q, &mut p);
        let mut back = vec![1f32; 8];
        dequantize_row(fmt, &q, &p, &mut back);
        assert_eq!(&back[..4], &[0.0; 4]);
        assert!(back[4..].iter().all(|v| (v - 0.5).abs() < 1e-3), "{back:?}");
        let mut q8 = vec![0u8; 3];
        let mut p8 = vec![f16::ZERO; 1];
        quantize_row(QFormat::Int8, &[0.0; 3], &mut q8, &mut p8);
        let mut back = vec![1f32; 3];
        dequantize_row(QFormat::Int8, &q8, &p8, &mut back);
        assert_eq!(back, [0.0; 3]);
    }
}
