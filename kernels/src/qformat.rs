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
//! MXFP4 (OCP microscaling FP4, as gpt-oss publishes it; group = 32):
//!   qweight [.., N, Kb]  u8, Kb = ceil(K / 2), nibbles packed as INT4's (low nibble = even k): the
//!                        checkpoint's `*_blocks [E, N, K/32, 16]` reshaped to [E, N, K/2]
//!   params  [.., N, G]   u8 E8M0 exponent e per group of 32 consecutive k (the checkpoint's `*_scales
//!                        [E, N, K/32]` as they are; E8M0 spans 2^-127..2^128, past f16's range)
//!                        w[n, k] = fp4(q[n, k]) * 2^(e[n, k / 32] - 127)
//!   fp4(q): E2M1, bit 3 the sign, bits 0..=2 the magnitude {0, 0.5, 1, 1.5, 2, 3, 4, 6} ([`MXFP4_VALUES`])
//! ```
//!
//! MXFP4 dequantization is exact: the kernels compute `w = (2 fp4(q)) * 2^(e - 128)`, an integer in
//! -12..=12 ([`MXFP4_DOUBLED`]) times a power of two built from its exponent bits ([`mxfp4_half_scale`];
//! 2^-128..2^127, all f32 values), so every product is exact or overflows: the values of `torch.ldexp(fp4(q),
//! e - 127)` in transformers' `convert_moe_packed_tensors`, `e = 255` included (±inf where |fp4| >= 1,
//! 2^127 for ±0.5, ±0 for ±0; the OCP spec's NaN reading of 0xFF is not applied, as transformers does not).
//! Nibble 8 is -0.0.
//!
//! Quantization (host side, from f32): INT8 s = f16(absmax / 127), q = clamp(round(w / s)).
//! INT4: the group's range [lo, hi] is widened to contain 0, s = f16((hi - lo) / 15),
//! z = f16(-lo / s) in [0, 15] (a real zero-point, so both ends of the range are hit exactly),
//! q = clamp(round(w / s + z), 0, 15). Scales are rounded to f16 *before* q is computed, so the
//! stored scale is the one the weights were rounded against. A zero scale (all-zero row or group)
//! stores q = 0 and dequantizes to exactly 0.
//! MXFP4 (OCP MX v1.0): per group of 32 (the last may be partial), the shared exponent is
//! floor(log2(absmax)) - 2 (2 = E2M1's largest exponent), stored as e = that + 127 clamped to 0..=254
//! (an all-zero group stores e = 0); each w / 2^(e - 127) is rounded to the nearest E2M1 value, ties to
//! the even code (mantissa bit 0), and clamped to ±6 (the group's absmax / scale lies in [4, 8), so values
//! above 6 saturate). Zero magnitudes are stored as +0 (code 0). Inputs must be finite.

use candle_core::DType;
use half::f16;

use crate::common::Elem;

/// A weight-only quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// Per-output-channel symmetric int8.
    Int8,
    /// Asymmetric int4 in groups of `group` consecutive input features (a multiple of 2).
    Int4 { group: usize },
    /// OCP MXFP4: E2M1 nibbles with one E8M0 (u8) exponent per [`MXFP4_GROUP`] input features.
    Mxfp4,
}

/// Input features per MXFP4 scale.
pub const MXFP4_GROUP: usize = 32;

/// The E2M1 values of the 16 nibbles (bit 3 the sign): what transformers' `FP4_VALUES` lists.
pub const MXFP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Twice [`MXFP4_VALUES`]: integers, which the kernels multiply by [`mxfp4_half_scale`].
pub const MXFP4_DOUBLED: [f32; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, -0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0,
];

/// `2^(e - 128)` for an E8M0 exponent byte `e`, exactly (2^-128 and 2^-127 are f32 subnormals): half the
/// group's scale `2^(e - 127)`, so that `e = 255` stays finite (2^128 is not an f32).
#[inline]
pub fn mxfp4_half_scale(e: u8) -> f32 {
    let e = e as u32;
    if e >= 2 {
        f32::from_bits((e - 1) << 23)
    } else {
        f32::from_bits(0x0040_0000 >> (1 - e))
    }
}

