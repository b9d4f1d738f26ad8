//! Dot products of weight rows (f32, bf16, f16, INT8, INT4 groups, MXFP4) with f32 activation rows: the inner loop of
//! the CPU expert and linear kernels. One weight row is read (and decoded) once for up to [`MAX_ROWS`]
//! activation rows, in f32 FMAs, with the scale of an INT8 row or an INT4 group applied once per row or group
//! instead of once per weight.
//!
//! Two implementations of the same arithmetic, chosen per call by [`Level`] (detected once, forced through the
//! engine's path selector): AVX2 + FMA + F16C with `std::arch` intrinsics, and a portable one. `std::arch`
//! rather than a SIMD crate (pulp, multiversion): the kernels need a handful of intrinsics (nibble unpacking,
//! widening loads) that the crates would wrap without simplifying, and one runtime check picks the level.
//!
//! INT4 (`w = s * (q - z)` per group of `group` weights): `sum_k x_k w_k = sum_g s_g (sum_{k in g} x_k q_k -
//! z_g X_g)` with `X_g` the group's activation sum, computed once per activation row ([`group_sums`]).
//! MXFP4 (`w = (2 fp4(q)) * 2^(e - 128)` per group of 32): the doubled E2M1 values are the integers
//! ±{0, 1, 2, 3, 4, 6, 8, 12}, looked up 16 (AVX2: 32 with `pshufb`) at a time and scaled by the group's
//! power of two ([`crate::qformat::mxfp4_half_scale`]), exactly.
//!
//! Results equal the reference [`crate::qformat::dequantize_row`] + f32 dot up to f32 summation order.

// Index loops over rows r and lanes mirror the vector code beside them.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use super::avx2;
use crate::qformat::{mxfp4_half_scale, QFormat, QParam, MXFP4_DOUBLED, MXFP4_GROUP};

/// Activation rows one weight row is decoded for at a time.
pub const MAX_ROWS: usize = 4;

/// The instruction set of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// [`Level::Avx2`], and INT8/INT4 weights multiply int8 activations in integer dot products
    /// (`maddubs`): each activation row quantized per block of 32 to int8 with an f32 scale, as
    /// llama.cpp's q8 activations ([`super::q8::Q8Rows`]). Not exact against f32 activations: within the
    /// budget the tests measure.
    Avx2Q8,
    /// Plain Rust (what the compiler vectorises on its own): every other CPU, or when forced.
    Portable,
}

impl Level {
    /// The default: [`Level::Avx2Q8`] where the CPU has AVX2 (the integer kernels are faster and
    /// within their measured budget), else [`Level::Portable`].
    pub fn default_for_cpu() -> Level {
        match Level::detect() {
            Level::Portable => Level::Portable,
            _ => Level::Avx2Q8,
        }
    }

    /// The best level with exact f32 activations this CPU supports (checked once).
    pub fn detect() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
                {
                    return Level::Avx2;
                }
            }
            Level::Portable
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Avx2 => "avx2+fma",
            Level::Avx2Q8 => "avx2+fma, int8 activations",
            Level::Portable => "portable",
        }
    }
}

/// Rows of a weight matrix `[rows, k]` in one storage format (stacked experts are consecutive rows).
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// `q [rows, k]` i8 as u8, `s [rows]` f16.
    Int8 {
        q: &'a [u8],
        s: &'a [f16],
    },
    /// `q [rows, ceil(k/2)]` nibbles (low first), `p [rows, G, 2]` f16 (scale, zero).
    Int4 {
        q: &'a [u8],
        p: &'a [f16],
        group: usize,
    },
    /// `q [rows, ceil(k/2)]` E2M1 nibbles (low first), `e [rows, ceil(k/32)]` E8M0 exponents.
    Mxfp4 {
        q: &'a [u8],
        e: &'a [u8],
    },
}

/// A weight matrix: `rows` rows of `k` features.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: Rows<'a>,
    pub rows: usize,
    pub k: usize,
}

