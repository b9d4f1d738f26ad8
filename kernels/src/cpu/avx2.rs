//! The AVX2 + FMA + F16C kernels of [`super::simd`] and [`super::q8`] (`std::arch`); callers check
//! [`super::Level`] first, which is only AVX2 where `Level::detect` found the features.

// Index loops over rows r and lanes mirror the vector code beside them.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::{bf16, f16};

/// Dense weights decoded 16 at a time into two f32 vectors.
pub trait Load16 {
    type Elem;
    /// The stored weights of the row.
    fn row(&self) -> &[Self::Elem];
    /// Weights `i..i + 16` (`i + 16 <= len`).
    unsafe fn load16(&self, i: usize) -> (__m256, __m256);
    fn at(&self, i: usize) -> f32;
    fn len(&self) -> usize {
        self.row().len()
    }
    /// Asks for the line holding weight `i` (which may lie past this row: the next rows of the
    /// task follow in memory); never faults.
    #[inline(always)]
    fn prefetch(&self, i: usize) {
        // SAFETY: a prefetch is a hint that never faults; wrapping_add keeps the address
        // computation defined past the slice.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(self.row().as_ptr().wrapping_add(i) as *const i8) }
    }
}
pub struct F32<'a>(pub &'a [f32]);
pub struct Bf16<'a>(pub &'a [bf16]);
pub struct F16<'a>(pub &'a [f16]);
pub struct I8<'a>(pub &'a [u8]);

impl Load16 for F32<'_> {
    type Elem = f32;
    fn row(&self) -> &[Self::Elem] {
        self.0
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
    type Elem = bf16;
    fn row(&self) -> &[Self::Elem] {
        self.0
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
    type Elem = f16;
    fn row(&self) -> &[Self::Elem] {
        self.0
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
    type Elem = u8;
    fn row(&self) -> &[Self::Elem] {
        self.0
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
pub unsafe fn int8_q8<const R: usize>(w: &[u8], x: &[&[i8]; R], d: &[&[f32]; R], o: &mut [f32; R]) {
    let nb = w.len() / 32;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut b = 0;
    while b < nb {
        // One prefetch per 64-byte line: two blocks.
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(32 * b + PREFETCH_BYTES) as *const i8);
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

/// INT4 weights (groups a multiple of 32) x q8 activations in [`super::q8::int4_q8_position`]'s order:
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
            let s16 = _mm256_add_epi16(_mm256_maddubs_epi16(l, xe), _mm256_maddubs_epi16(h, xo));
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
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2, 3,
            6, 7, 10, 11, 14, 15,
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

/// A dense row decoded to f32 (bit for bit the scalar conversion).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_dense<W: Load16>(w: &W, out: &mut [f32]) {
    let k = w.len();
    let k16 = k / 16 * 16;
    let mut i = 0;
    while i < k16 {
        let (a, b) = w.load16(i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), a);
        _mm256_storeu_ps(out.as_mut_ptr().add(i + 8), b);
        i += 16;
    }
    for j in k16..k {
        out[j] = w.at(j);
    }
}

/// An INT8 row `s * q` decoded to f32, as [`crate::qformat::dequantize_row`] computes it.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_int8(q: &[u8], s: f32, out: &mut [f32]) {
    let (w, sv) = (I8(q), _mm256_set1_ps(s));
    let k16 = q.len() / 16 * 16;
    let mut i = 0;
    while i < k16 {
        let (a, b) = w.load16(i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(sv, a));
        _mm256_storeu_ps(out.as_mut_ptr().add(i + 8), _mm256_mul_ps(sv, b));
        i += 16;
    }
    for j in k16..q.len() {
        out[j] = s * w.at(j);
    }
}

/// An INT4 row `s_g (q - z_g)` (any even group) decoded to f32, as
/// [`crate::qformat::dequantize_row`] computes it: 32 weights per 16-byte load inside a group, the
/// rest one at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_int4(q: &[u8], p: &[f16], group: usize, out: &mut [f32]) {
    let k = out.len();
    let mask = _mm_set1_epi8(0x0f);
    let (mut lo, mut g) = (0, 0);
    while lo < k {
        let hi = (lo + group).min(k);
        let (s, z) = scale_zero(p, g);
        let (sv, zv) = (_mm256_set1_ps(s), _mm256_set1_ps(z));
        let mut i = lo;
        while i + 32 <= hi {
            let b = _mm_loadu_si128(q.as_ptr().add(i / 2) as *const __m128i);
            let l = _mm_and_si128(b, mask);
            let h = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            let (a, c) = (_mm_unpacklo_epi8(l, h), _mm_unpackhi_epi8(l, h));
            for (n, v) in [a, _mm_srli_si128(a, 8), c, _mm_srli_si128(c, 8)]
                .into_iter()
                .enumerate()
            {
                let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                let o = _mm256_mul_ps(sv, _mm256_sub_ps(f, zv));
                _mm256_storeu_ps(out.as_mut_ptr().add(i + 8 * n), o);
            }
            i += 32;
        }
        while i < hi {
            let b = q[i / 2];
            out[i] = s * ((if i % 2 == 0 { b & 0xf } else { b >> 4 }) as f32 - z);
            i += 1;
        }
        lo = hi;
        g += 1;
    }
}

/// The doubled E2M1 values of the 16 nibbles as i8 ([`crate::qformat::MXFP4_DOUBLED`]), a `pshufb` table.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mxfp4_table() -> __m128i {
    _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
}

