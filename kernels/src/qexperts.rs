//! Quantized MoE experts on a device-resident dispatch: `qmatmul_moe`, the W8A16/W4A16 matmul of every
//! active expert over its dispatched rows, with the expert of each row known only on the device.
//!
//! Legend: N source rows of x, E experts, R dispatched rows, K in features, N_out out features.
//!
//! ```text
//! x         [N, K] (gather) or [R, K]   f32 | bf16 | f16
//! row_token [R]  u32 (optional)  with it, dispatched row r reads x[row_token[r]] (the gate/up gather);
//!                                without it, x is already in dispatched row order (the down projection)
//! counts    [E]  u32, offsets [E+1] u32: a dispatch (moe_dispatch; any block size)
//! qweight   [E, N_out, Kb] u8, params [E, N_out, ..] f16 (int8, int4) | u8 (mxfp4): the formats of `qmatmul`
//! out       [R, N_out]  row r = offsets[e] + i (i < counts[e]) is  x_r W_e^T ;  rows that belong to no
//!                       expert (padding, or past offsets[E]) are unspecified (the reference writes zeros)
//! ```
//!
//! Unlike [`crate::qmatmul_grouped`], which takes the expert offsets on the host, nothing here needs the
//! routing on the host: this is what lets a quantized MoE decode step run without a device-to-host copy.
//! [`qmatmul_moe_reference`] is the specification (each weight row dequantized to f32 exactly as
//! `qmatmul`'s reference, then an f32 dot product). The CUDA entry points in `cuda/qmatmul.cu` have two
//! paths, chosen like the dense experts' ([`crate::expert_path`]) except where the GEMV is the tensor-core
//! `qmma_*` ([`qmm_path`]): GEMV for decode (`qmatmul_moe_*`, `qgemv_moe_*` or `qmma_moe_*`, 8-row chunks
//! found by `nth_row_tile` over the counts) and a tiled GEMM for prefill: `qmma_gemm_*` (tensor cores, 32-row
//! tiles, activations staged in shared memory) where the GEMV is `qmma`, else `qmatmul_gemm_*` (64 x 64
//! output tiles, weights dequantized into shared memory, f32 FMA). On CUDA (and under the emulator),
//! `qmatmul` and `qmatmul_grouped` with more than a few rows per expert also run the GEMM through
//! [`qmatmul_moe`]. NOT YET
//! RUN ON A GPU. Self-test budgets are `qmatmul`'s.

use candle_core::{bail, DType, Device, Result, Tensor};
use half::f16;

use crate::common::{check_act, check_dtype, grid_dim, host, same_device, suffix, Elem};
use crate::experts::{expert_path, ExpertPath};
use crate::launch::{Arg, Buf, Plan};
use crate::qmatmul::{
    check, dequantize_row, gemv_grid, kind_and_group, qgemv_entry, QFormat, QMatmul, QParam,
    OP_GROUPED, QMM_ROWS, QMM_WARPS, QR_THREADS,
};

const OP: &str = "qmatmul_moe";

/// Whether the GEMV entries of `fmt` over each of `ks` inputs for `dtype` activations are the tensor-core
/// `qmma_*` ones (INT4/INT8/MXFP4 with bf16/f16 on sm_80+, under this thread's [`crate::GemvKernel`]).
pub fn qmma_gemv(fmt: QFormat, dtype: DType, ks: &[usize]) -> bool {
    ks.iter()
        .all(|&k| matches!(qgemv_entry(fmt, dtype, k, false), Some(("qmma", _))))
}

/// Expected rows per active expert up to which a quantized product on `qmma` keeps the GEMV (one 8-row chunk
/// per expert on average), past which it can take `qmma`'s tensor-core GEMM (`qmma_gemm_*`, 32-row tiles)...
pub const QMMA_GEMV_MAX_AVG_ROWS: f64 = 8.0;
/// ...when that GEMM has at least one block (128 weight rows by one 32-row tile) per SM of the GPU
/// ([`crate::gpu_sm_count`]), or this many where the SM count is unknown: about one per SM of an H100 (132)
/// or an RTX 4090 (128). With fewer, SMs idle while the GEMV's chunks (16 weight rows by 8 rows each, many
/// more blocks) would fill them.
pub const QMMA_GEMM_MIN_BLOCKS: usize = 128;

