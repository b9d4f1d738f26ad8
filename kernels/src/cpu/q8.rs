//! Activations quantized to int8 per block of 32 ([`Q8Rows`]) and the integer dot products of INT8,
//! INT4 and MXFP4 weight rows with them ([`dots_q8`], [`super::Level::Avx2Q8`]), as llama.cpp's q8 activations.

// Index loops over rows r and lanes mirror the vector code beside them.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::simd::{Mat, Rows};

/// Where element `c` of an activation row (`nb` blocks of 32) is stored for the INT4 integer kernel:
/// the order of nibbles split into low (even k) and high (odd k) halves. Blocks go in pairs,
/// `[evens of b, evens of b+1, odds of b, odds of b+1]` (one 32-byte load of packed weights splits into
/// the two halves); a last unpaired block is `[evens, odds]`.
pub fn int4_q8_position(c: usize, nb: usize) -> usize {
    let (b, i) = (c / 32, c % 32);
    if b % 2 == 0 && b + 1 == nb {
        32 * b + i / 2 + 16 * (i % 2)
    } else {
        32 * (b - b % 2) + 16 * (b % 2) + i / 2 + 32 * (i % 2)
    }
}

/// Activation rows quantized to int8 in blocks of 32 for the integer kernels of [`Level::Avx2Q8`]:
/// `x ~ d_b * q` per block, `q` in -127..=127, in k order for INT8 and in [`int4_q8_position`]'s
/// order for INT4. `bsum[r][b]` = block b's `d_b sum q` (the quantized activations' sum, for INT4's
/// zero-point term).
#[derive(Default)]
pub struct Q8Rows {
    /// What the rows were last quantized from: (call epoch, data address, length, k, INT4 order), so
    /// the tasks of one call that share rows quantize them once per thread.
    key: (u64, usize, usize, usize, bool),
    q: Vec<i8>,
    d: Vec<f32>,
    bsum: Vec<f32>,
    k: usize,
}

impl Q8Rows {
    /// Quantizes the `x.len() / k` rows of `x` for weights `m` (or keeps them when this thread
    /// already quantized the same rows in the same `epoch`, a number unique to one kernel call);
    /// `false` (nothing done) when `m` has no integer kernel: a float format, `k % 32 != 0`, or an INT4 group that is not a multiple of 32.
    pub fn quantize(&mut self, m: &Mat, x: &[f32], epoch: u64) -> bool {
        let k = m.k;
        let int4 = match m.data {
            Rows::Int8 { .. } => false,
            // MXFP4 reads its activations in INT4's order (one 32-byte load = two groups' nibbles).
            Rows::Int4 { group, .. } if group % 32 == 0 => true,
            Rows::Mxfp4 { .. } => true,
            _ => return false,
        };
        if k == 0 || !k.is_multiple_of(32) {
            return false;
        }
        let n = x.len() / k;
        let key = (epoch, x.as_ptr() as usize, x.len(), k, int4);
        if key == self.key {
            return true;
        }
        self.key = key;
        self.k = k;
        self.q.clear();
        self.q.resize(n * k, 0);
        self.d.clear();
        self.bsum.clear();
        for r in 0..n {
            for b in 0..k / 32 {
                let xb = &x[r * k + 32 * b..][..32];
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let qr = &mut self.q[r * k..][..k];
                let mut sum = 0i32;
                for (i, &v) in xb.iter().enumerate() {
                    // Round half away from zero without a libm call; |v * inv| <= 127.
                    let t = v * inv;
                    let qv = (t + 0.5f32.copysign(t)) as i32 as i8;
                    sum += qv as i32;
                    let c = 32 * b + i;
                    qr[if int4 { int4_q8_position(c, k / 32) } else { c }] = qv;
                }
                self.d.push(d);
                self.bsum.push(d * sum as f32);
            }
        }
        true
    }
}

/// [`super::simd::dots`] on quantized activations: rows `r0..r0 + n` of `xq` (`n <= MAX_ROWS`) against weight row
/// `row` of an INT8/INT4 matrix that [`Q8Rows::quantize`] accepted. AVX2 only (callers check the level).
pub fn dots_q8(m: &Mat, row: usize, xq: &Q8Rows, r0: usize, n: usize, out: &mut [f32]) {
    match n {
        1 => dots_q8_n::<1>(m, row, xq, r0, out),
        2 => dots_q8_n::<2>(m, row, xq, r0, out),
        3 => dots_q8_n::<3>(m, row, xq, r0, out),
        4 => dots_q8_n::<4>(m, row, xq, r0, out),
        _ => {}
    }
}