impl QFormat {
    /// Bytes of one packed row of `k` weights.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            QFormat::Int8 => k,
            QFormat::Int4 { .. } | QFormat::Mxfp4 => k.div_ceil(2),
        }
    }

    /// The params of one row (in [`QFormat::params_dtype`]): `[]` + 1 scale (int8), `[G, 2]` (int4) or
    /// `[G]` exponents (mxfp4).
    pub fn params_shape(self, k: usize) -> Vec<usize> {
        match self {
            QFormat::Int8 => vec![],
            QFormat::Int4 { group } => vec![k.div_ceil(group), 2],
            QFormat::Mxfp4 => vec![k.div_ceil(MXFP4_GROUP)],
        }
    }

    /// The dtype of the params tensor: f16 (int8, int4) or u8 (mxfp4's E8M0 exponents).
    pub fn params_dtype(self) -> DType {
        match self {
            QFormat::Int8 | QFormat::Int4 { .. } => DType::F16,
            QFormat::Mxfp4 => DType::U8,
        }
    }

    /// Stored bits per weight for rows of `k` weights (packed weights and params): INT8 8 + 16 / K,
    /// INT4 4 + 32 / group, MXFP4 4 + 8 / 32 = 4.25 (K a multiple of the group).
    pub fn bits_per_weight(self, k: usize) -> f64 {
        let params = self.params_per_row(k) * self.params_dtype().size_in_bytes();
        8.0 * (self.row_bytes(k) + params) as f64 / k.max(1) as f64
    }

    pub(crate) fn params_per_row(self, k: usize) -> usize {
        self.params_shape(k).iter().product::<usize>()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for u8 {}
}

/// The element type of a params slice: `f16` (INT8, INT4) or `u8` (MXFP4), as [`QFormat::params_dtype`]
/// says. The row functions take either and panic when it is not the format's (a caller's bug: the ops check
/// the params tensor's dtype before they get here).
pub trait QParam: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    const DTYPE: DType;
    fn f16s(p: &[Self]) -> Option<&[f16]>;
    fn u8s(p: &[Self]) -> Option<&[u8]>;
    fn f16s_mut(p: &mut [Self]) -> Option<&mut [f16]>;
    fn u8s_mut(p: &mut [Self]) -> Option<&mut [u8]>;
}

impl QParam for f16 {
    const DTYPE: DType = DType::F16;
    fn f16s(p: &[Self]) -> Option<&[f16]> {
        Some(p)
    }
    fn u8s(_: &[Self]) -> Option<&[u8]> {
        None
    }
    fn f16s_mut(p: &mut [Self]) -> Option<&mut [f16]> {
        Some(p)
    }
    fn u8s_mut(_: &mut [Self]) -> Option<&mut [u8]> {
        None
    }
}

impl QParam for u8 {
    const DTYPE: DType = DType::U8;
    fn f16s(_: &[Self]) -> Option<&[f16]> {
        None
    }
    fn u8s(p: &[Self]) -> Option<&[u8]> {
        Some(p)
    }
    fn f16s_mut(_: &mut [Self]) -> Option<&mut [f16]> {
        None
    }
    fn u8s_mut(p: &mut [Self]) -> Option<&mut [u8]> {
        Some(p)
    }
}

fn wrong_params(fmt: QFormat, got: DType) -> ! {
    panic!(
        "{fmt:?} params are {:?}, got a {got:?} slice (QFormat::params_dtype)",
        fmt.params_dtype()
    )
}

fn f16_params<P: QParam>(fmt: QFormat, p: &[P]) -> &[f16] {
    P::f16s(p).unwrap_or_else(|| wrong_params(fmt, P::DTYPE))
}

/// The nibble code of the E2M1 value nearest to `x` (finite), ties to the even code, saturating at ±6.
fn e2m1_code(x: f64) -> u8 {
    let a = x.abs();
    // Midpoints between neighbouring magnitudes; `<=` where the lower neighbour's code is even.
    let mag = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if mag != 0 && x < 0.0 {
        mag | 8
    } else {
        mag
    }
}

/// floor(log2(|x|)) of a finite non-zero f32, from its bits (exact, subnormals included).
fn floor_log2(x: f32) -> i32 {
    let b = x.to_bits() & 0x7fff_ffff;
    match (b >> 23) as i32 {
        0 => (31 - b.leading_zeros() as i32) - 149,
        e => e - 127,
    }
}