/// The CUDA path of a quantized product over `projections` (input width K, output rows N of each: both
/// projections of an expert MLP, or one linear) for `rows_per_expert_max` rows at most in one expert, `avg`
/// expected rows per active expert and `active` experts expected to have rows, on a GPU of `sms` SMs
/// ([`crate::gpu_sm_count`]; `None`: [`QMMA_GEMM_MIN_BLOCKS`]). Where the GEMV entries are `qmma_*` the GEMM
/// is `qmma_gemm_*`: the GEMV holds while no expert can pass one 8-row chunk or the average stays within one
/// ([`QMMA_GEMV_MAX_AVG_ROWS`]), and while the GEMM would have fewer blocks than SMs for some projection (on
/// CUDA; any count under the emulator); else
/// [`expert_path`] decides as for the dense experts. Why (sm_90 SASS, static counts, not measured: no GPU
/// has run either): per 16 weight rows and 128 inputs a warp spends 143 instructions (INT4 g128) on each
/// 8-row GEMV chunk, against 167 per 32-row GEMM tile plus ~50 of staging per thread, so an expert with 9 to
/// 32 rows is cheaper on the GEMM when the GPU is full, one with 8 or fewer on the GEMV.
pub fn qmm_path(
    fmt: QFormat,
    dtype: DType,
    projections: &[(usize, usize)],
    rows_per_expert_max: usize,
    avg: f64,
    active: usize,
    sms: Option<usize>,
) -> ExpertPath {
    // Per projection, no allocation: this runs for every MoE layer of every decode step.
    if !projections
        .iter()
        .all(|&(k, _)| qmma_gemv(fmt, dtype, &[k]))
    {
        return expert_path(rows_per_expert_max, avg);
    }
    if rows_per_expert_max <= crate::experts::GEMV_MAX_ROWS_PER_EXPERT
        || avg <= QMMA_GEMV_MAX_AVG_ROWS
    {
        return ExpertPath::Gemv;
    }
    let tiles = active.max(1) * (avg / QMG_ROWS as f64).ceil() as usize;
    let blocks = projections
        .iter()
        .map(|&(_, n)| n.div_ceil(QMG_WARPS * crate::qmatmul::QR_WEIGHT_ROWS) * tiles)
        .min()
        .unwrap_or(0);
    // The emulator runs one block at a time: no SM idles there, so any block count will do (and the
    // self-test's small shapes keep reaching this GEMM).
    let min_blocks = if crate::emu::active() {
        1
    } else {
        sms.unwrap_or(QMMA_GEMM_MIN_BLOCKS)
    };
    if blocks >= min_blocks {
        ExpertPath::Gemm
    } else {
        ExpertPath::Gemv
    }
}

/// [`qmm_path`] for N tokens with top-k over E experts (the quantized counterpart of
/// [`crate::expert_path_for`]) on a GPU of `sms` SMs; see there for why.
pub fn qexpert_path_for(
    tokens: usize,
    top_k: usize,
    num_experts: usize,
    fmt: QFormat,
    dtype: DType,
    projections: &[(usize, usize)],
    sms: Option<usize>,
) -> ExpertPath {
    let slots = tokens * top_k;
    let active = num_experts.min(slots).max(1);
    qmm_path(
        fmt,
        dtype,
        projections,
        tokens,
        slots as f64 / active as f64,
        active,
        sms,
    )
}

/// `out [R, N_out]` (module docs). `row_token = None` means x is already in dispatched row order.
/// `path` picks the kernels (`None`: [`qmm_path`] with R rows as the worst case per expert); the CPU runs
/// the reference unless the emulator is on.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_moe(
    x: &Tensor,
    row_token: Option<&Tensor>,
    counts: &Tensor,
    offsets: &Tensor,
    qweight: &Tensor,
    params: &Tensor,
    fmt: QFormat,
    path: Option<ExpertPath>,
) -> Result<Tensor> {
    let d = QmoeDims::check(x, row_token, counts, offsets, qweight, params, fmt)?;
    let inputs = same_device_inputs(x, row_token, [counts, offsets, qweight, params])?;
    if crate::launch::runs_kernels(x.device()) {
        let path = path.unwrap_or_else(|| default_path(d, fmt, x));
        let plan = qmatmul_moe_plan(x.dtype(), fmt, d, row_token.is_some(), path)?;
        return run_one(&plan, &inputs);
    }
    match x.device() {
        Device::Cpu => {
            let rt = row_token.map(host::<u32>).transpose()?;
            let (c, o) = (host::<u32>(counts)?, host::<u32>(offsets)?);
            let q = host::<u8>(qweight)?;
            #[allow(clippy::too_many_arguments)]
            fn run<T: Elem, P: QParam>(
                x: &Tensor,
                rt: Option<&[u32]>,
                c: &[u32],
                o: &[u32],
                q: &[u8],
                p: &[P],
                fmt: QFormat,
                d: QmoeDims,
            ) -> Result<Tensor> {
                let out =
                    qmatmul_moe_reference::<T, P>(&host(x)?, rt, c, o, q, p, fmt, d.r, d.n, d.k)?;
                Tensor::from_vec(out, (d.r, d.n), &Device::Cpu)
            }
            fn by_act<P: QParam>(
                x: &Tensor,
                (rt, c, o): (Option<&[u32]>, &[u32], &[u32]),
                q: &[u8],
                p: &[P],
                fmt: QFormat,
                d: QmoeDims,
            ) -> Result<Tensor> {
                match x.dtype() {
                    DType::F32 => run::<f32, P>(x, rt, c, o, q, p, fmt, d),
                    DType::BF16 => run::<half::bf16, P>(x, rt, c, o, q, p, fmt, d),
                    _ => run::<f16, P>(x, rt, c, o, q, p, fmt, d),
                }
            }
            let idx = (rt.as_deref(), &c[..], &o[..]);
            // QmoeDims::check matched the params dtype to the format.
            match params.dtype() {
                DType::U8 => by_act(x, idx, &q, &host::<u8>(params)?, fmt, d),
                _ => by_act(x, idx, &q, &host::<f16>(params)?, fmt, d),
            }
        }
        dv => bail!("{OP}: unsupported device {:?}", dv.location()),
    }
}

