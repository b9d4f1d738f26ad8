//! Dot products of weight rows (f32, bf16, f16, INT8, INT4 groups) with f32 activation rows: the inner loop of
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
//! Results equal the reference [`crate::qformat::dequantize_row`] + f32 dot up to f32 summation order.

// Index loops over rows r and lanes mirror the vector code beside them.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};

use crate::qformat::QFormat;

/// Activation rows one weight row is decoded for at a time.
pub const MAX_ROWS: usize = 4;

/// The instruction set of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// [`Level::Avx2`], and INT8/INT4 weights multiply int8 activations in integer dot products
    /// (`maddubs`): each activation row quantized per block of 32 to int8 with an f32 scale, as
    /// llama.cpp's q8 activations ([`Q8Rows`]). Not exact against f32 activations: within the
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
}

/// A weight matrix: `rows` rows of `k` features.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: Rows<'a>,
    pub rows: usize,
    pub k: usize,
}

impl<'a> Mat<'a> {
    /// A quantized matrix from its packed bytes and f16 params (the layouts of [`crate::qformat`]).
    pub fn quant(fmt: QFormat, q: &'a [u8], p: &'a [f16], rows: usize, k: usize) -> Mat<'a> {
        let data = match fmt {
            QFormat::Int8 => Rows::Int8 { q, s: p },
            QFormat::Int4 { group } => Rows::Int4 { q, p, group },
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

/// Weight row `row` decoded to f32 into `out` (`k` long): the exact values the dot kernels use.
pub fn decode_row(m: &Mat, row: usize, out: &mut [f32]) {
    let k = m.k;
    match m.data {
        Rows::F32(w) => out.copy_from_slice(&w[row * k..][..k]),
        Rows::Bf16(w) => out
            .iter_mut()
            .zip(&w[row * k..][..k])
            .for_each(|(o, v)| *o = v.to_f32()),
        Rows::F16(w) => out
            .iter_mut()
            .zip(&w[row * k..][..k])
            .for_each(|(o, v)| *o = v.to_f32()),
        Rows::Int8 { q, s } => {
            crate::qformat::dequantize_row(QFormat::Int8, &q[row * k..][..k], &s[row..row + 1], out)
        }
        Rows::Int4 { q, p, group } => {
            let (kb, pr) = (k.div_ceil(2), 2 * k.div_ceil(group));
            crate::qformat::dequantize_row(
                QFormat::Int4 { group },
                &q[row * kb..][..kb],
                &p[row * pr..][..pr],
                out,
            )
        }
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
            match m.data {
                Rows::F32(w) => avx2::dense(&avx2::F32(&w[row * k..][..k]), &x, &mut o),
                Rows::Bf16(w) => avx2::dense(&avx2::Bf16(&w[row * k..][..k]), &x, &mut o),
                Rows::F16(w) => avx2::dense(&avx2::F16(&w[row * k..][..k]), &x, &mut o),
                Rows::Int8 { q, s } => {
                    avx2::dense(&avx2::I8(&q[row * k..][..k]), &x, &mut o);
                    let s = s[row].to_f32();
                    o.iter_mut().for_each(|v| *v *= s);
                }
                Rows::Int4 { q, p, group } if group % 32 == 0 && k.is_multiple_of(32) => {
                    let g = k.div_ceil(group);
                    let sm: [&[f32]; R] = std::array::from_fn(|i| &sums[i][..g]);
                    avx2::int4(
                        &q[row * (k / 2)..][..k / 2],
                        &p[row * 2 * g..][..2 * g],
                        group,
                        &x,
                        &sm,
                        &mut o,
                    );
                }
                Rows::Int4 { .. } => portable::dots(m, row, &x, sums, &mut o),
            }
            out[..R].copy_from_slice(&o);
            return;
        }
    }
    let _ = level;
    portable::dots(m, row, &x, sums, &mut o);
    out[..R].copy_from_slice(&o);
}

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
    /// What the rows were last quantized from: (call epoch, data address, length, k, group), so
    /// the tasks of one call that share rows quantize them once per thread.
    key: (u64, usize, usize, usize, usize),
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
            Rows::Int4 { group, .. } if group % 32 == 0 => true,
            _ => return false,
        };
        if k == 0 || !k.is_multiple_of(32) {
            return false;
        }
        let n = x.len() / k;
        let group = m.group().unwrap_or(k);
        let key = (
            epoch,
            x.as_ptr() as usize,
            x.len(),
            k,
            if int4 { group } else { 0 },
        );
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