impl<'a> Mat<'a> {
    /// A quantized matrix from its packed bytes and params (the layouts of [`crate::qformat`]; `p` f16 or
    /// u8 as [`QFormat::params_dtype`] says: panics on the other).
    pub fn quant<P: QParam>(
        fmt: QFormat,
        q: &'a [u8],
        p: &'a [P],
        rows: usize,
        k: usize,
    ) -> Mat<'a> {
        let wrong = || -> ! {
            panic!(
                "Mat::quant: {fmt:?} params are {:?}, got {:?}",
                fmt.params_dtype(),
                P::DTYPE
            )
        };
        let data = match fmt {
            QFormat::Int8 => Rows::Int8 {
                q,
                s: P::f16s(p).unwrap_or_else(|| wrong()),
            },
            QFormat::Int4 { group } => Rows::Int4 {
                q,
                p: P::f16s(p).unwrap_or_else(|| wrong()),
                group,
            },
            QFormat::Mxfp4 => Rows::Mxfp4 {
                q,
                e: P::u8s(p).unwrap_or_else(|| wrong()),
            },
        };
        Mat { data, rows, k }
    }

    /// Checks that the storage holds `rows x k` in its format. Returns a message naming what is short.
    pub fn check(&self) -> Result<(), String> {
        let (rows, k) = (self.rows, self.k);
        let need = |what: &str, have: usize, want: usize| {
            if have < want {
                Err(format!(
                    "{what}: {have} elements, a [{rows}, {k}] matrix needs {want}"
                ))
            } else {
                Ok(())
            }
        };
        match self.data {
            Rows::F32(w) => need("f32 weights", w.len(), rows * k),
            Rows::Bf16(w) => need("bf16 weights", w.len(), rows * k),
            Rows::F16(w) => need("f16 weights", w.len(), rows * k),
            Rows::Int8 { q, s } => {
                need("int8 weights", q.len(), rows * k)?;
                need("int8 scales", s.len(), rows)
            }
            Rows::Int4 { q, p, group } => {
                if group == 0 || group % 2 != 0 {
                    return Err(format!("int4 group {group} must be even and positive"));
                }
                need("int4 weights", q.len(), rows * k.div_ceil(2))?;
                need("int4 params", p.len(), rows * 2 * k.div_ceil(group))
            }
            Rows::Mxfp4 { q, e } => {
                need("mxfp4 weights", q.len(), rows * k.div_ceil(2))?;
                need("mxfp4 scales", e.len(), rows * k.div_ceil(MXFP4_GROUP))
            }
        }
    }

    /// Row `r` alone, in the same format: its `k` weights (packed bytes for INT4) and its scale
    /// (INT8) or group params (INT4). What every kernel of a single weight row reads.
    pub fn row(&self, r: usize) -> Rows<'a> {
        let k = self.k;
        match self.data {
            Rows::F32(w) => Rows::F32(&w[r * k..][..k]),
            Rows::Bf16(w) => Rows::Bf16(&w[r * k..][..k]),
            Rows::F16(w) => Rows::F16(&w[r * k..][..k]),
            Rows::Int8 { q, s } => Rows::Int8 {
                q: &q[r * k..][..k],
                s: &s[r..r + 1],
            },
            Rows::Int4 { q, p, group } => {
                let (kb, pr) = (k.div_ceil(2), 2 * k.div_ceil(group));
                Rows::Int4 {
                    q: &q[r * kb..][..kb],
                    p: &p[r * pr..][..pr],
                    group,
                }
            }
            Rows::Mxfp4 { q, e } => {
                let (kb, g) = (k.div_ceil(2), k.div_ceil(MXFP4_GROUP));
                Rows::Mxfp4 {
                    q: &q[r * kb..][..kb],
                    e: &e[r * g..][..g],
                }
            }
        }
    }

    /// The INT4 group size, if any.
    pub fn group(&self) -> Option<usize> {
        match self.data {
            Rows::Int4 { group, .. } => Some(group),
            _ => None,
        }
    }

    /// Bytes of one row in memory (weights and their params).
    pub fn row_bytes(&self) -> usize {
        let k = self.k;
        match self.data {
            Rows::F32(_) => 4 * k,
            Rows::Bf16(_) | Rows::F16(_) => 2 * k,
            Rows::Int8 { .. } => k + 2,
            Rows::Int4 { group, .. } => k.div_ceil(2) + 4 * k.div_ceil(group),
            Rows::Mxfp4 { .. } => k.div_ceil(2) + k.div_ceil(MXFP4_GROUP),
        }
    }
}