/// `silu(x Wg^T) * (x Wu^T)` of the experts whose `qweight [E, 2F, Kb]` holds the gate rows, then the up
/// rows (the engine's canonical gate_up): `out [R, F]`, the quantized gate/up projection with SwiGLU fused.
/// On CUDA (and the emulator) the GEMV path is one kernel (`qmatmul_moe_swiglu_*`: each warp sums both rows
/// of its feature and writes the product from the f32 sums); the GEMM path runs [`qmatmul_moe`] and the
/// activation after it. The specification (the CPU): the product in f32, the activation, one rounding.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_moe_swiglu(
    x: &Tensor,
    row_token: Option<&Tensor>,
    counts: &Tensor,
    offsets: &Tensor,
    qweight: &Tensor,
    params: &Tensor,
    fmt: QFormat,
    path: Option<ExpertPath>,
) -> Result<Tensor> {
    let d = QmoeDims::check(x, row_token, counts, offsets, qweight, params, fmt)?;
    if !d.n.is_multiple_of(2) {
        bail!(
            "{OP}: gate_up has {} rows per expert, not gate and up halves",
            d.n
        );
    }
    let path = path.unwrap_or_else(|| default_path(d, fmt, x));
    let kernels = crate::launch::runs_kernels(x.device());
    if kernels && (path == ExpertPath::Gemv || qmma_gemv(fmt, x.dtype(), &[d.k])) {
        let inputs = same_device_inputs(x, row_token, [counts, offsets, qweight, params])?;
        let plan = moe_plan(x.dtype(), fmt, d, row_token.is_some(), path, true)?;
        return run_one(&plan, &inputs);
    }
    // The unfused form: in x's dtype on a device; in f32 with one rounding on the CPU (the
    // specification the fused kernel is checked against).
    let xc = if kernels {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let g = qmatmul_moe(
        &xc,
        row_token,
        counts,
        offsets,
        qweight,
        params,
        fmt,
        Some(path),
    )?;
    let f = d.n / 2;
    let (gate, up) = (g.narrow(1, 0, f)?, g.narrow(1, f, f)?);
    let silu = (&gate / (gate.neg()?.exp()? + 1.0)?)?;
    (silu * up)?.to_dtype(x.dtype())
}

/// The GEMV/GEMM choice for `d` when the caller gives none: R rows as the worst case per expert.
fn default_path(d: QmoeDims, fmt: QFormat, x: &Tensor) -> ExpertPath {
    let active = d.e.min(d.r).max(1);
    qmm_path(
        fmt,
        x.dtype(),
        &[(d.k, d.n)],
        d.r,
        d.r as f64 / active as f64,
        active,
        crate::gpu_sm_count(x.device()),
    )
}

/// The plan inputs in order (`x`, `row_token` if any, `counts`, `offsets`, `qweight`, `params`), checked
/// to share one device.
fn same_device_inputs<'a>(
    x: &'a Tensor,
    row_token: Option<&'a Tensor>,
    [counts, offsets, qweight, params]: [&'a Tensor; 4],
) -> Result<Vec<&'a Tensor>> {
    let mut devs = vec![
        ("x", x),
        ("counts", counts),
        ("offsets", offsets),
        ("qweight", qweight),
        ("params", params),
    ];
    if let Some(rt) = row_token {
        devs.push(("row_token", rt));
    }
    same_device(OP, &devs)?;
    let mut inputs = vec![x];
    inputs.extend(row_token);
    inputs.extend([counts, offsets, qweight, params]);
    Ok(inputs)
}

/// Runs a one-output plan.
fn run_one(plan: &Plan, inputs: &[&Tensor]) -> Result<Tensor> {
    match plan.run(inputs)?.pop() {
        Some(out) => Ok(out),
        None => bail!("{OP}: the plan returned no output"),
    }
}

/// The sizes of one `qmatmul_moe` call: R dispatched rows (the output's rows), N_out features, K in features,
/// E experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmoeDims {
    pub r: usize,
    pub n: usize,
    pub k: usize,
    pub e: usize,
}

impl QmoeDims {
    fn check(
        x: &Tensor,
        row_token: Option<&Tensor>,
        counts: &Tensor,
        offsets: &Tensor,
        qweight: &Tensor,
        params: &Tensor,
        fmt: QFormat,
    ) -> Result<Self> {
        check_act(OP, "x", x.dtype())?;
        check_dtype(OP, "qweight", qweight, DType::U8)?;
        check_dtype(OP, "params", params, fmt.params_dtype())?;
        check_dtype(OP, "counts", counts, DType::U32)?;
        check_dtype(OP, "offsets", offsets, DType::U32)?;
        if let QFormat::Int4 { group } = fmt {
            if group == 0 || group % 2 != 0 {
                bail!("{OP}: int4 group size must be even and > 0, got {group}");
            }
        }
        let (rows_x, k) = x.dims2()?;
        let (e, n, kb) = qweight.dims3()?;
        if kb != fmt.row_bytes(k) {
            bail!(
                "{OP}: qweight rows hold {kb} bytes, {fmt:?} with K = {k} needs {}",
                fmt.row_bytes(k)
            );
        }
        let mut want = vec![e, n];
        want.extend(fmt.params_shape(k));
        if params.dims() != want.as_slice() {
            bail!("{OP}: params must be {want:?}, got {:?}", params.dims());
        }
        if counts.dims() != [e] || offsets.dims() != [e + 1] {
            bail!(
                "{OP}: want counts [{e}] and offsets [{}], got {:?} and {:?}",
                e + 1,
                counts.dims(),
                offsets.dims()
            );
        }
        let r = match row_token {
            Some(rt) => {
                check_dtype(OP, "row_token", rt, DType::U32)?;
                if rt.rank() != 1 {
                    bail!("{OP}: row_token must be [R], got {:?}", rt.dims());
                }
                rt.dim(0)?
            }
            None => rows_x,
        };
        if [r, n, k, e, rows_x].iter().any(|&v| v > u32::MAX as usize)
            || r.saturating_mul(n.max(k)) > isize::MAX as usize
        {
            bail!("{OP}: sizes exceed the kernel's u32 indices");
        }
        Ok(QmoeDims { r, n, k, e })
    }
}

