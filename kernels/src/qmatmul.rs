//! Weight-only quantized matmuls (W8A16, W4A16): `y = x W^T` with W stored quantized in one of the formats of
//! [`crate::qformat`] (re-exported here: [`QFormat`], [`quantize_row`], [`dequantize_row`]) and dequantized on
//! the fly. This file is the specification of the two ops that use them, a dense linear and the grouped expert
//! layout ([`QMatmul`]'s CPU reference), and the launch plan of their GEMV kernel ([`qmatmul_plan`]).
//!
//! Legend: M activation rows, K input features (the reduction dim), N output features,
//! E experts, G = ceil(K / group) groups per row, Kb bytes per packed row.
//!
//! ```text
//! x       [M, K]              f32 | bf16 | f16
//! qweight [N, Kb] | [E, N, Kb] u8, params [N, ..] | [E, N, ..] f16 (int8, int4) | u8 (mxfp4)
//!                             (the formats of crate::qformat)
//! out     [M, N]              y = x W^T; grouped: rows offsets[e]..offsets[e+1] of x use expert e's W
//! ```
//!
//! Matmul semantics shared by the CPU reference and `cuda/qmatmul.cu`: accumulate in f32 over k,
//! output rounded once (nearest even) to the activation dtype (f32, bf16 or f16). The summation
//! order is unspecified (the GPU splits K over threads): results are compared by NMSE.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

use crate::common::{grid_dim, suffix, Elem};
use crate::launch::{Arg, Buf, Plan};

pub use crate::qformat::{dequantize_row, quantize_row, QFormat, QParam};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmmDims {
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
) -> Result<QmmDims> {
    let op = if grouped { OP_GROUPED } else { OP };
    if !matches!(x_dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("{op}: x must be f32, bf16 or f16, got {x_dtype:?}");
    }
    if q_dtype != DType::U8 || p_dtype != fmt.params_dtype() {
        bail!(
            "{op}: {fmt:?} needs qweight u8 and params {:?}, got {q_dtype:?} and {p_dtype:?}",
            fmt.params_dtype()
        );
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
    Ok(QmmDims { m, k, n, e })
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
fn reference<T: Elem, P: QParam>(
    fmt: QFormat,
    x: &[T],
    q: &[u8],
    p: &[P],
    d: QmmDims,
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

/// The candle op behind [`crate::qmatmul()`] (`offsets: None`) and [`crate::qmatmul_grouped`] on the CPU: the
/// reference. On CUDA (and under the emulator) those functions run the kernels through [`qmatmul_plan`] (or
/// the tiled GEMM of `crate::qexperts`) instead, so this op has no `cuda_fwd`.
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
        let rows: Vec<_> = match &self.offsets {
            None => std::iter::once(0..d.m).collect(),
            Some(o) => o.windows(2).map(|w| w[0] as usize..w[1] as usize).collect(),
        };
        fn run<P: QParam>(
            fmt: QFormat,
            (s1, l1): (&CpuStorage, &Layout),
            q: &[u8],
            p: &[P],
            d: QmmDims,
            rows: &[std::ops::Range<usize>],
            op: &str,
        ) -> Result<CpuStorage> {
            Ok(match s1 {
                CpuStorage::F32(x) => {
                    CpuStorage::F32(reference(fmt, slice(x, l1, op, "x")?, q, p, d, rows))
                }
                CpuStorage::BF16(x) => {
                    CpuStorage::BF16(reference(fmt, slice(x, l1, op, "x")?, q, p, d, rows))
                }
                CpuStorage::F16(x) => {
                    CpuStorage::F16(reference(fmt, slice(x, l1, op, "x")?, q, p, d, rows))
                }
                other => bail!("{op}: x must be f32, bf16 or f16, got {:?}", other.dtype()),
            })
        }
        // `check` matched the params dtype to the format.
        let out = match s3 {
            CpuStorage::U8(p) => run(
                self.fmt,
                (s1, l1),
                q,
                slice(p, l3, op, "params")?,
                d,
                &rows,
                op,
            )?,
            _ => {
                let p = slice(s3.as_slice::<f16>()?, l3, op, "params")?;
                run(self.fmt, (s1, l1), q, p, d, &rows, op)?
            }
        };
        Ok((out, Shape::from((d.m, d.n))))
    }
}

/// Activation rows per warp in `cuda/qmatmul.cu` (`QMM_ROWS`): each packed weight row is read once per
/// chunk of this many rows.
pub const QMM_ROWS: usize = 8;
/// Warps (output features) per block in `cuda/qmatmul.cu` (`QMM_WARPS`).
pub(crate) const QMM_WARPS: usize = 4;
/// Weight rows per block of the `qgemv_*` entries: `QR_WARPS` (8) warps of `QR_WROWS` (2) rows, so 16
/// output features, or 8 with the SwiGLU epilogue (a feature's gate and up rows).
pub(crate) const QR_WEIGHT_ROWS: usize = 16;
/// Threads per block of the `qgemv_*` entries.
pub(crate) const QR_THREADS: usize = 256;
/// The largest INT4 group the `qgemv_*` entries take: a lane's consecutive slices are 32 x 32 = 1024 weights
/// apart, and the kernel steps their (scale, zero) by 1024 / group groups.
pub(crate) const QR_MAX_GROUP: usize = 1024;

/// Which entries the INT4/INT8 GEMVs (decode) take on the kernel path; the choice of this thread's plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// The default: `qmma_*` (tensor cores, INT4 or INT8 with bf16/f16 activations on sm_80+) where they apply, else
    /// `qgemv_*` where those apply, else `qmatmul_*`.
    Qmma,
    /// `qgemv_*` where they apply, else `qmatmul_*` (`MOE_PATH=qgemv`).
    Qgemv,
    /// Always the older `qmatmul_*` entries (`MOE_PATH=qmatmul-gemv`).
    Qmatmul,
}