/// Quantizes one row `w [K]` to MXFP4: `q [ceil(K / 2)]` nibbles, `e [ceil(K / 32)]` exponents.
pub fn quantize_mxfp4_row(w: &[f32], q: &mut [u8], e: &mut [u8]) {
    q.fill(0);
    for (g, chunk) in w.chunks(MXFP4_GROUP).enumerate() {
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let exp = if absmax > 0.0 {
            (floor_log2(absmax) - 2 + 127).clamp(0, 254)
        } else {
            0
        };
        e[g] = exp as u8;
        // 1 / 2^(exp - 127) in f64: exact, and w * inv is exact too.
        let inv = 2f64.powi(127 - exp);
        for (i, &v) in chunk.iter().enumerate() {
            let k = g * MXFP4_GROUP + i;
            q[k / 2] |= e2m1_code(v as f64 * inv) << (4 * (k % 2));
        }
    }
}

/// Dequantizes one MXFP4 row (exact, see the module docs).
pub fn dequantize_mxfp4_row(q: &[u8], e: &[u8], w: &mut [f32]) {
    for (g, wg) in w.chunks_mut(MXFP4_GROUP).enumerate() {
        let s = mxfp4_half_scale(e[g]);
        let qg = &q[g * MXFP4_GROUP / 2..];
        for (pair, &b) in wg.chunks_mut(2).zip(qg) {
            pair[0] = MXFP4_DOUBLED[(b & 0xf) as usize] * s;
            if let Some(hi) = pair.get_mut(1) {
                *hi = MXFP4_DOUBLED[(b >> 4) as usize] * s;
            }
        }
    }
}

