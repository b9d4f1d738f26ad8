//! Weight-only quantized matmuls (W8A16, W4A16): `y = x W^T` with W stored quantized and
//! dequantized on the fly. This file is the specification of both formats (quantize, dequantize)
//! and of the two ops that use them: a dense linear and the grouped expert layout.
//!
//! Legend: M activation rows, K input features (the reduction dim), N output features,
//! E experts, G = ceil(K / group) groups per row, Kb bytes per packed row.
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
//!
//! Matmul semantics shared by the CPU reference and `cuda/qmatmul.cu`: accumulate in f32 over k,
//! output rounded once (nearest even) to the activation dtype (f32, bf16 or f16). The summation
//! order is unspecified (the GPU splits K over threads): results are compared by NMSE.

use crate::common::Elem;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape};
use half::f16;

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

    fn params_per_row(self, k: usize) -> usize {
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

/// f32 dot product with 8 independent partial sums (so it vectorizes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Problem sizes of one (possibly grouped) quantized matmul.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Experts (1 for a dense linear).
    pub e: usize,
}

pub(crate) fn check(
    fmt: QFormat,
    grouped: bool,
    (x_dtype, x_dims): (DType, &[usize]),
    (q_dtype, q_dims): (DType, &[usize]),
    (p_dtype, p_dims): (DType, &[usize]),
) -> Result<Dims> {
    let op = if grouped { OP_GROUPED } else { OP };
    if !matches!(x_dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("{op}: x must be f32, bf16 or f16, got {x_dtype:?}");
    }
    if q_dtype != DType::U8 || p_dtype != DType::F16 {
        bail!("{op}: qweight must be u8 and params f16, got {q_dtype:?} and {p_dtype:?}");
    }
    if let QFormat::Int4 { group } = fmt {
        if group == 0 || group % 2 != 0 {
            bail!("{op}: int4 group size must be even and > 0, got {group}");
        }
    }
    let &[m, k] = x_dims else {
        bail!("{op}: x must be [M, K], got {x_dims:?}");
    };
    let (e, rest) = if grouped {
        match q_dims.split_first() {
            Some((&e, rest)) => (e, rest),
            None => bail!("{op}: qweight must be [E, N, Kb], got {q_dims:?}"),
        }
    } else {
        (1, q_dims)
    };
    let &[n, kb] = rest else {
        bail!("{op}: qweight must be [.., N, Kb], got {q_dims:?}");
    };
    if kb != fmt.row_bytes(k) {
        bail!(
            "{op}: qweight rows hold {kb} bytes, {fmt:?} with K = {k} needs {}",
            fmt.row_bytes(k)
        );
    }
    let mut want = if grouped { vec![e, n] } else { vec![n] };
    want.extend(fmt.params_shape(k));
    if p_dims != want.as_slice() {
        bail!("{op}: params must be {want:?}, got {p_dims:?}");
    }
    Ok(Dims { m, k, n, e })
}

fn slice<'a, T>(data: &'a [T], layout: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((o1, o2)) if o2 <= data.len() => Ok(&data[o1..o2]),
        _ => bail!(
            "{op}: {what} must be contiguous (shape {:?})",
            layout.dims()
        ),
    }
}

/// Multiply-adds per CPU task of [`reference`] (at least [`CPU_MIN_BLOCK_N`] output features):
/// a task dequantizes its block of weight rows once and dots them with all of the expert's
/// activation rows. Large enough that rayon's per-task cost is noise at M = 1.
const CPU_TASK_MACS: usize = 1 << 16;
const CPU_MIN_BLOCK_N: usize = 16;