/// The specification (module docs): `x` row-major `[rows, K]`, returns `[R * N_out]` with rows outside
/// every expert's live range zero. Errors on a dispatch that does not fit (rows or tokens out of range).
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_moe_reference<T: Elem, P: QParam>(
    x: &[T],
    row_token: Option<&[u32]>,
    counts: &[u32],
    offsets: &[u32],
    q: &[u8],
    p: &[P],
    fmt: QFormat,
    r: usize,
    n: usize,
    k: usize,
) -> Result<Vec<T>> {
    let (kb, pr) = (
        fmt.row_bytes(k),
        fmt.params_shape(k).iter().product::<usize>(),
    );
    let rows_x = x.len() / k.max(1);
    let mut out = vec![0f32; r * n];
    let mut w = vec![0f32; k];
    let mut xf = vec![0f32; k];
    for (e, &cnt) in counts.iter().enumerate() {
        let (lo, cnt) = (offsets[e] as usize, cnt as usize);
        if cnt == 0 {
            continue;
        }
        if lo + cnt > r {
            bail!("{OP}: expert {e} rows {lo}..{} exceed R = {r}", lo + cnt);
        }
        // The expert's activation rows in f32, gathered once.
        let mut xs = Vec::with_capacity(cnt * k);
        for row in lo..lo + cnt {
            let src = match row_token {
                Some(rt) => rt[row] as usize,
                None => row,
            };
            if src >= rows_x {
                bail!("{OP}: row {row} reads x row {src}, but x has {rows_x}");
            }
            for (dst, v) in xf.iter_mut().zip(&x[src * k..(src + 1) * k]) {
                *dst = v.f32();
            }
            xs.extend_from_slice(&xf);
        }
        for j in 0..n {
            let wr = e * n + j;
            dequantize_row(
                fmt,
                &q[wr * kb..(wr + 1) * kb],
                &p[wr * pr..(wr + 1) * pr],
                &mut w,
            );
            for (i, xr) in xs.chunks_exact(k.max(1)).enumerate() {
                out[(lo + i) * n + j] = xr.iter().zip(&w).map(|(a, b)| a * b).sum();
            }
        }
    }
    Ok(out.into_iter().map(T::of).collect())
}

/// The launch of `qmatmul_{moe,gemm}_<fmt>_<dtype>` for `path` (GEMV: 8-row chunks, the `qmma`, `qgemv` or
/// `qmatmul` entries on [`gemv_grid`]'s grid, striding over the chunks past it; GEMM: 64 x 64 output tiles, 256
/// threads), the row
/// tiles of all experts together found on the device (`ceil(R / rows) + min(E, R)`, an upper bound the kernel
/// trims). Inputs `x`, `row_token` (when `gather`), `counts`, `offsets`, `qweight`, `params`; output
/// `out [R, N_out]`. A null `row_token` tells the kernel that x is already in dispatched row order. Pure.
pub fn qmatmul_moe_plan(
    dtype: DType,
    fmt: QFormat,
    d: QmoeDims,
    gather: bool,
    path: ExpertPath,
) -> Result<Plan> {
    moe_plan(dtype, fmt, d, gather, path, false)
}

/// [`qmatmul_moe_plan`], or with `swiglu` the GEMV entry `qmatmul_moe_swiglu_<fmt>_<dtype>` of
/// [`qmatmul_moe_swiglu`]: `d.n` = 2F weight rows per expert, output `[R, F]`, F features over the grid.
fn moe_plan(
    dtype: DType,
    fmt: QFormat,
    d: QmoeDims,
    gather: bool,
    path: ExpertPath,
    swiglu: bool,
) -> Result<Plan> {
    let qmma = qgemv_entry(fmt, dtype, d.k, swiglu);
    let tensor_gemm = matches!(qmma, Some(("qmma", _)));
    if swiglu && (!(path == ExpertPath::Gemv || tensor_gemm) || !d.n.is_multiple_of(2)) {
        bail!("{OP}: the SwiGLU epilogue is a GEMV (or qmma GEMM) entry over 2F weight rows");
    }
    let n_out = if swiglu { d.n / 2 } else { d.n };
    let (kind, group) = kind_and_group(fmt);
    let sfx = suffix(dtype)?;
    let inputs: &[&'static str] = if gather {
        &["x", "row_token", "counts", "offsets", "qweight", "params"]
    } else {
        &["x", "counts", "offsets", "qweight", "params"]
    };
    let mut p = Plan::new(OP, inputs);
    // GEMV: the qmma or qgemv entries where the format, dtype and K allow, else qmatmul's. GEMM: qmma's
    // tensor-core GEMM where its GEMV applies, else qmatmul's f32 one.
    let (entry, rows, cols, threads) = match (path, qmma) {
        (ExpertPath::Gemv, Some((prefix, features))) => (prefix, QMM_ROWS, features, QR_THREADS),
        (ExpertPath::Gemv, None) => ("qmatmul", QMM_ROWS, QMM_WARPS, QMM_WARPS * 32),
        (ExpertPath::Gemm, Some(("qmma", features))) => {
            ("qmma", QMG_ROWS, features * QMG_WARPS, QMG_WARPS * 32)
        }
        (ExpertPath::Gemm, _) => ("qmatmul", QG_TILE_M, QG_TILE_N, 256),
    };
    let mode = match (path, swiglu) {
        (ExpertPath::Gemv, false) => "moe",
        (ExpertPath::Gemv, true) => "moe_swiglu",
        (ExpertPath::Gemm, false) => "gemm",
        (ExpertPath::Gemm, true) => "gemm_swiglu",
    };
    // Row tiles (GEMV: chunks of QMM_ROWS) of all experts together, an upper bound the device trims.
    let chunks = d.r.div_ceil(rows) + d.e.min(d.r);
    if path == ExpertPath::Gemm && chunks > 65535 {
        bail!(
            "{OP}: {chunks} row tiles exceed the grid's 65535 (R = {})",
            d.r
        );
    }
    // The GEMV kernels stride over all C tiles past the grid (gemv_grid); only the grid is clamped.
    let chunks = chunks.min(u32::MAX as usize) as u32;
    let out = p.out("out", dtype, (d.r, n_out));
    if d.r == 0 || n_out == 0 {
        return Ok(p);
    }
    let input = |i| Arg::Buf(Buf::In(i));
    let (row_token, rest) = if gather {
        (input(1), 2)
    } else {
        (Arg::Null, 1)
    };
    let mut args = vec![
        input(0),
        row_token,
        input(rest),
        input(rest + 1),
        input(rest + 2),
        input(rest + 3),
        out,
        Arg::U32(d.e as u32),
    ];
    if path == ExpertPath::Gemv {
        args.push(Arg::U32(chunks));
    }
    args.extend([n_out as u32, d.k as u32, group].map(Arg::U32));
    // Shapes were checked by QmoeDims::check, and a valid dispatch keeps every live row < R and every
    // row_token < the rows of x.
    let blocks = n_out.div_ceil(cols);
    let grid = match path {
        ExpertPath::Gemv => gemv_grid(OP, entry, blocks, chunks as usize)?,
        ExpertPath::Gemm => [
            grid_dim(OP, "feature blocks", blocks, u32::MAX >> 1)?,
            chunks,
            1,
        ],
    };
    p.launch(
        "qmatmul",
        format!("{entry}_{mode}_{kind}_{sfx}"),
        grid,
        [threads as u32, 1, 1],
        args,
    );
    Ok(p)
}