/// An MXFP4 row (`k = 2 q.len()` rounded to `out.len()`) decoded to f32 bit for bit as
/// [`crate::qformat::dequantize_row`]: per 8 nibbles, the magnitude from an 8-float table
/// (`permutevar8x32`, which reads the low 3 bits), the sign bit (nibble bit 3) moved to bit 31 (so nibble 8
/// is -0.0), times the group's `2^(e - 128)`. Whole groups of 32 vectorised, a partial last group scalar.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_mxfp4(q: &[u8], e: &[u8], out: &mut [f32]) {
    let k = out.len();
    let mags = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0);
    let mask = _mm_set1_epi8(0x0f);
    let eight = _mm256_set1_epi32(8);
    let full = k / 32;
    for g in 0..full {
        let sv = _mm256_set1_ps(crate::qformat::mxfp4_half_scale(e[g]));
        let b = _mm_loadu_si128(q.as_ptr().add(16 * g) as *const __m128i);
        let l = _mm_and_si128(b, mask);
        let h = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        let (a, c) = (_mm_unpacklo_epi8(l, h), _mm_unpackhi_epi8(l, h));
        for (n, v) in [a, _mm_srli_si128(a, 8), c, _mm_srli_si128(c, 8)]
            .into_iter()
            .enumerate()
        {
            let idx = _mm256_cvtepu8_epi32(v);
            let mag = _mm256_permutevar8x32_ps(mags, idx);
            let sign = _mm256_slli_epi32(_mm256_and_si256(idx, eight), 28);
            let w = _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
            _mm256_storeu_ps(out.as_mut_ptr().add(32 * g + 8 * n), _mm256_mul_ps(w, sv));
        }
    }
    if full * 32 < k {
        crate::qformat::dequantize_mxfp4_row(&q[16 * full..], &e[full..], &mut out[32 * full..]);
    }
}