/// The specification: rows `rows[e]` of x use expert e's weights. `out [M, N]`.
///
/// Threads (rayon) split the work by (expert, block of output features), so
/// every weight row is dequantized once; each output is still one [`dot`] over the whole of K,
/// so results do not depend on the thread count.
fn reference<T: Elem>(
    fmt: QFormat,
    x: &[T],
    q: &[u8],
    p: &[f16],
    d: Dims,
    rows: &[std::ops::Range<usize>],
) -> Vec<T> {
    use rayon::prelude::*;
    let (k, n) = (d.k, d.n);
    let (kb, pr) = (fmt.row_bytes(k), fmt.params_per_row(k));
    let xf: Vec<f32> = x.iter().map(|v| v.f32()).collect();
    let tasks: Vec<(usize, std::ops::Range<usize>)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_empty())
        .flat_map(|(e, r)| {
            let block = (CPU_TASK_MACS / (r.len() * k).max(1)).max(CPU_MIN_BLOCK_N);
            (0..n)
                .step_by(block)
                .map(move |j| (e, j..(j + block).min(n)))
        })
        .collect();
    // Per task, `[rows of e, block]` row-major.
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(
            || vec![0f32; k],
            |w, (e, js)| {
                let (r, nb) = (rows[*e].clone(), js.len());
                let mut y = vec![0f32; r.len() * nb];
                for (jj, j) in js.clone().enumerate() {
                    let row = e * n + j;
                    dequantize_row(
                        fmt,
                        &q[row * kb..(row + 1) * kb],
                        &p[row * pr..(row + 1) * pr],
                        w,
                    );
                    for (ii, i) in r.clone().enumerate() {
                        y[ii * nb + jj] = dot(&xf[i * k..(i + 1) * k], w);
                    }
                }
                y
            },
        )
        .collect();
    let mut out = vec![T::of(0.0); d.m * n];
    for ((e, js), y) in tasks.iter().zip(&blocks) {
        let nb = js.len();
        for (ii, i) in rows[*e].clone().enumerate() {
            for (o, &v) in out[i * n + js.start..i * n + js.end]
                .iter_mut()
                .zip(&y[ii * nb..(ii + 1) * nb])
            {
                *o = T::of(v);
            }
        }
    }
    out
}

/// Self-test budgets (nmse of the CUDA kernel vs [`QMatmul`]'s CPU reference on identical quantized
/// weights): the two dequantize to the same f32 weights, so only the f32 summation order differs, plus the
/// final rounding to bf16/f16 where an output lands near a rounding boundary.
pub const QMATMUL_NMSE_F32: f64 = 1e-10;
pub const QMATMUL_NMSE_BF16: f64 = 1e-4;
pub const QMATMUL_NMSE_F16: f64 = 1e-6;

const OP: &str = "qmatmul";
pub(crate) const OP_GROUPED: &str = "qmatmul_grouped";

/// The candle op behind [`crate::qmatmul()`] (`offsets: None`) and [`crate::qmatmul_grouped`].
#[derive(Debug, Clone)]
pub struct QMatmul {
    pub fmt: QFormat,
    /// Expert row offsets `[E + 1]` on the host for the grouped layout.
    pub offsets: Option<Vec<u32>>,
}

impl QMatmul {
    fn name_(&self) -> &'static str {
        if self.offsets.is_some() {
            OP_GROUPED
        } else {
            OP
        }
    }
}