// The dense entry points live here, not beside the format in `qmatmul.rs`, because on CUDA
// with many rows they take this module's tiled GEMM: `qmatmul.rs` then depends on nothing above it.

/// `x [M, K] -> [M, N]`, `y = x W^T` with W `[N, K]` quantized as `fmt` (qweight, params as in
/// the module docs). Output in the dtype of x.
pub fn qmatmul(x: &Tensor, qweight: &Tensor, params: &Tensor, fmt: QFormat) -> Result<Tensor> {
    let d = check(
        fmt,
        false,
        (x.dtype(), x.dims()),
        (qweight.dtype(), qweight.dims()),
        (params.dtype(), params.dims()),
    )?;
    if d.m == 0 || d.n == 0 {
        return Tensor::zeros((d.m, d.n), x.dtype(), x.device());
    }
    // CUDA with many rows: the tiled GEMM path ([`qmatmul_moe`] with one expert).
    if let Some(y) = large_qmatmul(x, qweight, params, None, fmt)? {
        return Ok(y);
    }
    if crate::launch::runs_kernels(x.device()) {
        return crate::qmatmul::run_plan(x, qweight, params, fmt, None);
    }
    x.contiguous()?.apply_op3_no_bwd(
        &qweight.contiguous()?,
        &params.contiguous()?,
        &QMatmul { fmt, offsets: None },
    )
}

/// Grouped expert layout: `x [M, K]` whose rows `offsets[e]..offsets[e+1]` belong to expert e
/// (expert-sorted, as dispatch leaves them), qweight `[E, N, Kb]`, params `[E, N, ..]` ->
/// `[M, N]`. `offsets` has E + 1 entries, starts at 0 and ends at M.
pub fn qmatmul_grouped(
    x: &Tensor,
    qweight: &Tensor,
    params: &Tensor,
    offsets: &[u32],
    fmt: QFormat,
) -> Result<Tensor> {
    let d = check(
        fmt,
        true,
        (x.dtype(), x.dims()),
        (qweight.dtype(), qweight.dims()),
        (params.dtype(), params.dims()),
    )?;
    if offsets.len() != d.e + 1
        || offsets[0] != 0
        || offsets[d.e] as usize != d.m
        || offsets.windows(2).any(|w| w[0] > w[1])
    {
        bail!(
            "{OP_GROUPED}: offsets must be E + 1 = {} non-decreasing entries from 0 to M = {}, got {offsets:?}",
            d.e + 1,
            d.m
        );
    }
    if d.m == 0 || d.n == 0 {
        return Tensor::zeros((d.m, d.n), x.dtype(), x.device());
    }
    // CUDA with many rows per expert: the tiled GEMM path.
    if let Some(y) = large_qmatmul(x, qweight, params, Some(offsets), fmt)? {
        return Ok(y);
    }
    if crate::launch::runs_kernels(x.device()) {
        return crate::qmatmul::run_plan(x, qweight, params, fmt, Some(offsets));
    }
    x.contiguous()?.apply_op3_no_bwd(
        &qweight.contiguous()?,
        &params.contiguous()?,
        &QMatmul {
            fmt,
            offsets: Some(offsets.to_vec()),
        },
    )
}

/// Output tile of the GEMM path (`QG_TILE_M` x `QG_TILE_N` in `cuda/qmatmul.cu`).
const QG_TILE_M: usize = 64;
const QG_TILE_N: usize = 64;
/// Row tile and warps of `qmma`'s GEMM (`QMG_ROWS`, `QM_WARPS` in `cuda/qmatmul.cu`): each warp takes the 16
/// weight rows of a `qmma` GEMV block (8 features with SwiGLU).
const QMG_ROWS: usize = 32;
const QMG_WARPS: usize = 8;