/// Per-group activation sums `X_g` of one activation row (INT4 only; empty otherwise), into `out`.
pub fn group_sums(m: &Mat, x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    if let Some(group) = m.group() {
        out.extend(x.chunks(group).map(|c| c.iter().sum::<f32>()));
    }
}

/// Weight row `row` decoded to f32 into `out` (`k` long): the exact values the dot kernels use, bit
/// for bit [`crate::qformat::dequantize_row`]'s at every level.
pub fn decode_row(level: Level, m: &Mat, row: usize, out: &mut [f32]) {
    let out = &mut out[..m.k];
    #[cfg(target_arch = "x86_64")]
    if level != Level::Portable {
        // SAFETY: a level other than Portable means AVX2, FMA and F16C (Level::detect); `out` is
        // `k` long and `m.row` holds the row's weights and params.
        unsafe {
            match m.row(row) {
                Rows::F32(w) => out.copy_from_slice(w),
                Rows::Bf16(w) => avx2::decode_dense(&avx2::Bf16(w), out),
                Rows::F16(w) => avx2::decode_dense(&avx2::F16(w), out),
                Rows::Int8 { q, s } => avx2::decode_int8(q, s[0].to_f32(), out),
                Rows::Int4 { q, p, group } => avx2::decode_int4(q, p, group, out),
                Rows::Mxfp4 { q, e } => avx2::decode_mxfp4(q, e, out),
            }
        }
        return;
    }
    let _ = level;
    match m.row(row) {
        Rows::F32(w) => out.copy_from_slice(w),
        Rows::Bf16(w) => out.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32()),
        Rows::F16(w) => out.iter_mut().zip(w).for_each(|(o, v)| *o = v.to_f32()),
        Rows::Int8 { q, s } => crate::qformat::dequantize_row(QFormat::Int8, q, s, out),
        Rows::Int4 { q, p, group } => {
            crate::qformat::dequantize_row(QFormat::Int4 { group }, q, p, out)
        }
        Rows::Mxfp4 { q, e } => crate::qformat::dequantize_mxfp4_row(q, e, out),
    }
}

/// `out[i] = x_i . W[row]` for `n = xs.len() <= MAX_ROWS` activation rows (each `k` long, with `sums[i]` from
/// [`group_sums`] for INT4).
pub fn dots(level: Level, m: &Mat, row: usize, xs: &[&[f32]], sums: &[&[f32]], out: &mut [f32]) {
    debug_assert!(xs.len() <= MAX_ROWS && out.len() >= xs.len() && row < m.rows);
    match xs.len() {
        1 => dots_n::<1>(level, m, row, xs, sums, out),
        2 => dots_n::<2>(level, m, row, xs, sums, out),
        3 => dots_n::<3>(level, m, row, xs, sums, out),
        4 => dots_n::<4>(level, m, row, xs, sums, out),
        _ => {}
    }
}