/// [`dots`] on quantized activations: rows `r0..r0 + n` of `xq` (`n <= MAX_ROWS`) against weight row
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
        match m.data {
            Rows::Int8 { q: w, s } => {
                avx2::int8_q8(&w[row * k..][..k], &q, &d, &mut o);
                let s = s[row].to_f32();
                o.iter_mut().for_each(|v| *v *= s);
            }
            Rows::Int4 { q: w, p, group } => {
                let g = k.div_ceil(group);
                let bs: [&[f32]; R] = std::array::from_fn(|i| &xq.bsum[(r0 + i) * nb..][..nb]);
                avx2::int4_q8(
                    &w[row * (k / 2)..][..k / 2],
                    &p[row * 2 * g..][..2 * g],
                    group,
                    &q,
                    &d,
                    &bs,
                    &mut o,
                );
            }
            _ => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (m, row, q, d);
    out[..R].copy_from_slice(&o);
}

/// The portable kernels: 8 partial sums per row so the compiler can vectorise the dense formats.
mod portable {
    use super::{Mat, Rows};

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
        match m.data {
            Rows::F32(w) => {
                let w = &w[row * k..][..k];
                dense(|i| w[i], k, x, o)
            }
            Rows::Bf16(w) => {
                let w = &w[row * k..][..k];
                dense(|i| w[i].to_f32(), k, x, o)
            }
            Rows::F16(w) => {
                let w = &w[row * k..][..k];
                dense(|i| w[i].to_f32(), k, x, o)
            }
            Rows::Int8 { q, s } => {
                let q = &q[row * k..][..k];
                dense(|i| q[i] as i8 as f32, k, x, o);
                let s = s[row].to_f32();
                o.iter_mut().for_each(|v| *v *= s);
            }
            Rows::Int4 { q, p, group } => {
                let (kb, g) = (k.div_ceil(2), k.div_ceil(group));
                let (q, p) = (&q[row * kb..][..kb], &p[row * 2 * g..][..2 * g]);
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
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    /// Dense weights decoded 16 at a time into two f32 vectors.
    pub trait Load16 {
        fn len(&self) -> usize;
        /// Weights `i..i + 16` (`i + 16 <= len`).
        unsafe fn load16(&self, i: usize) -> (__m256, __m256);
        fn at(&self, i: usize) -> f32;
        /// Asks for the line holding weight `i` (which may lie past this row: the next rows of the
        /// task follow in memory); never faults.
        fn prefetch(&self, i: usize);
    }
    pub struct F32<'a>(pub &'a [f32]);
    pub struct Bf16<'a>(pub &'a [bf16]);
    pub struct F16<'a>(pub &'a [f16]);
    pub struct I8<'a>(pub &'a [u8]);

    impl Load16 for F32<'_> {
        fn len(&self) -> usize {
            self.0.len()
        }
        #[inline(always)]
        fn prefetch(&self, i: usize) {
            // SAFETY: a prefetch is a hint that never faults; wrapping_add keeps the address
            // computation defined past the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.0.as_ptr().wrapping_add(i) as *const i8) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load16(&self, i: usize) -> (__m256, __m256) {
            let p = self.0.as_ptr().add(i);
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        fn at(&self, i: usize) -> f32 {
            self.0[i]
        }
    }
    impl Load16 for Bf16<'_> {
        fn len(&self) -> usize {
            self.0.len()
        }
        #[inline(always)]
        fn prefetch(&self, i: usize) {
            // SAFETY: a prefetch is a hint that never faults; wrapping_add keeps the address
            // computation defined past the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.0.as_ptr().wrapping_add(i) as *const i8) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load16(&self, i: usize) -> (__m256, __m256) {
            // bf16 is the high half of an f32: widen to 32 bits and shift into place.
            let v = _mm256_loadu_si256(self.0.as_ptr().add(i) as *const __m256i);
            let lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
            let hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1));
            (
                _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)),
                _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)),
            )
        }
        fn at(&self, i: usize) -> f32 {
            self.0[i].to_f32()
        }
    }
    impl Load16 for F16<'_> {
        fn len(&self) -> usize {
            self.0.len()
        }
        #[inline(always)]
        fn prefetch(&self, i: usize) {
            // SAFETY: a prefetch is a hint that never faults; wrapping_add keeps the address
            // computation defined past the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.0.as_ptr().wrapping_add(i) as *const i8) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load16(&self, i: usize) -> (__m256, __m256) {
            let p = self.0.as_ptr().add(i) as *const __m128i;
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
            )
        }
        fn at(&self, i: usize) -> f32 {
            self.0[i].to_f32()
        }
    }
    impl Load16 for I8<'_> {
        fn len(&self) -> usize {
            self.0.len()
        }
        #[inline(always)]
        fn prefetch(&self, i: usize) {
            // SAFETY: a prefetch is a hint that never faults; wrapping_add keeps the address
            // computation defined past the slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(self.0.as_ptr().wrapping_add(i) as *const i8) }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load16(&self, i: usize) -> (__m256, __m256) {
            let v = _mm_loadu_si128(self.0.as_ptr().add(i) as *const __m128i);
            (
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))),
            )
        }
        fn at(&self, i: usize) -> f32 {
            self.0[i] as i8 as f32
        }
    }

    /// How far ahead of the current weight the kernels prefetch, in bytes: a task walks consecutive
    /// rows, and one core needs about this much in flight to stream at memory (or large-L3) speed.
    const PREFETCH_BYTES: usize = 1024;
    /// The same distance in weights of a dense row (f32 is 4 bytes, the 16-bit formats 2).
    const PREFETCH_WEIGHTS: usize = 384;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `o[r] = x[r] . w` over the whole row: two accumulator chains per activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dense<const R: usize, W: Load16>(w: &W, x: &[&[f32]; R], o: &mut [f32; R]) {
        let k = w.len();
        let k16 = k / 16 * 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut i = 0;
        while i < k16 {
            w.prefetch(i + PREFETCH_WEIGHTS);
            let (w0, w1) = w.load16(i);
            for r in 0..R {
                let p = x[r].as_ptr().add(i);
                acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(p), w0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(p.add(8)), w1, acc[r][1]);
            }
            i += 16;
        }
        for r in 0..R {
            let mut s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            for j in k16..k {
                s += x[r][j] * w.at(j);
            }
            o[r] = s;
        }
    }

    /// INT4 rows with `group % 32 == 0` and `k % 32 == 0`: per 16 packed bytes, 32 nibbles widened to f32 and
    /// multiplied into the group's partial sums; at the group's end the partial sums are scaled by `s_g` into
    /// the row's accumulators and `s_g z_g X_g` is subtracted.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn int4<const R: usize>(
        q: &[u8],
        p: &[f16],
        group: usize,
        x: &[&[f32]; R],
        sums: &[&[f32]; R],
        o: &mut [f32; R],
    ) {
        let k = 2 * q.len();
        let mask = _mm_set1_epi8(0x0f);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut zterm = [0f32; R];
        let mut lo = 0;
        let mut gi = 0;
        while lo < k {
            let hi = (lo + group).min(k);
            let mut part = [[_mm256_setzero_ps(); 2]; R];
            let mut i = lo;
            while i < hi {
                _mm_prefetch::<_MM_HINT_T0>(
                    q.as_ptr().wrapping_add(i / 2 + PREFETCH_BYTES) as *const i8
                );
                let b = _mm_loadu_si128(q.as_ptr().add(i / 2) as *const __m128i);
                let l = _mm_and_si128(b, mask);
                let h = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                // Weights i..i+16 and i+16..i+32 in order (low nibble first).
                let a = _mm_unpacklo_epi8(l, h);
                let c = _mm_unpackhi_epi8(l, h);
                let w = [
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8))),
                ];
                for r in 0..R {
                    let px = x[r].as_ptr().add(i);
                    part[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(px), w[0], part[r][0]);
                    part[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(8)), w[1], part[r][1]);
                    part[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(16)), w[2], part[r][0]);
                    part[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(24)), w[3], part[r][1]);
                }
                i += 32;
            }
            let (s, z) = scale_zero(p, gi);
            let sv = _mm256_set1_ps(s);
            for r in 0..R {
                acc[r][0] = _mm256_fmadd_ps(part[r][0], sv, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(part[r][1], sv, acc[r][1]);
                zterm[r] += s * z * sums[r][gi];
            }
            lo = hi;
            gi += 1;
        }
        for r in 0..R {
            o[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) - zterm[r];
        }
    }
    /// Group `g`'s (scale, zero) from the f16 params `[G, 2]`, converted with F16C (one 32-bit load).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_zero(p: &[f16], g: usize) -> (f32, f32) {
        let pair = std::ptr::read_unaligned(p.as_ptr().add(2 * g) as *const i32);
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(pair));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    /// Sums of adjacent u8 x i8 products (`maddubs`), widened to 8 i32 and then to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// INT8 weights x q8 activations: per block of 32, `|w| * (x sign(w))` in `maddubs` (|w| <= 127,
    /// so no i16 saturation), scaled by the block's `d`. The row scale is applied by the caller.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn int8_q8<const R: usize>(
        w: &[u8],
        x: &[&[i8]; R],
        d: &[&[f32]; R],
        o: &mut [f32; R],
    ) {
        let nb = w.len() / 32;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut b = 0;
        while b < nb {
            // One prefetch per 64-byte line: two blocks.
            _mm_prefetch::<_MM_HINT_T0>(
                w.as_ptr().wrapping_add(32 * b + PREFETCH_BYTES) as *const i8
            );
            for c in 0..2.min(nb - b) {
                let wv = _mm256_loadu_si256(w.as_ptr().add(32 * (b + c)) as *const __m256i);
                let aw = _mm256_sign_epi8(wv, wv);
                for r in 0..R {
                    let xv = _mm256_loadu_si256(x[r].as_ptr().add(32 * (b + c)) as *const __m256i);
                    let p = dot_u8_i8(aw, _mm256_sign_epi8(xv, wv));
                    acc[r][c] = _mm256_fmadd_ps(p, _mm256_set1_ps(d[r][b + c]), acc[r][c]);
                }
            }
            b += 2;
        }
        for r in 0..R {
            o[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
        }
    }

    /// INT4 weights (groups a multiple of 32) x q8 activations in [`super::int4_q8_position`]'s order:
    /// a 32-byte load of two blocks' packed bytes, split into low nibbles (even k) and high nibbles
    /// (odd k), meets the two blocks' activations in two `maddubs` (sums <= 4 x 15 x 127, no i16
    /// saturation), giving block b's partial sums in the low 128-bit lane and b+1's in the high one.
    /// Per block b in group g: `acc += (w_b . q_b) d_b s_g`; the zero-point term `s_g z_g bsum_b` is
    /// subtracted at the end. Where a window of 8 blocks takes its (scale, zero) pairs in a fixed
    /// pattern (`group / 32` a divisor or a multiple of 8), the window's pairs are converted with one
    /// vector load and the factors `d_b s_g` and the zero-point term computed 8 blocks at a time; other
    /// groups and the last blocks take the pairs one block at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn int4_q8<const R: usize>(
        q: &[u8],
        p: &[f16],
        group: usize,
        x: &[&[i8]; R],
        d: &[&[f32]; R],
        bsum: &[&[f32]; R],
        o: &mut [f32; R],
    ) {
        let nb = q.len() / 16;
        let m = group / 32; // blocks per group
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut zacc = [_mm256_setzero_ps(); R];
        let mut zterm = [0f32; R];
        // Blocks b and b+1, scaled by fac[r] (b's factor in the low four lanes, b+1's in the high).
        let pair = |b: usize, c: usize, fac: &[__m256; R], acc: &mut [[__m256; 2]; R]| {
            let v = _mm256_loadu_si256(q.as_ptr().add(16 * b) as *const __m256i);
            let l = _mm256_and_si256(v, mask);
            let h = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            for r in 0..R {
                let xe = _mm256_loadu_si256(x[r].as_ptr().add(32 * b) as *const __m256i);
                let xo = _mm256_loadu_si256(x[r].as_ptr().add(32 * b + 32) as *const __m256i);
                let s16 =
                    _mm256_add_epi16(_mm256_maddubs_epi16(l, xe), _mm256_maddubs_epi16(h, xo));
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                acc[r][c] = _mm256_fmadd_ps(f, fac[r], acc[r][c]);
            }
        };
        let mut b = 0;
        if m > 0 && (8 % m == 0 || m.is_multiple_of(8)) {
            // Window lane i takes pair i / m of the window's first pair (b / m).
            let pairs = if m <= 8 { 8 / m } else { 1 } as i32;
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let pmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(pairs), lanes);
            let pidx = _mm256_setr_epi32(
                0,
                (1 / m) as i32,
                (2 / m) as i32,
                (3 / m) as i32,
                (4 / m) as i32,
                (5 / m) as i32,
                (6 / m) as i32,
                (7 / m) as i32,
            );
            // Scales (low f16 of each pair) to bytes 0..8 of each 128-bit lane, zeros to bytes 8..16.
            let split = _mm256_setr_epi8(
                0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2,
                3, 6, 7, 10, 11, 14, 15,
            );
            // Factor lanes of the window's pairs of blocks: (0,1), (2,3), (4,5), (6,7).
            let spread =
                [0, 2, 4, 6].map(|i| _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1));
            while b + 8 <= nb {
                _mm_prefetch::<_MM_HINT_T0>(
                    q.as_ptr().wrapping_add(16 * b + PREFETCH_BYTES) as *const i8
                );
                _mm_prefetch::<_MM_HINT_T0>(
                    q.as_ptr().wrapping_add(16 * b + 64 + PREFETCH_BYTES) as *const i8
                );
                let raw = _mm256_maskload_epi32(p.as_ptr().add(2 * (b / m)) as *const i32, pmask);
                let sz = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(
                    _mm256_permutevar8x32_epi32(raw, pidx),
                    split,
                ));
                let s = _mm256_cvtph_ps(_mm256_castsi256_si128(sz));
                let z = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(sz));
                let s_z = _mm256_mul_ps(s, z);
                let mut f8 = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    f8[r] = _mm256_mul_ps(_mm256_loadu_ps(d[r].as_ptr().add(b)), s);
                    let bs = _mm256_loadu_ps(bsum[r].as_ptr().add(b));
                    zacc[r] = _mm256_fmadd_ps(s_z, bs, zacc[r]);
                }
                for (i, idx) in spread.iter().enumerate() {
                    let fac = f8.map(|f| _mm256_permutevar8x32_ps(f, *idx));
                    pair(b + 2 * i, i & 1, &fac, &mut acc);
                }
                b += 8;
            }
        }
        // The rest a pair (then a block) at a time, the (scale, zero) pairs read one by one.
        let mut fac1 = |b: usize| -> [f32; R] {
            let (s, z) = scale_zero(p, b / m);
            std::array::from_fn(|r| {
                zterm[r] += s * z * bsum[r][b];
                d[r][b] * s
            })
        };
        while b + 2 <= nb {
            let (f0, f1) = (fac1(b), fac1(b + 1));
            let fac: [__m256; R] =
                std::array::from_fn(|r| _mm256_set_m128(_mm_set1_ps(f1[r]), _mm_set1_ps(f0[r])));
            pair(b, 0, &fac, &mut acc);
            b += 2;
        }
        if b < nb {
            let f0 = fac1(b);
            let v = _mm_loadu_si128(q.as_ptr().add(16 * b) as *const __m128i);
            let m4 = _mm_set1_epi8(0x0f);
            let wv = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(v, 4), m4),
                _mm_and_si128(v, m4),
            );
            for r in 0..R {
                let xv = _mm256_loadu_si256(x[r].as_ptr().add(32 * b) as *const __m256i);
                acc[r][1] = _mm256_fmadd_ps(dot_u8_i8(wv, xv), _mm256_set1_ps(f0[r]), acc[r][1]);
            }
        }
        for r in 0..R {
            o[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) - hsum(zacc[r]) - zterm[r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qformat::quantize_row;

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
            .chain([QFormat::Int8]);
        for fmt in fmts {
            for k in [32usize, 96, 256, 320, 512, 800, 1024] {
                let rows = 3;
                let w: Vec<f32> = (0..rows * k).map(|_| rnd()).collect();
                let pr: usize = fmt.params_shape(k).iter().product();
                let (mut q, mut p) = (
                    vec![0u8; rows * fmt.row_bytes(k)],
                    vec![f16::ZERO; rows * pr],
                );
                for r in 0..rows {
                    quantize_row(
                        fmt,
                        &w[r * k..][..k],
                        &mut q[r * fmt.row_bytes(k)..][..fmt.row_bytes(k)],
                        &mut p[r * pr..][..pr],
                    );
                }
                let m = Mat::quant(fmt, &q, &p, rows, k);
                for n in 1..=MAX_ROWS {
                    let x: Vec<f32> = (0..n * k).map(|_| 3.0 * rnd()).collect();
                    let mut xq = Q8Rows::default();
                    assert!(xq.quantize(&m, &x, 1), "{fmt:?} k={k}");
                    let int4 = matches!(fmt, QFormat::Int4 { .. });
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
                        decode_row(&m, row, &mut wrow);
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