impl CustomOp3 for QMatmul {
    fn name(&self) -> &'static str {
        self.name_()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name_();
        let d = check(
            self.fmt,
            self.offsets.is_some(),
            (s1.dtype(), l1.dims()),
            (s2.dtype(), l2.dims()),
            (s3.dtype(), l3.dims()),
        )?;
        let q = slice(s2.as_slice::<u8>()?, l2, op, "qweight")?;
        let p = slice(s3.as_slice::<f16>()?, l3, op, "params")?;
        let rows: Vec<_> = match &self.offsets {
            None => std::iter::once(0..d.m).collect(),
            Some(o) => o.windows(2).map(|w| w[0] as usize..w[1] as usize).collect(),
        };
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(reference(self.fmt, slice(x, l1, op, "x")?, q, p, d, &rows))
            }
            CpuStorage::BF16(x) => {
                CpuStorage::BF16(reference(self.fmt, slice(x, l1, op, "x")?, q, p, d, &rows))
            }
            CpuStorage::F16(x) => {
                CpuStorage::F16(reference(self.fmt, slice(x, l1, op, "x")?, q, p, d, &rows))
            }
            other => bail!("{op}: x must be f32, bf16 or f16, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from((d.m, d.n))))
    }

    /// Launches `cuda/qmatmul.cu` (GEMV-style, one warp per output feature and chunk of up to
    /// [`QMM_ROWS`] activation rows). `qmatmul`/`qmatmul_grouped` send launches with many rows per
    /// expert on CUDA to the tiled GEMM (`qexperts::large_qmatmul`) instead. Written and
    /// compiled without a GPU: NOT YET RUN on one (`moe-run selftest --device cuda --filter qmatmul`).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::common::cuda::alloc_out;
        use crate::common::cuda_act::ActView;
        use crate::cuda_util::{contiguous, module_key};
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};

        let op = self.name_();
        let d = check(
            self.fmt,
            self.offsets.is_some(),
            (s1.dtype(), l1.dims()),
            (s2.dtype(), l2.dims()),
            (s3.dtype(), l3.dims()),
        )?;
        if d.m == 0 || d.n == 0 {
            bail!(
                "{op}: empty output [{}, {}]: use qmatmul(), which handles it",
                d.m,
                d.n
            );
        }
        if d.m > u32::MAX as usize || d.n > u32::MAX as usize || d.k > u32::MAX as usize {
            bail!(
                "{op}: sizes must fit in u32, got M = {}, N = {}, K = {}",
                d.m,
                d.n,
                d.k
            );
        }
        let dev = s1.device().clone();
        let x = ActView::new(s1, l1, op, "x")?;
        let q = contiguous(s2.as_cuda_slice::<u8>()?, l2, op, "qweight")?;
        let p = contiguous(s3.as_cuda_slice::<f16>()?, l3, op, "params")?;
        let chunks = chunk_table(self.offsets.as_deref(), d.m);
        let n_chunks = chunks.len() / 3;
        let chunks = dev.clone_htod(&chunks)?;
        let (kind, group) = match self.fmt {
            QFormat::Int8 => ("int8", 0u32),
            QFormat::Int4 { group } => ("int4", group.min(u32::MAX as usize) as u32),
        };
        let fn_name = format!("qmatmul_{kind}_{}", x.suffix());
        let m = &crate::ptx::QMATMUL;
        let func = dev.get_or_load_custom_func(&fn_name, &module_key(m), m.ptx)?;
        let cfg = LaunchConfig {
            grid_dim: (
                d.n.div_ceil(QMM_WARPS) as u32,
                n_chunks.clamp(1, 65535) as u32,
                1,
            ),
            block_dim: (QMM_WARPS as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! go {
            ($ty:ty, $variant:ident) => {{
                let out = alloc_out::<$ty>(&dev, d.m * d.n)?;
                let mut b = func.builder();
                x.push(&mut b);
                b.arg(&q);
                b.arg(&p);
                b.arg(&chunks);
                b.arg(&out);
                candle_core::builder_arg!(
                    b,
                    n_chunks as u32,
                    d.n as u32,
                    d.k as u32,
                    group
                );
                // SAFETY: argument types and order match `qmatmul_<fmt>_<dtype>` in cuda/qmatmul.cu;
                // `check` validated every shape, and the chunk table covers rows 0..M with experts < E,
                // so every index is < M*K (x), E*N*Kb (qweight), E*N*params (params) or M*N (out).
                unsafe { b.launch(cfg) }.w()?;
                CudaStorageSlice::$variant(out)
            }};
        }
        let slice = match &x {
            ActView::F32(_) => go!(f32, F32),
            ActView::BF16(_) => go!(half::bf16, BF16),
            ActView::F16(_) => go!(f16, F16),
        };
        Ok((
            candle_core::CudaStorage { slice, device: dev },
            Shape::from((d.m, d.n)),
        ))
    }
}