/// Quantizes one row `w [K]` into `q [row_bytes(K)]` and `p [params_per_row]` (see module docs); `p` is
/// `f16` or `u8` as [`QFormat::params_dtype`] says (panics otherwise).
pub fn quantize_row<P: QParam>(fmt: QFormat, w: &[f32], q: &mut [u8], p: &mut [P]) {
    if fmt == QFormat::Mxfp4 {
        let e = P::u8s_mut(p).unwrap_or_else(|| wrong_params(fmt, P::DTYPE));
        return quantize_mxfp4_row(w, q, e);
    }
    let p = P::f16s_mut(p).unwrap_or_else(|| wrong_params(fmt, P::DTYPE));
    match fmt {
        QFormat::Mxfp4 => unreachable!("handled above"),
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

/// Dequantizes one row into `w [K]` (the inverse of [`quantize_row`] up to rounding); `p` as there.
pub fn dequantize_row<P: QParam>(fmt: QFormat, q: &[u8], p: &[P], w: &mut [f32]) {
    match fmt {
        QFormat::Mxfp4 => {
            let e = P::u8s(p).unwrap_or_else(|| wrong_params(fmt, P::DTYPE));
            dequantize_mxfp4_row(q, e, w);
        }
        QFormat::Int8 => {
            let s = f16_params(fmt, p)[0].f32();
            for (w, &q) in w.iter_mut().zip(q) {
                *w = s * (q as i8) as f32;
            }
        }
        QFormat::Int4 { group } => {
            let p = f16_params(fmt, p);
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

/// The params of many rows, in their format's dtype.
#[derive(Debug, Clone, PartialEq)]
pub enum QParams {
    F16(Vec<f16>),
    U8(Vec<u8>),
}

impl QParams {
    /// A tensor of shape `dims` on `device`.
    pub fn to_tensor(
        &self,
        dims: &[usize],
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        match self {
            QParams::F16(p) => candle_core::Tensor::from_slice(p, dims, device),
            QParams::U8(p) => candle_core::Tensor::from_slice(p, dims, device),
        }
    }
}

/// Quantizes `w [rows, k]` row by row: (qweight `[rows, row_bytes(k)]`, params `[rows, params_shape(k)]`).
pub fn quantize_rows(fmt: QFormat, w: &[f32], k: usize) -> (Vec<u8>, QParams) {
    let rows = w.len() / k.max(1);
    let (kb, pr) = (fmt.row_bytes(k), fmt.params_per_row(k));
    let mut q = vec![0u8; rows * kb];
    fn fill<P: QParam>(fmt: QFormat, w: &[f32], k: usize, q: &mut [u8], p: &mut [P]) {
        let (kb, pr) = (fmt.row_bytes(k), fmt.params_per_row(k));
        for (r, row) in w.chunks_exact(k.max(1)).enumerate() {
            quantize_row(
                fmt,
                row,
                &mut q[r * kb..(r + 1) * kb],
                &mut p[r * pr..(r + 1) * pr],
            );
        }
    }
    let p = if fmt.params_dtype() == DType::U8 {
        let mut p = vec![0u8; rows * pr];
        fill(fmt, w, k, &mut q, &mut p);
        QParams::U8(p)
    } else {
        let mut p = vec![f16::ZERO; rows * pr];
        fill(fmt, w, k, &mut q, &mut p);
        QParams::F16(p)
    };
    (q, p)
}

/// Dequantizes every row of `qweight [.., N, row_bytes(k)]` with its `params` (in the format's dtype, any
/// device) into `[rows * k]` f32.
pub fn dequantize_tensors(
    fmt: QFormat,
    qweight: &candle_core::Tensor,
    params: &candle_core::Tensor,
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let q = qweight.flatten_all()?.to_vec1::<u8>()?;
    let (kb, pr) = (fmt.row_bytes(k).max(1), fmt.params_per_row(k).max(1));
    let rows = q.len() / kb;
    let mut w = vec![0f32; rows * k];
    fn run<P: QParam + candle_core::WithDType>(
        fmt: QFormat,
        q: &[u8],
        params: &candle_core::Tensor,
        (kb, pr, k): (usize, usize, usize),
        w: &mut [f32],
    ) -> candle_core::Result<()> {
        let p = params.flatten_all()?.to_vec1::<P>()?;
        if p.len() < w.len() / k.max(1) * pr {
            candle_core::bail!(
                "{fmt:?}: {} params for {} rows",
                p.len(),
                w.len() / k.max(1)
            );
        }
        for ((out, qr), pr) in w
            .chunks_exact_mut(k.max(1))
            .zip(q.chunks_exact(kb))
            .zip(p.chunks_exact(pr))
        {
            dequantize_row(fmt, qr, pr, out);
        }
        Ok(())
    }
    if params.dtype() != fmt.params_dtype() {
        candle_core::bail!(
            "{fmt:?}: params must be {:?}, got {:?}",
            fmt.params_dtype(),
            params.dtype()
        );
    }
    match fmt.params_dtype() {
        DType::U8 => run::<u8>(fmt, &q, params, (kb, pr, k), &mut w)?,
        _ => run::<f16>(fmt, &q, params, (kb, pr, k), &mut w)?,
    }
    Ok(w)
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
                        QFormat::Mxfp4 => unreachable!("mxfp4 has its own tests"),
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
                        QFormat::Mxfp4 => unreachable!("mxfp4 has its own tests"),
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

    /// The LUT and the exponent scale against transformers' definition (`FP4_VALUES[q] * 2^(e - 127)` by
    /// `ldexp`, here in f64 then rounded once to f32), for every nibble and every exponent byte: bit for bit,
    /// infinities at e = 255 and the subnormal scales at e = 0 and 1 included.
    #[test]
    fn mxfp4_dequantization_is_ldexp_of_the_lut() {
        let fp4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for code in 0u8..16 {
            let mag = fp4[(code & 7) as usize];
            let v: f64 = if code & 8 != 0 { -mag } else { mag };
            assert_eq!(MXFP4_VALUES[code as usize], v as f32);
            assert_eq!(MXFP4_DOUBLED[code as usize], 2.0 * v as f32);
            for e in 0u8..=255 {
                let want = (v * 2f64.powi(e as i32 - 127)) as f32;
                let mut w = [0f32; 2];
                dequantize_row(QFormat::Mxfp4, &[code | (code << 4)], &[e], &mut w);
                assert_eq!(w[0].to_bits(), want.to_bits(), "code {code} e {e}");
                assert_eq!(
                    w[1].to_bits(),
                    want.to_bits(),
                    "code {code} e {e} (high nibble)"
                );
            }
        }
        // Spot values: e = 127 is the unit scale; e = 255 overflows from |fp4| = 1 up, as ldexp does.
        assert_eq!(mxfp4_half_scale(128), 1.0);
        assert_eq!(mxfp4_half_scale(0), 2f32.powi(-128));
        let mut w = [0f32; 4];
        dequantize_row(QFormat::Mxfp4, &[0x71, 0x02], &[255], &mut w);
        assert_eq!(w, [2f32.powi(127), f32::INFINITY, f32::INFINITY, 0.0]);
        dequantize_row(QFormat::Mxfp4, &[0x9f], &[127], &mut w[..2]);
        assert_eq!(&w[..2], &[-6.0, -0.5]);
    }

    /// The E2M1 value nearest to `x`, by brute force over the 8 magnitudes (ties to the even code),
    /// saturating at 6.
    fn nearest_e2m1(x: f64) -> f64 {
        let fp4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let a = x.abs().min(6.0);
        let mut best = 0;
        for (c, &m) in fp4.iter().enumerate() {
            let (d, db) = ((a - m).abs(), (a - fp4[best]).abs());
            if d < db || (d == db && c % 2 == 0) {
                best = c;
            }
        }
        fp4[best].copysign(x)
    }

    /// quantize -> dequantize: the scale is OCP's `2^(floor(log2(absmax)) - 2)` and every weight comes back
    /// as the E2M1 value nearest to `w / scale` times the scale (so the error is at most half a step of the
    /// grid, or the saturation above 6); partial last groups, zero groups, ties and tiny/huge groups.
    #[test]
    fn mxfp4_roundtrip_is_round_to_nearest_e2m1() {
        let mut rows: Vec<Vec<f32>> = [1usize, 7, 31, 32, 33, 64, 200, 4096]
            .iter()
            .map(|&k| lcg(k, k as u64 + 3))
            .collect();
        // Exact grid points and midpoints at scale 1 (absmax 4 -> e = 127): ties to the even code.
        rows.push(vec![
            4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 7.9, -6.5, 0.1, 3.0,
            1.5,
        ]);
        rows.push(vec![0.0; 40]);
        rows.push(lcg(64, 9).iter().map(|v| v * 1e-38).collect());
        rows.push(lcg(64, 10).iter().map(|v| v * 3e38).collect());
        for w in rows {
            let k = w.len();
            let fmt = QFormat::Mxfp4;
            assert_eq!(fmt.params_dtype(), DType::U8);
            let mut q = vec![0u8; fmt.row_bytes(k)];
            let mut e = vec![0u8; fmt.params_per_row(k)];
            quantize_row(fmt, &w, &mut q, &mut e);
            let mut back = vec![f32::NAN; k];
            dequantize_row(fmt, &q, &e, &mut back);
            for (g, chunk) in w.chunks(MXFP4_GROUP).enumerate() {
                let absmax = chunk.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
                let want_e = if absmax > 0.0 {
                    (absmax.log2().floor() as i32 - 2 + 127).clamp(0, 254)
                } else {
                    0
                };
                assert_eq!(e[g] as i32, want_e, "k={k} group {g}, absmax {absmax}");
                let scale = 2f64.powi(want_e - 127);
                for (i, &v) in chunk.iter().enumerate() {
                    let want = nearest_e2m1(v as f64 / scale) * scale;
                    let got = back[g * MXFP4_GROUP + i] as f64;
                    assert_eq!(got, want, "k={k} group {g} i={i}: {v}");
                    if absmax / scale < 6.0 + 1e-9 {
                        // Within half a step of the grid (the step is at most 2 * scale).
                        assert!((got - v as f64).abs() <= scale, "k={k}: {v} -> {got}");
                    }
                }
            }
        }
        assert_eq!(QFormat::Mxfp4.bits_per_weight(4096), 4.25);
        assert_eq!(QFormat::Int4 { group: 128 }.bits_per_weight(4096), 4.25);
        assert_eq!(QFormat::Mxfp4.params_shape(2880), vec![90]);
        assert_eq!(QFormat::Mxfp4.row_bytes(2880), 1440);
    }

    /// A params slice of the wrong element type is a caller's bug: it panics naming the format.
    #[test]
    #[should_panic(expected = "Mxfp4 params are U8")]
    fn mxfp4_with_f16_params_panics() {
        let mut p = [f16::ZERO; 1];
        quantize_row(QFormat::Mxfp4, &[1.0; 32], &mut [0u8; 16], &mut p);
    }
}