fn dots_q8_n<const R: usize>(m: &Mat, row: usize, xq: &Q8Rows, r0: usize, out: &mut [f32]) {
    let (k, nb) = (xq.k, xq.k / 32);
    let q: [&[i8]; R] = std::array::from_fn(|i| &xq.q[(r0 + i) * k..][..k]);
    let d: [&[f32]; R] = std::array::from_fn(|i| &xq.d[(r0 + i) * nb..][..nb]);
    let mut o = [0f32; R];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: Level::Avx2Q8 is only chosen where Level::detect found AVX2 (callers check); the slices
    // hold the row's bytes and params and R rows of k quantized activations.
    unsafe {
        match m.row(row) {
            Rows::Int8 { q: w, s } => {
                avx2::int8_q8(w, &q, &d, &mut o);
                let s = s[0].to_f32();
                o.iter_mut().for_each(|v| *v *= s);
            }
            Rows::Int4 { q: w, p, group } => {
                let bs: [&[f32]; R] = std::array::from_fn(|i| &xq.bsum[(r0 + i) * nb..][..nb]);
                avx2::int4_q8(w, p, group, &q, &d, &bs, &mut o);
            }
            Rows::Mxfp4 { q: w, e } => avx2::mxfp4_q8(w, e, &q, &d, &mut o),
            _ => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, row, q, d);
    out[..R].copy_from_slice(&o);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::{decode_row, Level, MAX_ROWS};
    use crate::qformat::{quantize_rows, QFormat, QParams};

    /// The integer kernels equal, to f32 rounding, the f64 dot of the dequantized weights with the
    /// dequantized activations `d_b q` (their specification; the error of quantizing activations is
    /// budgeted separately in tests/cpu_kernels.rs): every group (the 8-block window path where
    /// `group / 32` divides 8 or is a multiple of 8, one block at a time for 96 and 160), K with and
    /// without a tail after the windows, 1 to 4 rows.
    #[test]
    fn q8_kernels_equal_the_dot_of_dequantized_operands() {
        if Level::detect() == Level::Portable {
            return; // no integer kernels on this CPU; cpu_kernels.rs covers the portable level
        }
        let mut s = 0x2545f4914f6cdd1du64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let fmts = [32, 64, 96, 128, 160, 256, 512]
            .map(|group| QFormat::Int4 { group })
            .into_iter()
            .chain([QFormat::Int8, QFormat::Mxfp4]);
        for fmt in fmts {
            for k in [32usize, 96, 256, 320, 512, 800, 1024] {
                let rows = 3;
                let w: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
                let (q, p) = quantize_rows(fmt, &w, k);
                let m = match &p {
                    QParams::F16(p) => Mat::quant(fmt, &q, p, rows, k),
                    QParams::U8(p) => Mat::quant(fmt, &q, p, rows, k),
                };
                for n in 1..=MAX_ROWS {
                    let x: Vec<f32> = (0..n * k).map(|_| 3.0 * rnd()).collect();
                    let mut xq = Q8Rows::default();
                    assert!(xq.quantize(&m, &x, 1), "{fmt:?} k={k}");
                    let int4 = matches!(fmt, QFormat::Int4 { .. } | QFormat::Mxfp4);
                    // The activations the kernel sees, back in k order.
                    let xhat: Vec<f64> = (0..n * k)
                        .map(|i| {
                            let (r, c) = (i / k, i % k);
                            let at = if int4 { int4_q8_position(c, k / 32) } else { c };
                            xq.d[r * k / 32 + c / 32] as f64 * xq.q[r * k + at] as f64
                        })
                        .collect();
                    let mut wrow = vec![0f32; k];
                    let mut out = [0f32; MAX_ROWS];
                    for row in 0..rows {
                        decode_row(Level::Portable, &m, row, &mut wrow);
                        dots_q8(&m, row, &xq, 0, n, &mut out);
                        for i in 0..n {
                            let xr = &xhat[i * k..][..k];
                            let want: f64 = xr.iter().zip(&wrow).map(|(a, &b)| a * b as f64).sum();
                            let scale: f64 = xr
                                .iter()
                                .zip(&wrow)
                                .map(|(a, &b)| (a * b as f64).abs())
                                .sum();
                            let err = (out[i] as f64 - want).abs();
                            assert!(
                                err <= 1e-5 * scale,
                                "{fmt:?} k={k} rows={n} row {row} x{i}: {} vs {want} (|terms| {scale})",
                                out[i]
                            );
                        }
                    }
                }
            }
        }
    }
}