/// `qmatmul` / `qmatmul_grouped` on CUDA (or the emulator) with more rows than the GEMV path is for: the same
/// product through the GEMM path of [`qmatmul_moe`] (a dense linear is one expert). `None` when the GEMV path
/// applies (or the CPU runs the reference). `offsets`: the grouped layout's host offsets, `None` for a dense
/// `qweight [N, Kb]`.
pub(crate) fn large_qmatmul(
    x: &Tensor,
    qweight: &Tensor,
    params: &Tensor,
    offsets: Option<&[u32]>,
    fmt: QFormat,
) -> Result<Option<Tensor>> {
    if !crate::launch::runs_kernels(x.device()) {
        return Ok(None);
    }
    let m = x.dim(0)?;
    let dense = [0, m as u32];
    let grouped = offsets.is_some();
    let offsets = offsets.unwrap_or(&dense);
    let counts: Vec<u32> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let most = counts.iter().copied().max().unwrap_or(0) as usize;
    let active = counts.iter().filter(|&&c| c > 0).count().max(1);
    let avg = m as f64 / active as f64;
    let n = qweight.dim(qweight.rank() - 2)?;
    let sms = crate::gpu_sm_count(x.device());
    if qmm_path(fmt, x.dtype(), &[(x.dim(1)?, n)], most, avg, active, sms) == ExpertPath::Gemv {
        return Ok(None);
    }
    let (qw, pw) = if grouped {
        (qweight.clone(), params.clone())
    } else {
        (qweight.unsqueeze(0)?, params.unsqueeze(0)?)
    };
    let dev = x.device();
    let c = Tensor::from_slice(&counts, counts.len(), dev)?;
    let o = Tensor::from_slice(offsets, offsets.len(), dev)?;
    qmatmul_moe(x, None, &c, &o, &qw, &pw, fmt, Some(ExpertPath::Gemm)).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::dispatch_reference;
    use crate::qformat::quantize_rows;

    /// Where the GEMV is `qmma`, quantized products keep it while experts average one 8-row chunk, or
    /// while `qmma`'s GEMM would leave SMs idle, and take the GEMM past that; elsewhere the dense
    /// experts' thresholds hold, and `MOE_PATH=qgemv` (the CUDA-core GEMV) restores them too.
    #[test]
    fn qmma_paths_by_rows_per_expert() {
        use ExpertPath::{Gemm, Gemv};
        let (g128, int8) = (QFormat::Int4 { group: 128 }, QFormat::Int8);
        // (format, dtype, (inputs, output rows), rows at most, average, active experts, path).
        type Case<'a> = (
            QFormat,
            DType,
            &'a [(usize, usize)],
            usize,
            f64,
            usize,
            ExpertPath,
        );
        let products: [Case; 13] = [
            (g128, DType::BF16, &[(4096, 4096)], 513, 513.0, 1, Gemm),
            (int8, DType::F16, &[(4096, 4096)], 513, 513.0, 1, Gemm),
            (g128, DType::BF16, &[(4096, 4096)], 8, 8.0, 1, Gemv),
            // Past the dense experts' average of 4, within qmma's 8: still the GEMV.
            (g128, DType::BF16, &[(4096, 28672)], 64, 6.0, 8, Gemv),
            (
                g128,
                DType::BF16,
                &[(4096, 28672), (14336, 4096)],
                64,
                9.0,
                8,
                Gemm,
            ),
            // A dense linear of 64 rows: 32 blocks x 2 tiles, too few; 128 rows fill 128 blocks. A
            // 1024-row projection (8 blocks) needs 16 tiles (481 rows or more).
            (g128, DType::BF16, &[(4096, 4096)], 64, 64.0, 1, Gemv),
            (g128, DType::BF16, &[(4096, 4096)], 128, 128.0, 1, Gemm),
            (g128, DType::BF16, &[(4096, 1024)], 480, 480.0, 1, Gemv),
            (g128, DType::BF16, &[(4096, 1024)], 481, 481.0, 1, Gemm),
            (g128, DType::F32, &[(4096, 4096)], 64, 6.0, 8, Gemm),
            (
                QFormat::Mxfp4,
                DType::BF16,
                &[(4096, 4096)],
                64,
                6.0,
                8,
                Gemv,
            ),
            (
                QFormat::Mxfp4,
                DType::F32,
                &[(4096, 4096)],
                64,
                6.0,
                8,
                Gemm,
            ),
            // One projection without a qmma entry (K = 200 is no multiple of 16): the dense thresholds.
            (
                int8,
                DType::BF16,
                &[(4096, 4096), (200, 4096)],
                64,
                6.0,
                8,
                Gemm,
            ),
        ];
        for (fmt, dtype, shapes, most, avg, active, want) in products {
            assert_eq!(
                qmm_path(fmt, dtype, shapes, most, avg, active, None),
                want,
                "{fmt:?} {dtype:?} {shapes:?} {most} {avg} {active}"
            );
        }
        // (tokens, dtype, path): Mixtral's top-2 of 8 experts (avg = tokens / 4), DeepSeek-V3's top-8
        // of 256.
        let mixtral_shapes = [(4096, 28672), (14336, 4096)];
        let mixtral =
            |tokens, dtype| qexpert_path_for(tokens, 2, 8, g128, dtype, &mixtral_shapes, None);
        for (tokens, dtype, want) in [
            (1, DType::BF16, Gemv),
            (32, DType::BF16, Gemv),
            (33, DType::BF16, Gemm),
            (512, DType::BF16, Gemm),
            (1, DType::F32, Gemv),
            (20, DType::F32, Gemm),
        ] {
            assert_eq!(mixtral(tokens, dtype), want, "{tokens} {dtype:?}");
        }
        let v3 = |tokens| {
            qexpert_path_for(
                tokens,
                8,
                256,
                g128,
                DType::BF16,
                &[(7168, 4096), (2048, 7168)],
                None,
            )
        };
        assert_eq!((v3(256), v3(257)), (Gemv, Gemm));
        // The block count is against the GPU's SMs where known: a 64-row dense linear (32 blocks x 2
        // tiles) fills a 64-SM GPU but not 65 SMs.
        let dense64 = |sms| qmm_path(g128, DType::BF16, &[(4096, 4096)], 64, 64.0, 1, Some(sms));
        assert_eq!((dense64(64), dense64(65)), (Gemm, Gemv));
        crate::set_gemv_kernel(crate::GemvKernel::Qgemv);
        let qgemv = mixtral(20, DType::BF16);
        crate::set_gemv_kernel(crate::GemvKernel::Qmma);
        assert_eq!(qgemv, Gemm);
    }

    /// The gather form equals gathering x by hand and running `qmatmul_grouped` with host offsets.
    #[test]
    fn matches_grouped_qmatmul_on_gathered_rows() {
        let (n_tok, top_k, e, n, k) = (5usize, 2usize, 4usize, 6usize, 64usize);
        let ids = [0u32, 1, 1, 3, 3, 0, 0, 1, 3, 1]; // expert 2 idle
        let d = dispatch_reference(&ids, top_k, e, 1).unwrap();
        let x: Vec<f32> = (0..n_tok * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let w: Vec<f32> = (0..e * n * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 400.0)
            .collect();
        for fmt in [QFormat::Int8, QFormat::Int4 { group: 32 }, QFormat::Mxfp4] {
            let kb = fmt.row_bytes(k);
            let (q, p) = quantize_rows(fmt, &w, k);
            let dev = Device::Cpu;
            let mut pdims = vec![e, n];
            pdims.extend(fmt.params_shape(k));
            let qt = Tensor::from_slice(&q, (e, n, kb), &dev).unwrap();
            let pt = p.to_tensor(&pdims, &dev).unwrap();
            let xt = Tensor::from_slice(&x, (n_tok, k), &dev).unwrap();
            let rt = Tensor::from_slice(&d.row_token, d.row_token.len(), &dev).unwrap();
            let ct = Tensor::from_slice(&d.counts, e, &dev).unwrap();
            let ot = Tensor::from_slice(&d.offsets, e + 1, &dev).unwrap();
            let got: Vec<f32> = qmatmul_moe(&xt, Some(&rt), &ct, &ot, &qt, &pt, fmt, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs = xt.index_select(&rt, 0).unwrap();
            let want: Vec<f32> = qmatmul_grouped(&xs, &qt, &pt, &d.offsets, fmt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{fmt:?}: {g} vs {w}"
                );
            }
            // Without row_token x is taken in row order: feeding the gathered rows gives the same.
            let again: Vec<f32> = qmatmul_moe(&xs, None, &ct, &ot, &qt, &pt, fmt, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, again);
        }
    }

    #[test]
    fn plan_geometry() {
        let input = |i| Arg::Buf(Buf::In(i));
        let out = Arg::Buf(Buf::Out(0));
        // R = 20 dispatched rows over E = 4 experts, N = 37 features, K = 96.
        let dims = |r, n, k, e| QmoeDims { r, n, k, e };
        let d = dims(20, 37, 96, 4);
        // GEMV with the gather: C = ceil(20 / 8) + 4 = 7 chunks, 3 blocks of the qmma entry's 16 features (the
        // last partial).
        let int4 = QFormat::Int4 { group: 32 };
        let p = qmatmul_moe_plan(DType::BF16, int4, d, true, ExpertPath::Gemv).unwrap();
        assert_eq!(p.inputs.len(), 6);
        assert_eq!(p.outs[0].shape.dims(), &[20, 37]);
        let [l] = &p.launches[..] else {
            panic!("{:?}", p.launches)
        };
        // bf16 activations: the tensor-core entry where the build has it.
        let entry = if crate::qmatmul::qmma_built() {
            "qmma_moe_int4_bf16"
        } else {
            "qgemv_moe_int4_bf16"
        };
        assert_eq!((l.module, l.entry.as_str()), ("qmatmul", entry));
        // qmma: the 7 chunks on x, the 3 feature blocks on y.
        let grid = if entry.starts_with("qmma") {
            [7, 3, 1]
        } else {
            [3, 7, 1]
        };
        assert_eq!((l.grid, l.block), (grid, [256, 1, 1]));
        let mut want = vec![
            input(0),
            input(1),
            input(2),
            input(3),
            input(4),
            input(5),
            out,
        ];
        want.extend([4, 7, 37, 96, 32].map(Arg::U32));
        assert_eq!(l.args, want);
        // GEMM without the gather (x in row order): a null row_token, no C argument; ceil(20 / 64) + 4 = 5 row
        // tiles, one 64-feature tile.
        let p = qmatmul_moe_plan(DType::F32, QFormat::Int8, d, false, ExpertPath::Gemm).unwrap();
        assert_eq!(p.inputs.len(), 5);
        let l = &p.launches[0];
        assert_eq!(l.entry, "qmatmul_gemm_int8_f32");
        assert_eq!((l.grid, l.block), ([1, 5, 1], [256, 1, 1]));
        let mut want = vec![
            input(0),
            Arg::Null,
            input(1),
            input(2),
            input(3),
            input(4),
            out,
        ];
        want.extend([4, 37, 96, 0].map(Arg::U32));
        assert_eq!(l.args, want);
        // GEMV grids clamp at 65535 chunks on y (the kernel strides; qmma's take them all on x), the GEMM's are
        // an error; no rows: no launch.
        let many = dims(8 * 70000, 37, 96, 4);
        let p = qmatmul_moe_plan(DType::F32, QFormat::Int8, many, true, ExpertPath::Gemv).unwrap();
        assert_eq!(
            (p.launches[0].grid[1], p.launches[0].args[8]),
            (65535, Arg::U32(70004))
        );
        if crate::qmatmul::qmma_built() {
            let p =
                qmatmul_moe_plan(DType::F16, QFormat::Int8, many, true, ExpertPath::Gemv).unwrap();
            assert_eq!(p.launches[0].grid, [70004, 3, 1]);
        }
        // MXFP4 on qmma in bf16/f16 (K % 32 == 0), with SwiGLU too; f32 and odd K keep the qmatmul entries.
        let even = dims(20, 38, 96, 4);
        let qmma = crate::qmatmul::qmma_built();
        for (dtype, dd, swiglu, want) in [
            (DType::BF16, d, false, "qmma_moe_mxfp4_bf16"),
            (DType::F16, even, true, "qmma_moe_swiglu_mxfp4_f16"),
            (DType::F32, even, true, "qmatmul_moe_swiglu_mxfp4_f32"),
            (
                DType::BF16,
                dims(20, 38, 80, 4),
                false,
                "qmatmul_moe_mxfp4_bf16",
            ),
        ] {
            let p = moe_plan(dtype, QFormat::Mxfp4, dd, true, ExpertPath::Gemv, swiglu).unwrap();
            let want = if qmma {
                want.to_string()
            } else {
                want.replace("qmma_", "qmatmul_")
            };
            assert_eq!(p.launches[0].entry, want);
        }
        let p = moe_plan(
            DType::BF16,
            QFormat::Int8,
            even,
            true,
            ExpertPath::Gemv,
            true,
        )
        .unwrap();
        let want = if crate::qmatmul::qmma_built() {
            ("qmma_moe_swiglu_int8_bf16", [7, 3, 1])
        } else {
            ("qgemv_moe_swiglu_int8_bf16", [3, 7, 1])
        };
        assert_eq!((p.launches[0].entry.as_str(), p.launches[0].grid), want);
        // The GEMM where qmma applies: 32-row tiles (ceil(20 / 32) + 4 = 5), 128 weight rows per block (64
        // features with SwiGLU, which the f32 GEMM does not fuse).
        for (dd, swiglu, want) in [
            (d, false, ("qmma_gemm_int8_bf16", [1, 5, 1])),
            (
                dims(20, 300, 96, 4),
                false,
                ("qmma_gemm_int8_bf16", [3, 5, 1]),
            ),
            (even, true, ("qmma_gemm_swiglu_int8_bf16", [1, 5, 1])),
            (
                dims(20, 300, 96, 4),
                true,
                ("qmma_gemm_swiglu_int8_bf16", [3, 5, 1]),
            ),
        ] {
            let p = moe_plan(
                DType::BF16,
                QFormat::Int8,
                dd,
                true,
                ExpertPath::Gemm,
                swiglu,
            );
            if crate::qmatmul::qmma_built() {
                let p = p.unwrap();
                let l = &p.launches[0];
                assert_eq!(
                    (l.entry.as_str(), l.grid, l.block),
                    (want.0, want.1, [256, 1, 1])
                );
            } else {
                assert_eq!(p.is_err(), swiglu);
            }
        }
        assert!(moe_plan(
            DType::F32,
            QFormat::Int8,
            even,
            true,
            ExpertPath::Gemm,
            true
        )
        .is_err());
        let huge = dims(64 * 65535, 37, 96, 4);
        assert!(qmatmul_moe_plan(DType::F16, QFormat::Int8, huge, true, ExpertPath::Gemm).is_err());
        let none = dims(0, 37, 96, 4);
        let p = qmatmul_moe_plan(DType::F16, QFormat::Int8, none, true, ExpertPath::Gemm).unwrap();
        assert!(p.launches.is_empty());
    }

    #[test]
    fn bad_dispatch_is_an_error() {
        let dev = Device::Cpu;
        let fmt = QFormat::Int8;
        let x = Tensor::zeros((2, 16), DType::F32, &dev).unwrap();
        let q = Tensor::zeros((2, 3, 16), DType::U8, &dev).unwrap();
        let p = Tensor::zeros((2, 3), DType::F16, &dev).unwrap();
        let rt = Tensor::new(&[0u32, 5], &dev).unwrap(); // token 5 does not exist
        let c = Tensor::new(&[1u32, 1], &dev).unwrap();
        let o = Tensor::new(&[0u32, 1, 2], &dev).unwrap();
        assert!(qmatmul_moe(&x, Some(&rt), &c, &o, &q, &p, fmt, None).is_err());
        let c3 = Tensor::new(&[1u32, 1, 0], &dev).unwrap();
        assert!(qmatmul_moe(&x, Some(&rt), &c3, &o, &q, &p, fmt, None).is_err());
    }
}