/// Activation rows per warp in `cuda/qmatmul.cu` (`QMM_ROWS`): each packed weight row is read once per
/// chunk of this many rows.
pub const QMM_ROWS: usize = 8;
/// Warps (output features) per block in `cuda/qmatmul.cu` (`QMM_WARPS`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const QMM_WARPS: usize = 4;

/// The CUDA kernel's work list, flattened `[C, 3]` u32: (expert, first row, rows <= [`QMM_ROWS`]) for
/// every expert's rows (`offsets`, or all M rows as expert 0), in row order; empty experts get no chunk.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn chunk_table(offsets: Option<&[u32]>, m: usize) -> Vec<u32> {
    let whole = [0u32, m as u32];
    let offsets = offsets.unwrap_or(&whole);
    let mut out = Vec::new();
    for (e, w) in offsets.windows(2).enumerate() {
        let mut r = w[0];
        while r < w[1] {
            let cnt = (w[1] - r).min(QMM_ROWS as u32);
            out.extend([e as u32, r, cnt]);
            r += cnt;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
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
    fn launcher_matches_the_cuda_source() {
        // The kernel cannot run here (no GPU); at least keep the launcher's constants and entry names in
        // step with cuda/qmatmul.cu.
        let src = include_str!("../cuda/qmatmul.cu");
        assert!(src.contains(&format!("#define QMM_ROWS {QMM_ROWS}\n")));
        assert!(src.contains(&format!("#define QMM_WARPS {QMM_WARPS}\n")));
        for fmt in ["int8", "int4"] {
            for dt in ["f32", "bf16", "f16"] {
                assert!(src.contains(&format!("QMATMUL_ENTRY(qmatmul_{fmt}_{dt},")));
            }
        }
    }

    #[test]
    fn chunk_table_covers_rows_per_expert() {
        assert_eq!(chunk_table(None, 10), vec![0, 0, 8, 0, 8, 2]);
        assert_eq!(
            chunk_table(Some(&[0, 3, 3, 12]), 12),
            vec![0, 0, 3, 2, 3, 8, 2, 11, 1]
        );
        assert!(chunk_table(Some(&[0, 0]), 0).is_empty());
    }

    /// The single-threaded reference as it was before threading (its `dequantize_row` included:
    /// int4 converted (s, z) per weight; outputs in (expert, feature, row) order): the threaded one must match it bit
    /// for bit (`moe-run quantize`'s round trip compares logits exactly).
    fn serial_reference(
        fmt: QFormat,
        x: &[f32],
        q: &[u8],
        p: &[f16],
        d: Dims,
        rows: &[std::ops::Range<usize>],
    ) -> Vec<f32> {
        let (k, n) = (d.k, d.n);
        let (kb, pr) = (fmt.row_bytes(k), fmt.params_per_row(k));
        let mut out = vec![0f32; d.m * n];
        let mut w = vec![0f32; k];
        for (e, r) in rows.iter().enumerate() {
            for j in 0..n {
                let row = e * n + j;
                let (qr, pp) = (&q[row * kb..(row + 1) * kb], &p[row * pr..(row + 1) * pr]);
                match fmt {
                    QFormat::Int8 => {
                        let s = pp[0].f32();
                        for (w, &q) in w.iter_mut().zip(qr) {
                            *w = s * (q as i8) as f32;
                        }
                    }
                    QFormat::Int4 { group } => {
                        for (kk, w) in w.iter_mut().enumerate() {
                            let g = kk / group;
                            let (s, z) = (pp[2 * g].f32(), pp[2 * g + 1].f32());
                            let nib = (qr[kk / 2] >> (4 * (kk % 2))) & 0xf;
                            *w = s * (nib as f32 - z);
                        }
                    }
                }
                for i in r.clone() {
                    out[i * n + j] = dot(&x[i * k..(i + 1) * k], &w);
                }
            }
        }
        out
    }

    #[test]
    fn threaded_reference_is_bit_identical_to_serial() {
        for fmt in [
            QFormat::Int8,
            QFormat::Int4 { group: 32 },
            QFormat::Int4 { group: 128 },
        ] {
            // (E, N, K, offsets): odd N and K, N not a multiple of the task block, empty experts.
            for (e, n, k, offsets) in [
                (1, 37, 77, vec![0usize, 5]),
                (1, 130, 256, vec![0, 1]),
                (4, 19, 33, vec![0, 3, 3, 10, 11]),
                (3, 64, 200, vec![0, 0, 0, 2]),
                // Several tasks per expert, the last one partial.
                (2, 300, 512, vec![0, 40, 100]),
                (1, 1000, 128, vec![0, 1]),
            ] {
                let m = *offsets.last().unwrap();
                let w = lcg(e * n * k, (n * k) as u64);
                let (kb, pr) = (fmt.row_bytes(k), fmt.params_per_row(k));
                let mut q = vec![0u8; e * n * kb];
                let mut p = vec![f16::ZERO; e * n * pr];
                for row in 0..e * n {
                    quantize_row(
                        fmt,
                        &w[row * k..(row + 1) * k],
                        &mut q[row * kb..(row + 1) * kb],
                        &mut p[row * pr..(row + 1) * pr],
                    );
                }
                let x = lcg(m * k, 7 + m as u64);
                let rows: Vec<_> = offsets.windows(2).map(|o| o[0]..o[1]).collect();
                let d = Dims { m, k, n, e };
                let want = serial_reference(fmt, &x, &q, &p, d, &rows);
                let got = reference(fmt, &x, &q, &p, d, &rows);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{fmt:?} E={e} N={n} K={k}");
                // bf16 activations: the same f32 results, rounded once.
                let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
                let want: Vec<half::bf16> = serial_reference(fmt, &xr, &q, &p, d, &rows)
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect();
                assert_eq!(reference(fmt, &xb, &q, &p, d, &rows), want, "{fmt:?} bf16");
            }
        }
    }

    /// Timing of the CPU reference, threaded vs the pre-threading serial one (medians of
    /// interleaved runs): `cargo test --release -p moe-kernels --lib qmatmul_cpu_timing --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn qmatmul_cpu_timing() {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for fmt in [QFormat::Int8, QFormat::Int4 { group: 128 }] {
            for (m, n, k) in [(1, 3072, 768), (1, 768, 1536), (128, 3072, 768)] {
                let w = lcg(n * k, 1);
                let (kb, pr) = (fmt.row_bytes(k), fmt.params_per_row(k));
                let mut q = vec![0u8; n * kb];
                let mut p = vec![f16::ZERO; n * pr];
                for row in 0..n {
                    quantize_row(
                        fmt,
                        &w[row * k..(row + 1) * k],
                        &mut q[row * kb..(row + 1) * kb],
                        &mut p[row * pr..(row + 1) * pr],
                    );
                }
                let x = lcg(m * k, 2);
                let rows: Vec<_> = std::iter::once(0..m).collect();
                let d = Dims { m, k, n, e: 1 };
                let reps = if m == 1 { 200 } else { 10 };
                let (mut ts, mut t1, mut tn) = (vec![], vec![], vec![]);
                for _ in 0..reps {
                    let t = std::time::Instant::now();
                    std::hint::black_box(serial_reference(fmt, &x, &q, &p, d, &rows));
                    ts.push(t.elapsed().as_secs_f64() * 1e3);
                    let t = std::time::Instant::now();
                    one.install(|| std::hint::black_box(reference(fmt, &x, &q, &p, d, &rows)));
                    t1.push(t.elapsed().as_secs_f64() * 1e3);
                    let t = std::time::Instant::now();
                    std::hint::black_box(reference(fmt, &x, &q, &p, d, &rows));
                    tn.push(t.elapsed().as_secs_f64() * 1e3);
                }
                println!(
                    "{fmt:?} M={m} N={n} K={k}: serial (before) {:.3} ms, threaded on 1 thread {:.3} ms, on {} threads {:.3} ms",
                    median(ts),
                    median(t1),
                    rayon::current_num_threads(),
                    median(tn)
                );
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