thread_local! {
    static GEMV_KERNEL: std::cell::Cell<GemvKernel> = const { std::cell::Cell::new(GemvKernel::Qmma) };
}

/// Sets which GEMV entries the launches this thread plans from now on take ([`GemvKernel::Qmma`] by default):
/// an A/B of the kernels on a GPU. Results agree either way (all are checked against the same reference).
pub fn set_gemv_kernel(k: GemvKernel) {
    GEMV_KERNEL.with(|c| c.set(k));
}

/// The compute capability in an `"sm_90"` / `"sm_90a"` architecture name (0 if it is not one).
pub(crate) fn arch_cap(arch: Option<&str>) -> u32 {
    arch.and_then(|a| {
        a.trim_start_matches("sm_")
            .trim_end_matches('a')
            .parse()
            .ok()
    })
    .unwrap_or(0)
}

/// Whether the `qmma_*` entries exist in this build: they need sm_80 (`mma.sync` m16n8k16 with bf16/f16); a
/// build without CUDA runs them on the emulator only.
pub(crate) fn qmma_built() -> bool {
    crate::cuda_arch().is_none_or(|a| arch_cap(Some(a)) >= 80)
}

/// The GEMV entries of `fmt` over K input features for `dtype` activations, under this thread's
/// [`GemvKernel`]: `qmma` (INT4 with K % 32 == 0 and a power-of-two group of at least 32, INT8 with
/// K % 16 == 0, or MXFP4 with K % 32 == 0; bf16/f16, sm_80+; see
/// `cuda/qmatmul.cu`), `qgemv` (subnormal-code dequantization, activations staged in shared memory: int4 with
/// K % 32 == 0 and a power-of-two group of 32 to [`QR_MAX_GROUP`], each lane's 32-weight slice inside one
/// group; int8 with K % 16 == 0), or `None` for the `qmatmul_*` ones. Same chunks, arguments and output; the
/// entry prefix and the features per block (`swiglu`: of the SwiGLU entry) are what change, the block is
/// [`QR_THREADS`] for both. Pure but for the thread's choice.
pub(crate) fn qgemv_entry(
    fmt: QFormat,
    dtype: DType,
    k: usize,
    swiglu: bool,
) -> Option<(&'static str, usize)> {
    let choice = GEMV_KERNEL.with(|c| c.get());
    let int4 = |max_group: usize| match fmt {
        QFormat::Int4 { group } => {
            k.is_multiple_of(32) && group >= 32 && group <= max_group && group.is_power_of_two()
        }
        _ => false,
    };
    let features = if swiglu {
        QR_WEIGHT_ROWS / 2
    } else {
        QR_WEIGHT_ROWS
    };
    // The build's architecture is parsed last: this runs for every GEMV the decode step plans.
    let int8 = fmt == QFormat::Int8 && k.is_multiple_of(16);
    let mxfp4 = fmt == QFormat::Mxfp4 && k.is_multiple_of(32);
    let prefix = if choice == GemvKernel::Qmma
        && matches!(dtype, DType::BF16 | DType::F16)
        && (int8 || mxfp4 || int4(u32::MAX as usize))
        && qmma_built()
    {
        "qmma"
    } else if choice != GemvKernel::Qmatmul && (int8 || int4(QR_MAX_GROUP)) {
        "qgemv"
    } else {
        return None;
    };
    Some((prefix, features))
}