fn dots_n<const R: usize>(
    level: Level,
    m: &Mat,
    row: usize,
    xs: &[&[f32]],
    sums: &[&[f32]],
    out: &mut [f32],
) {
    let x: [&[f32]; R] = std::array::from_fn(|i| &xs[i][..m.k]);
    let k = m.k;
    let mut o = [0f32; R];
    #[cfg(target_arch = "x86_64")]
    if level != Level::Portable {
        // SAFETY: Level::Avx2 is only chosen when the CPU has AVX2, FMA and F16C (Level::detect), and every
        // slice below is `k` long (or holds the row's packed bytes and params), as the kernels read.
        unsafe {
            match m.row(row) {
                Rows::F32(w) => avx2::dense(&avx2::F32(w), &x, &mut o),
                Rows::Bf16(w) => avx2::dense(&avx2::Bf16(w), &x, &mut o),
                Rows::F16(w) => avx2::dense(&avx2::F16(w), &x, &mut o),
                Rows::Int8 { q, s } => {
                    avx2::dense(&avx2::I8(q), &x, &mut o);
                    let s = s[0].to_f32();
                    o.iter_mut().for_each(|v| *v *= s);
                }
                Rows::Int4 { q, p, group } if group % 32 == 0 && k.is_multiple_of(32) => {
                    let g = k.div_ceil(group);
                    let sm: [&[f32]; R] = std::array::from_fn(|i| &sums[i][..g]);
                    avx2::int4(q, p, group, &x, &sm, &mut o);
                }
                Rows::Int4 { .. } => portable::dots(m, row, &x, sums, &mut o),
                Rows::Mxfp4 { q, e } if k.is_multiple_of(32) => avx2::mxfp4(q, e, &x, &mut o),
                Rows::Mxfp4 { .. } => portable::dots(m, row, &x, sums, &mut o),
            }
            out[..R].copy_from_slice(&o);
            return;
        }
    }
    let _ = level;
    portable::dots(m, row, &x, sums, &mut o);
    out[..R].copy_from_slice(&o);
}

/// The portable kernels: 8 partial sums per row so the compiler can vectorise the dense formats.
mod portable {
    use super::{mxfp4_half_scale, Mat, Rows, MXFP4_DOUBLED, MXFP4_GROUP};

    fn dense<const R: usize>(
        w: impl Fn(usize) -> f32,
        k: usize,
        x: &[&[f32]; R],
        o: &mut [f32; R],
    ) {
        let mut acc = [[0f32; 8]; R];
        let k8 = k / 8 * 8;
        for c in (0..k8).step_by(8) {
            let wv: [f32; 8] = std::array::from_fn(|l| w(c + l));
            for r in 0..R {
                for l in 0..8 {
                    acc[r][l] += x[r][c + l] * wv[l];
                }
            }
        }
        for r in 0..R {
            let mut s: f32 = acc[r].iter().sum();
            for j in k8..k {
                s += x[r][j] * w(j);
            }
            o[r] = s;
        }
    }