/// MXFP4 rows with `k % 32 == 0` against f32 activations: per group (16 packed bytes), the 32 nibbles in
/// k order looked up as i8 doubled values with one `pshufb`, widened to f32, scaled by the group's
/// `2^(e - 128)` (exact) and multiplied into two accumulators per activation row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn mxfp4<const R: usize>(q: &[u8], e: &[u8], x: &[&[f32]; R], o: &mut [f32; R]) {
    let nb = q.len() / 16;
    let mask = _mm_set1_epi8(0x0f);
    let lut = mxfp4_table();
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().wrapping_add(16 * b + PREFETCH_BYTES) as *const i8);
        let v = _mm_loadu_si128(q.as_ptr().add(16 * b) as *const __m128i);
        let l = _mm_and_si128(v, mask);
        let h = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        // Weights 32b..32b+16 and 32b+16..32b+32 (low nibble first), as i8.
        let a = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(l, h));
        let c = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(l, h));
        let sv = _mm256_set1_ps(crate::qformat::mxfp4_half_scale(e[b]));
        let w = [a, _mm_srli_si128(a, 8), c, _mm_srli_si128(c, 8)]
            .map(|v| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), sv));
        let i = 32 * b;
        for r in 0..R {
            let px = x[r].as_ptr().add(i);
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(px), w[0], acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(8)), w[1], acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(16)), w[2], acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(24)), w[3], acc[r][1]);
        }
    }
    for r in 0..R {
        o[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
}

/// MXFP4 weights x q8 activations in [`super::q8::int4_q8_position`]'s order (INT4's: a 32-byte load of two
/// groups splits into low nibbles = even k and high nibbles = odd k): `pshufb` turns the nibbles into i8
/// doubled values in -12..=12, and `maddubs(|w|, sign(x, w))` sums their products with the activations
/// (<= 4 x 12 x 127 per i16, no saturation). Block b's sums land in the low 128-bit lane, b+1's in the high
/// one, each scaled by `d_b 2^(e_b - 128)`. No zero-point term.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn mxfp4_q8<const R: usize>(
    q: &[u8],
    e: &[u8],
    x: &[&[i8]; R],
    d: &[&[f32]; R],
    o: &mut [f32; R],
) {
    use crate::qformat::mxfp4_half_scale;
    let nb = q.len() / 16;
    let mask = _mm256_set1_epi8(0x0f);
    let lut = _mm256_broadcastsi128_si256(mxfp4_table());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut b = 0;
    while b + 2 <= nb {
        _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().wrapping_add(16 * b + PREFETCH_BYTES) as *const i8);
        let v = _mm256_loadu_si256(q.as_ptr().add(16 * b) as *const __m256i);
        let l = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, mask));
        let h = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask));
        let (al, ah) = (_mm256_sign_epi8(l, l), _mm256_sign_epi8(h, h));
        let (s0, s1) = (mxfp4_half_scale(e[b]), mxfp4_half_scale(e[b + 1]));
        for r in 0..R {
            let xe = _mm256_loadu_si256(x[r].as_ptr().add(32 * b) as *const __m256i);
            let xo = _mm256_loadu_si256(x[r].as_ptr().add(32 * b + 32) as *const __m256i);
            let s16 = _mm256_add_epi16(
                _mm256_maddubs_epi16(al, _mm256_sign_epi8(xe, l)),
                _mm256_maddubs_epi16(ah, _mm256_sign_epi8(xo, h)),
            );
            let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            let fac = _mm256_set_m128(_mm_set1_ps(d[r][b + 1] * s1), _mm_set1_ps(d[r][b] * s0));
            acc[r][(b / 2) & 1] = _mm256_fmadd_ps(f, fac, acc[r][(b / 2) & 1]);
        }
        b += 2;
    }
    if b < nb {
        // A last unpaired block: its activations are [evens, odds].
        let v = _mm_loadu_si128(q.as_ptr().add(16 * b) as *const __m128i);
        let m4 = _mm_set1_epi8(0x0f);
        let codes = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(v, 4), m4),
            _mm_and_si128(v, m4),
        );
        let wv = _mm256_shuffle_epi8(lut, codes);
        let aw = _mm256_sign_epi8(wv, wv);
        let s = mxfp4_half_scale(e[b]);
        for r in 0..R {
            let xv = _mm256_loadu_si256(x[r].as_ptr().add(32 * b) as *const __m256i);
            let p = dot_u8_i8(aw, _mm256_sign_epi8(xv, wv));
            acc[r][1] = _mm256_fmadd_ps(p, _mm256_set1_ps(d[r][b] * s), acc[r][1]);
        }
    }
    for r in 0..R {
        o[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    }
}