/// The grid of a GEMV launch over `blocks` feature blocks and `chunks` row chunks (the kernels stride over
/// the chunks past the grid): `qmma_*` entries take the chunks on x and the feature blocks on y, so that the
/// blocks a GPU starts together share a weight tile (see `cuda/qmatmul.cu`); the others the reverse.
pub(crate) fn gemv_grid(op: &str, entry: &str, blocks: usize, chunks: usize) -> Result<[u32; 3]> {
    Ok(if entry.starts_with("qmma") {
        [
            chunks.clamp(1, (u32::MAX >> 1) as usize) as u32,
            grid_dim(op, "feature blocks", blocks, 65535)?,
            1,
        ]
    } else {
        [
            grid_dim(op, "feature blocks", blocks, u32::MAX >> 1)?,
            chunks.clamp(1, 65535) as u32,
            1,
        ]
    })
}

/// The kernel work list of `qmatmul_<fmt>_<dtype>`, flattened `[C, 3]` u32: (expert, first row, rows <=
/// [`QMM_ROWS`]) for every expert's rows (`offsets`, or all M rows as expert 0), in row order; empty experts get
/// no chunk.
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

/// The kernel-name part of a format and the kernels' `group` argument (0 for int8, 32 for mxfp4).
pub(crate) fn kind_and_group(fmt: QFormat) -> (&'static str, u32) {
    match fmt {
        QFormat::Int8 => ("int8", 0),
        QFormat::Int4 { group } => ("int4", group.min(u32::MAX as usize) as u32),
        QFormat::Mxfp4 => ("mxfp4", crate::qformat::MXFP4_GROUP as u32),
    }
}

/// The launch of `qmatmul_<fmt>_<dtype>` (GEMV-style: one warp per output feature and chunk of up to
/// [`QMM_ROWS`] activation rows, [`QMM_WARPS`] features per block, grid y striding over the chunks) for `x [M, K]`
/// against `d.n` features of `d.e` experts; `offsets`: the grouped layout's host offsets (checked by the caller),
/// `None` for a dense `qweight [N, Kb]`. Inputs `x`, `qweight`, `params`; the chunk table ([`chunk_table`]) is
/// uploaded; output `out [M, N]`. An error for an empty output (`qmatmul()` handles it) or sizes past u32. Pure.
pub fn qmatmul_plan(
    dtype: DType,
    fmt: QFormat,
    d: QmmDims,
    offsets: Option<&[u32]>,
) -> Result<Plan> {
    let op = if offsets.is_some() { OP_GROUPED } else { OP };
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
    let (kind, group) = kind_and_group(fmt);
    let (entry, features, threads) = match qgemv_entry(fmt, dtype, d.k, false) {
        Some((prefix, features)) => (format!("{prefix}_dense_{kind}"), features, QR_THREADS),
        None => (format!("qmatmul_{kind}"), QMM_WARPS, QMM_WARPS * 32),
    };
    let mut p = Plan::new(op, &["x", "qweight", "params"]);
    let table = chunk_table(offsets, d.m);
    let n_chunks = table.len() / 3;
    let chunks = p.upload("chunks", table);
    let out = p.out("out", dtype, (d.m, d.n));
    // `check` validated every shape, and the chunk table covers rows 0..M with experts < E, so every index is
    // < M*K (x), E*N*Kb (qweight), E*N*params (params) or M*N (out).
    p.launch(
        "qmatmul",
        format!("{entry}_{}", suffix(dtype)?),
        gemv_grid(op, &entry, d.n.div_ceil(features), n_chunks)?,
        [threads as u32, 1, 1],
        vec![
            Arg::Buf(Buf::In(0)),
            Arg::Buf(Buf::In(1)),
            Arg::Buf(Buf::In(2)),
            chunks,
            out,
            Arg::U32(n_chunks as u32),
            Arg::U32(d.n as u32),
            Arg::U32(d.k as u32),
            Arg::U32(group),
        ],
    );
    Ok(p)
}