    pub fn dots<const R: usize>(
        m: &Mat,
        row: usize,
        x: &[&[f32]; R],
        sums: &[&[f32]],
        o: &mut [f32; R],
    ) {
        let k = m.k;
        match m.row(row) {
            Rows::F32(w) => dense(|i| w[i], k, x, o),
            Rows::Bf16(w) => dense(|i| w[i].to_f32(), k, x, o),
            Rows::F16(w) => dense(|i| w[i].to_f32(), k, x, o),
            Rows::Int8 { q, s } => {
                dense(|i| q[i] as i8 as f32, k, x, o);
                let s = s[0].to_f32();
                o.iter_mut().for_each(|v| *v *= s);
            }
            Rows::Int4 { q, p, group } => {
                let g = k.div_ceil(group);
                *o = [0f32; R];
                for gi in 0..g {
                    let (s, z) = (p[2 * gi].to_f32(), p[2 * gi + 1].to_f32());
                    let (lo, hi) = (gi * group, ((gi + 1) * group).min(k));
                    // A group starts on a byte (group is even).
                    let qg = &q[lo / 2..hi.div_ceil(2)];
                    let nib = |i: usize| ((qg[i / 2] >> (4 * (i % 2))) & 0xf) as f32;
                    let mut part = [0f32; R];
                    dense(
                        nib,
                        hi - lo,
                        &std::array::from_fn(|r| &x[r][lo..hi]),
                        &mut part,
                    );
                    for r in 0..R {
                        o[r] += s * (part[r] - z * sums[r][gi]);
                    }
                }
            }
            Rows::Mxfp4 { q, e } => {
                *o = [0f32; R];
                for (gi, &eg) in e.iter().enumerate() {
                    let (lo, hi) = (gi * MXFP4_GROUP, ((gi + 1) * MXFP4_GROUP).min(k));
                    let qg = &q[lo / 2..hi.div_ceil(2)];
                    let w = |i: usize| MXFP4_DOUBLED[((qg[i / 2] >> (4 * (i % 2))) & 0xf) as usize];
                    let mut part = [0f32; R];
                    dense(
                        w,
                        hi - lo,
                        &std::array::from_fn(|r| &x[r][lo..hi]),
                        &mut part,
                    );
                    let s = mxfp4_half_scale(eg);
                    for r in 0..R {
                        o[r] += s * part[r];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qformat::{dequantize_row, quantize_rows, QParams};

    /// The vectorised row decoders (the GEMM path's dequantization) equal the reference
    /// `dequantize_row` and the scalar 16-bit conversions bit for bit: every format and group, K with
    /// and without tails, odd groups' neighbours included.
    #[test]
    fn decode_row_is_the_reference_bit_for_bit() {
        let level = Level::detect();
        for k in [1usize, 2, 15, 16, 31, 32, 33, 64, 100, 130, 257, 512] {
            let rows = 3;
            let w = crate::qformat::tests::lcg(rows * k, k as u64);
            let mut got = vec![0f32; k];
            let mut want = vec![0f32; k];
            let bf: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let hf: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            for m in [
                Mat {
                    data: Rows::F32(&w),
                    rows,
                    k,
                },
                Mat {
                    data: Rows::Bf16(&bf),
                    rows,
                    k,
                },
                Mat {
                    data: Rows::F16(&hf),
                    rows,
                    k,
                },
            ] {
                for row in 0..rows {
                    decode_row(level, &m, row, &mut got);
                    decode_row(Level::Portable, &m, row, &mut want);
                    assert_eq!(got, want, "{:?} k={k} row {row}", m.data);
                    assert!(want
                        .iter()
                        .zip(&w[row * k..])
                        .all(|(a, b)| (a - b).abs() <= 0.01 * b.abs()));
                }
            }
            fn check<P: QParam>(
                fmt: QFormat,
                (q, p): (&[u8], &[P]),
                (rows, k): (usize, usize),
                levels: [Level; 2],
                (got, want): (&mut [f32], &mut [f32]),
            ) {
                let (rb, pr): (usize, usize) =
                    (fmt.row_bytes(k), fmt.params_shape(k).iter().product());
                let m = Mat::quant(fmt, q, p, rows, k);
                for row in 0..rows {
                    dequantize_row(fmt, &q[row * rb..][..rb], &p[row * pr..][..pr], want);
                    for lv in levels {
                        got.fill(f32::NAN);
                        decode_row(lv, &m, row, got);
                        assert_eq!(
                            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{fmt:?} {lv:?} k={k} row {row}"
                        );
                    }
                }
            }
            for fmt in [2, 6, 32, 64, 96, 128]
                .map(|group| QFormat::Int4 { group })
                .into_iter()
                .chain([QFormat::Int8, QFormat::Mxfp4])
            {
                // MXFP4 also with every nibble and a spread of exponents (-0.0, e = 0, 1 and 255 included).
                let mut wq = quantize_rows(fmt, &w, k);
                if let QParams::U8(e) = &mut wq.1 {
                    wq.0.iter_mut()
                        .enumerate()
                        .for_each(|(i, b)| *b = (i * 37 % 256) as u8);
                    e.iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = [0, 1, 127, 200, 255][i % 5]);
                }
                let lv = [level, Level::Portable];
                match &wq {
                    (q, QParams::F16(p)) => {
                        check(fmt, (q, p), (rows, k), lv, (&mut got, &mut want))
                    }
                    (q, QParams::U8(p)) => check(fmt, (q, p), (rows, k), lv, (&mut got, &mut want)),
                }
            }
        }
    }
}