/// `qmatmul` (`offsets: None`) or `qmatmul_grouped` through [`qmatmul_plan`], on CUDA or the emulator.
pub(crate) fn run_plan(
    x: &Tensor,
    qweight: &Tensor,
    params: &Tensor,
    fmt: QFormat,
    offsets: Option<&[u32]>,
) -> Result<Tensor> {
    let d = check(
        fmt,
        offsets.is_some(),
        (x.dtype(), x.dims()),
        (qweight.dtype(), qweight.dims()),
        (params.dtype(), params.dims()),
    )?;
    let plan = qmatmul_plan(x.dtype(), fmt, d, offsets)?;
    match plan.run(&[x, qweight, params])?.pop() {
        Some(out) => Ok(out),
        None => bail!("{}: the plan returned no output", plan.op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qformat::tests::lcg;

    #[test]
    fn plan_geometry() {
        let input = |i| Arg::Buf(Buf::In(i));
        let dims = |m, k, n, e| QmmDims { m, k, n, e };
        // Dense: 10 rows in chunks of 8 + 2, N = 37 features in 10 blocks of 4 warps (the last one partial);
        // int8 with K = 72 (not a multiple of 16) keeps the qmatmul entry.
        let d = dims(10, 72, 37, 1);
        let p = qmatmul_plan(DType::BF16, QFormat::Int8, d, None).unwrap();
        assert_eq!((p.op, &p.inputs[..]), (OP, &["x", "qweight", "params"][..]));
        assert_eq!(p.uploads, vec![("chunks", vec![0, 0, 8, 0, 8, 2])]);
        assert_eq!(p.outs[0].shape.dims(), &[10, 37]);
        let [l] = &p.launches[..] else {
            panic!("{:?}", p.launches)
        };
        assert_eq!(
            (l.module, l.entry.as_str()),
            ("qmatmul", "qmatmul_int8_bf16")
        );
        assert_eq!((l.grid, l.block), ([10, 2, 1], [128, 1, 1]));
        let tail = [2, 37, 72, 0].map(Arg::U32);
        let mut want = vec![input(0), input(1), input(2), Arg::Buf(Buf::Upload(0))];
        want.push(Arg::Buf(Buf::Out(0)));
        want.extend(tail);
        assert_eq!(l.args, want);
        // Grouped, int4 in groups of 32: experts of 3, 0 and 9 rows give 3 chunks; the qmma and qgemv entries'
        // 16 features per block put N = 64 in 4 blocks. f16 activations take qmma (any power-of-two group from
        // 32, where the build has sm_80), f32 ones qgemv (groups up to 1024: a lane's 1024-weight stride
        // between slices). Groups of 16 or 48 keep qmatmul's, as does qgemv's 2048.
        let d = dims(12, 96, 64, 3);
        let grouped_as = |dtype, group| {
            let p = qmatmul_plan(dtype, QFormat::Int4 { group }, d, Some(&[0, 3, 3, 12])).unwrap();
            assert_eq!(p.op, OP_GROUPED);
            p.launches[0].clone()
        };
        let grouped = |group| grouped_as(DType::F16, group);
        let qmma = if qmma_built() { "qmma" } else { "qgemv" };
        let l = grouped(32);
        assert_eq!(l.entry, format!("{qmma}_dense_int4_f16"));
        // qmma takes the chunks on x, the feature blocks on y (blocks started together share weight tiles).
        let grid = if qmma_built() { [3, 4, 1] } else { [4, 3, 1] };
        assert_eq!((l.grid, l.block), (grid, [256, 1, 1]));
        assert_eq!(&l.args[5..], &[3, 64, 96, 32].map(Arg::U32));
        assert_eq!(grouped(1024).entry, format!("{qmma}_dense_int4_f16"));
        assert_eq!(grouped_as(DType::F32, 32).entry, "qgemv_dense_int4_f32");
        assert_eq!(grouped_as(DType::F32, 1024).entry, "qgemv_dense_int4_f32");
        assert_eq!(grouped_as(DType::F32, 2048).entry, "qmatmul_int4_f32");
        if qmma_built() {
            assert_eq!(grouped(2048).entry, "qmma_dense_int4_f16");
            assert_eq!(grouped_as(DType::BF16, 128).entry, "qmma_dense_int4_bf16");
        }
        for group in [16, 48] {
            let l = grouped(group);
            assert_eq!(l.entry, "qmatmul_int4_f16");
            assert_eq!((l.grid, l.block), ([16, 3, 1], [128, 1, 1]));
        }
        // MOE_PATH=qgemv: the same f16 shapes take qgemv, up to its largest group.
        set_gemv_kernel(GemvKernel::Qgemv);
        let (g32, g2048) = (grouped(32), grouped(2048));
        set_gemv_kernel(GemvKernel::Qmma);
        assert_eq!(g32.entry, "qgemv_dense_int4_f16");
        assert_eq!(g2048.entry, "qmatmul_int4_f16");
        assert_eq!(
            qmatmul_plan(DType::F32, QFormat::Mxfp4, dims(1, 64, 8, 1), None)
                .unwrap()
                .launches[0]
                .entry,
            "qmatmul_mxfp4_f32"
        );
        // More chunks than grid.y takes: the grid is clamped, C is not (the kernel strides).
        let d = dims(8 * 70000, 16, 4, 1);
        let l = qmatmul_plan(DType::F32, QFormat::Int8, d, None)
            .unwrap()
            .launches[0]
            .clone();
        assert_eq!((l.grid, l.args[5]), ([1, 65535, 1], Arg::U32(70000)));
        if qmma_built() {
            // qmma: all chunks on x; more than 65535 feature blocks (on y) are an error.
            let l = qmatmul_plan(DType::BF16, QFormat::Int8, d, None)
                .unwrap()
                .launches[0]
                .clone();
            assert_eq!(
                (l.entry.as_str(), l.grid),
                ("qmma_dense_int8_bf16", [70000, 1, 1])
            );
            let wide = dims(1, 16, 16 * 65536, 1);
            assert!(qmatmul_plan(DType::BF16, QFormat::Int8, wide, None).is_err());
        }
        // Turned off on this thread, the same shape takes the qmatmul entry.
        set_gemv_kernel(GemvKernel::Qmatmul);
        let off = grouped(32);
        set_gemv_kernel(GemvKernel::Qmma);
        assert_eq!(
            (off.entry.as_str(), off.block),
            ("qmatmul_int4_f16", [128, 1, 1])
        );
        // An empty output is the caller's to handle.
        let d = dims(0, 16, 4, 1);
        assert!(qmatmul_plan(DType::F32, QFormat::Int8, d, None).is_err());
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
    fn serial_reference<P: QParam>(
        fmt: QFormat,
        x: &[f32],
        q: &[u8],
        p: &[P],
        d: QmmDims,
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
                    QFormat::Mxfp4 => {
                        let e = P::u8s(pp).unwrap();
                        for (kk, w) in w.iter_mut().enumerate() {
                            let nib = (qr[kk / 2] >> (4 * (kk % 2))) & 0xf;
                            *w = crate::qformat::MXFP4_DOUBLED[nib as usize]
                                * crate::qformat::mxfp4_half_scale(e[kk / 32]);
                        }
                    }
                    QFormat::Int8 => {
                        let pp = P::f16s(pp).unwrap();
                        let s = pp[0].f32();
                        for (w, &q) in w.iter_mut().zip(qr) {
                            *w = s * (q as i8) as f32;
                        }
                    }
                    QFormat::Int4 { group } => {
                        let pp = P::f16s(pp).unwrap();
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
        fn compare<P: QParam>(
            fmt: QFormat,
            q: &[u8],
            p: &[P],
            (e, n, k): (usize, usize, usize),
            offsets: &[usize],
        ) {
            let m = *offsets.last().unwrap();
            let x = lcg(m * k, 7 + m as u64);
            let rows: Vec<_> = offsets.windows(2).map(|o| o[0]..o[1]).collect();
            let d = QmmDims { m, k, n, e };
            let want = serial_reference(fmt, &x, q, p, d, &rows);
            let got = reference(fmt, &x, q, p, d, &rows);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{fmt:?} E={e} N={n} K={k}");
            // bf16 activations: the same f32 results, rounded once.
            let xb: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let want: Vec<half::bf16> = serial_reference(fmt, &xr, q, p, d, &rows)
                .into_iter()
                .map(half::bf16::from_f32)
                .collect();
            assert_eq!(reference(fmt, &xb, q, p, d, &rows), want, "{fmt:?} bf16");
        }
        for fmt in [
            QFormat::Int8,
            QFormat::Int4 { group: 32 },
            QFormat::Int4 { group: 128 },
            QFormat::Mxfp4,
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
                let w = lcg(e * n * k, (n * k) as u64);
                match crate::qformat::quantize_rows(fmt, &w, k) {
                    (q, crate::qformat::QParams::F16(p)) => {
                        compare(fmt, &q, &p, (e, n, k), &offsets)
                    }
                    (q, crate::qformat::QParams::U8(p)) => {
                        compare(fmt, &q, &p, (e, n, k), &offsets)
                    }
                }
            }
        }
    }
}
