//! MoE stage 3, experts: each expert's SwiGLU MLP over its dispatched rows, all experts in one launch per
//! projection.
//!
//! Legend: N tokens, E experts, H hidden, F expert ffn width, R dispatched rows (see `dispatch`).
//!
//! ```text
//! x         [N, H]      f32 | bf16 | f16 (T)
//! row_token [R]         u32, counts [E] u32, offsets [E+1] u32: a dispatch (any row order within an expert)
//! gate_up   [E, 2F, H]  T, rows 0..F gate, F..2F up
//! down      [E, H, F]   T
//! out       [R, H]      T, row r = live row of expert e holding token t:
//!   act[f] = T(silu(g_f) * u_f),  g_f = sum_h x[t,h] gate_up[e,f,h],  u_f = sum_h x[t,h] gate_up[e,F+f,h]
//!   out[r, h] = T(sum_f f32(act[f]) down[e,h,f])
//! ```
//! every sum in f32, silu(g) = g / (1 + exp(-g)). Padding rows of `out` are unspecified (the reference writes
//! zeros; combine never reads them).
//!
//! [`experts_reference`] is the specification. The CUDA kernels (`cuda/moe_experts.cu`, NOT YET RUN ON A GPU)
//! have two paths chosen by [`expert_path`]: GEMV for decode (few rows per expert) and a shared-memory tiled
//! GEMM for prefill: tensor cores (WMMA 16x16x16, f32 accumulate) for bf16/f16 where the target has them
//! ([`mma_entry`]), plain f32 FMA otherwise. Neither is tuned yet (no async copies or double buffering).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_act, check_dtype, host, same_device, Elem};

const OP: &str = "moe_experts";

/// Self-test budgets: the kernels sum in another order (and with FMA), which moves f32 results by ~1e-7
/// relative and, in bf16/f16, flips the rounding of a few intermediate `act` values by one ulp.
pub const EXPERTS_NMSE_F32: f64 = 1e-10;
pub const EXPERTS_NMSE_F16: f64 = 1e-6;
pub const EXPERTS_NMSE_BF16: f64 = 1e-4;

/// Which CUDA kernels run the experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPath {
    /// Decode: a warp per weight row streams it once per chunk of 4 token rows.
    Gemv,
    /// Prefill: 64-row tiles through shared memory.
    Gemm,
}

/// GEMV while no expert can have more rows than this...
pub const GEMV_MAX_ROWS_PER_EXPERT: usize = 8;
/// ...or while the expected rows per active expert (S / min(E, S)) stay at or below this: with many experts
/// (E = 256, top-8) even 64 tokens give each expert ~2 rows, still a weight-streaming problem.
pub const GEMV_MAX_AVG_ROWS: f64 = 4.0;
/// The path for a launch: `rows_per_expert_max` is the most rows any expert can get (N tokens: a token picks
/// an expert at most once; known on the host without a sync), `avg_rows_per_expert` the expected rows per
/// active expert. Pure. (The engine's one path selector, `moe::model::path`, may force either.)
pub fn expert_path(rows_per_expert_max: usize, avg_rows_per_expert: f64) -> ExpertPath {
    if rows_per_expert_max <= GEMV_MAX_ROWS_PER_EXPERT || avg_rows_per_expert <= GEMV_MAX_AVG_ROWS {
        ExpertPath::Gemv
    } else {
        ExpertPath::Gemm
    }
}

/// Warps per block of the tensor-core GEMM entries (`MMA_WARPS` in `cuda/moe_experts.cu`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const MMA_WARPS: u32 = 4;

/// Whether the GEMM path of `dtype` runs the tensor-core (WMMA) entries `moe_{gate_up,down}_mma_*` on a build
/// for `arch` (`"sm_90"`): f16 from sm_70, bf16 from sm_80; f32 (and older targets) keep the FMA GEMM. Pure.
pub fn mma_entry(dtype: DType, arch: Option<&str>) -> bool {
    let cap: u32 = arch
        .and_then(|a| {
            a.trim_start_matches("sm_")
                .trim_end_matches('a')
                .parse()
                .ok()
        })
        .unwrap_or(0);
    match dtype {
        DType::F16 => cap >= 70,
        DType::BF16 => cap >= 80,
        _ => false,
    }
}

/// [`expert_path`] for N tokens with top-k over E experts.
pub fn expert_path_for(tokens: usize, top_k: usize, num_experts: usize) -> ExpertPath {
    let slots = tokens * top_k;
    let avg = slots as f64 / num_experts.min(slots).max(1) as f64;
    expert_path(tokens, avg)
}

/// Runs every expert over its rows; returns `out [R, H]` (module docs). `path` picks the CUDA kernels
/// (`None`: [`expert_path_for`] with N = `x`'s rows, K = R / N); the CPU always runs the reference.
pub fn moe_experts(
    x: &Tensor,
    row_token: &Tensor,
    counts: &Tensor,
    offsets: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    path: Option<ExpertPath>,
) -> Result<Tensor> {
    let d = Dims::check(x, row_token, counts, offsets, gate_up, down)?;
    same_device(
        OP,
        &[
            ("x", x),
            ("row_token", row_token),
            ("counts", counts),
            ("offsets", offsets),
            ("gate_up", gate_up),
            ("down", down),
        ],
    )?;
    match x.device() {
        Device::Cpu => {
            let rt = host::<u32>(row_token)?;
            let c = host::<u32>(counts)?;
            let o = host::<u32>(offsets)?;
            fn run<T: Elem>(
                x: &Tensor,
                gu: &Tensor,
                dn: &Tensor,
                rt: &[u32],
                c: &[u32],
                o: &[u32],
                d: Dims,
            ) -> Result<Tensor> {
                let out = experts_reference::<T>(
                    &host(x)?,
                    rt,
                    c,
                    o,
                    &host(gu)?,
                    &host(dn)?,
                    d.n,
                    d.h,
                    d.f,
                )?;
                Tensor::from_vec(out, (d.r, d.h), &Device::Cpu)
            }
            match x.dtype() {
                DType::F32 => run::<f32>(x, gate_up, down, &rt, &c, &o, d),
                DType::BF16 => run::<half::bf16>(x, gate_up, down, &rt, &c, &o, d),
                _ => run::<half::f16>(x, gate_up, down, &rt, &c, &o, d),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let path = match path {
                Some(p) => p,
                None => expert_path_for(d.n, d.r / d.n.max(1), d.e),
            };
            cuda_experts(x, row_token, counts, offsets, gate_up, down, path, d)
        }
        dv => {
            let _ = path;
            bail!("{OP}: unsupported device {:?}", dv.location())
        }
    }
}

#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // `e` is read by the CUDA launcher only
struct Dims {
    n: usize,
    h: usize,
    f: usize,
    e: usize,
    r: usize,
}

impl Dims {
    fn check(
        x: &Tensor,
        row_token: &Tensor,
        counts: &Tensor,
        offsets: &Tensor,
        gate_up: &Tensor,
        down: &Tensor,
    ) -> Result<Self> {
        check_act(OP, "x", x.dtype())?;
        for (what, t) in [("gate_up", gate_up), ("down", down)] {
            if t.dtype() != x.dtype() {
                bail!("{OP}: {what} is {:?} but x is {:?}", t.dtype(), x.dtype());
            }
        }
        for (what, t) in [
            ("row_token", row_token),
            ("counts", counts),
            ("offsets", offsets),
        ] {
            check_dtype(OP, what, t, DType::U32)?;
        }
        let (n, h) = x.dims2()?;
        let (e, f2, h2) = gate_up.dims3()?;
        let (e2, h3, f) = down.dims3()?;
        if h2 != h || h3 != h || e2 != e || f2 != 2 * f {
            bail!(
                "{OP}: want gate_up [E, 2F, H] and down [E, H, F] with H = {h}; got {:?} and {:?}",
                gate_up.dims(),
                down.dims()
            );
        }
        if counts.dims() != [e] || offsets.dims() != [e + 1] || row_token.rank() != 1 {
            bail!(
                "{OP}: want counts [{e}], offsets [{}], row_token [R]; got {:?}, {:?}, {:?}",
                e + 1,
                counts.dims(),
                offsets.dims(),
                row_token.dims()
            );
        }
        let r = row_token.dim(0)?;
        if [n, h, f, e, r].iter().any(|&v| v > u32::MAX as usize)
            || r.saturating_mul(h.max(f)) > isize::MAX as usize
        {
            bail!("{OP}: sizes exceed the kernels' u32 indices");
        }
        Ok(Dims { n, h, f, e, r })
    }
}

/// The specification (module docs). `x [N*H]`, `gate_up [E*2F*H]`, `down [E*H*F]`; returns `[R*H]`, padding
/// rows zero. Errors on a dispatch that does not fit (rows or tokens out of range).
#[allow(clippy::too_many_arguments)]
pub fn experts_reference<T: Elem>(
    x: &[T],
    row_token: &[u32],
    counts: &[u32],
    offsets: &[u32],
    gate_up: &[T],
    down: &[T],
    n: usize,
    h: usize,
    f: usize,
) -> Result<Vec<T>> {
    let r = row_token.len();
    let mut out = vec![T::of(0.0); r * h];
    let mut act = vec![0f32; f];
    for (e, (&cnt, &lo)) in counts.iter().zip(offsets).enumerate() {
        let (lo, cnt) = (lo as usize, cnt as usize);
        if lo + cnt > r {
            bail!("{OP}: expert {e} rows {lo}..{} exceed R = {r}", lo + cnt);
        }
        let gu = &gate_up[e * 2 * f * h..(e + 1) * 2 * f * h];
        let dn = &down[e * h * f..(e + 1) * h * f];
        for row in lo..lo + cnt {
            let t = row_token[row] as usize;
            if t >= n {
                bail!("{OP}: row {row} of expert {e} holds token {t}, not < N = {n}");
            }
            let xt = &x[t * h..(t + 1) * h];
            for (j, a) in act.iter_mut().enumerate() {
                let dot = |w: &[T]| {
                    xt.iter()
                        .zip(w)
                        .fold(0f32, |s, (&xv, &wv)| s + xv.f32() * wv.f32())
                };
                let g = dot(&gu[j * h..(j + 1) * h]);
                let u = dot(&gu[(f + j) * h..(f + j + 1) * h]);
                *a = T::of(g / (1.0 + (-g).exp()) * u).f32();
            }
            for (k, o) in out[row * h..(row + 1) * h].iter_mut().enumerate() {
                let w = &dn[k * f..(k + 1) * f];
                *o = T::of(
                    act.iter()
                        .zip(w)
                        .fold(0f32, |s, (&a, &wv)| s + a * wv.f32()),
                );
            }
        }
    }
    Ok(out)
}

#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn cuda_experts(
    x: &Tensor,
    row_token: &Tensor,
    counts: &Tensor,
    offsets: &Tensor,
    gate_up: &Tensor,
    down: &Tensor,
    path: ExpertPath,
    d: Dims,
) -> Result<Tensor> {
    use crate::common::cuda::{alloc_out, wrap};
    use crate::common::cuda_act::ActView;
    use crate::cuda_util::{contiguous, module_key};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::Storage;

    let (x, row_token, counts, offsets, gate_up, down) = (
        x.contiguous()?,
        row_token.contiguous()?,
        counts.contiguous()?,
        offsets.contiguous()?,
        gate_up.contiguous()?,
        down.contiguous()?,
    );
    let guards =
        [&x, &row_token, &counts, &offsets, &gate_up, &down].map(|t| t.storage_and_layout());
    let mut cs = Vec::with_capacity(6);
    for (st, l) in &guards {
        let Storage::Cuda(c) = &**st else {
            bail!("{OP}: an input is not on a CUDA device")
        };
        cs.push((c, *l));
    }
    let dev = cs[0].0.device.clone();
    let xv = ActView::new(cs[0].0, cs[0].1, OP, "x")?;
    let rtv = contiguous(cs[1].0.as_cuda_slice::<u32>()?, cs[1].1, OP, "row_token")?;
    let cv = contiguous(cs[2].0.as_cuda_slice::<u32>()?, cs[2].1, OP, "counts")?;
    let ov = contiguous(cs[3].0.as_cuda_slice::<u32>()?, cs[3].1, OP, "offsets")?;
    let guv = ActView::new(cs[4].0, cs[4].1, OP, "gate_up")?;
    let dnv = ActView::new(cs[5].0, cs[5].1, OP, "down")?;
    let sfx = xv.suffix();
    let m = &crate::ptx::MOE_EXPERTS;
    let (e32, h32, f32_) = (d.e as u32, d.h as u32, d.f as u32);
    // grid.y is one block per row tile (GEMM) or active expert (GEMV): the launch limit is 65535.
    let y = match path {
        ExpertPath::Gemm => d.r.div_ceil(64) + d.e.min(d.r),
        ExpertPath::Gemv => d.e.min(d.r),
    };
    if y > 65535 {
        bail!(
            "{OP}: {y} row tiles exceed the grid's 65535 (R = {} rows)",
            d.r
        );
    }

    macro_rules! run_dtype {
        ($ty:ty, $variant:ident) => {{
            let act = alloc_out::<$ty>(&dev, d.r * d.f)?;
            let out = alloc_out::<$ty>(&dev, d.r * d.h)?;
            if d.r > 0 && d.h > 0 && d.f > 0 {
                const GEMV_WARPS: u32 = 8; // moe_experts.cu
                const TILE_M: usize = 64;
                let active = d.e.min(d.r) as u32;
                let tiles = (d.r.div_ceil(TILE_M) + d.e.min(d.r)) as u32;
                let (k1, k2, c1, c2) = match path {
                    ExpertPath::Gemv => (
                        format!("moe_gate_up_gemv_{sfx}"),
                        format!("moe_down_gemv_{sfx}"),
                        LaunchConfig { grid_dim: (f32_.div_ceil(GEMV_WARPS), active, 1), block_dim: (32 * GEMV_WARPS, 1, 1), shared_mem_bytes: 0 },
                        LaunchConfig { grid_dim: (h32.div_ceil(GEMV_WARPS), active, 1), block_dim: (32 * GEMV_WARPS, 1, 1), shared_mem_bytes: 0 },
                    ),
                    ExpertPath::Gemm => {
                        // Tensor cores (WMMA, 4 warps) for bf16/f16 where the target has them.
                        let (kind, threads) = if mma_entry(x.dtype(), crate::cuda_arch()) { ("mma", 32 * MMA_WARPS) } else { ("gemm", 256) };
                        (
                            format!("moe_gate_up_{kind}_{sfx}"),
                            format!("moe_down_{kind}_{sfx}"),
                            LaunchConfig { grid_dim: (f32_.div_ceil(32), tiles, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 },
                            LaunchConfig { grid_dim: (h32.div_ceil(64), tiles, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 },
                        )
                    }
                };
                let f1 = dev.get_or_load_custom_func(&k1, &module_key(m), m.ptx)?;
                let mut b = f1.builder();
                xv.push(&mut b);
                b.arg(&rtv);
                b.arg(&cv);
                b.arg(&ov);
                guv.push(&mut b);
                b.arg(&act);
                candle_core::builder_arg!(b, e32, h32, f32_);
                // SAFETY: matches moe_gate_up_{gemv,gemm}_<dtype>: reads x [N,H], R row tokens, E counts,
                // E+1 offsets, gate_up [E,2F,H]; writes act rows of live dispatched rows (< R by the dispatch).
                unsafe { b.launch(c1) }.w()?;
                let f2 = dev.get_or_load_custom_func(&k2, &module_key(m), m.ptx)?;
                let mut b = f2.builder();
                b.arg(&act);
                b.arg(&cv);
                b.arg(&ov);
                dnv.push(&mut b);
                b.arg(&out);
                candle_core::builder_arg!(b, e32, h32, f32_);
                // SAFETY: matches moe_down_{gemv,gemm}_<dtype>: reads act [R,F], down [E,H,F]; writes out [R,H].
                unsafe { b.launch(c2) }.w()?;
            }
            drop(act);
            Ok(wrap(CudaStorageSlice::$variant(out), &dev, (d.r, d.h)))
        }};
    }
    match xv {
        ActView::F32(_) => run_dtype!(f32, F32),
        ActView::BF16(_) => run_dtype!(half::bf16, BF16),
        ActView::F16(_) => run_dtype!(half::f16, F16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_core_entries() {
        assert!(mma_entry(DType::BF16, Some("sm_90")));
        assert!(mma_entry(DType::BF16, Some("sm_90a")));
        assert!(mma_entry(DType::F16, Some("sm_75")));
        assert!(!mma_entry(DType::BF16, Some("sm_75")));
        assert!(!mma_entry(DType::F32, Some("sm_90")));
        assert!(!mma_entry(DType::F16, None));
        let src = include_str!("../cuda/moe_experts.cu");
        assert!(src.contains(&format!("#define MMA_WARPS {MMA_WARPS}\n")));
        assert!(
            src.contains("MMA_ENTRIES(f16, __half)")
                && src.contains("MMA_ENTRIES(bf16, __nv_bfloat16)")
        );
    }

    #[test]
    fn path_choice() {
        assert_eq!(expert_path(1, 1.0), ExpertPath::Gemv);
        assert_eq!(expert_path(GEMV_MAX_ROWS_PER_EXPERT, 8.0), ExpertPath::Gemv);
        assert_eq!(
            expert_path(64, 2.0),
            ExpertPath::Gemv,
            "E=256 top-8 at 64 tokens"
        );
        assert_eq!(expert_path(513, 64.0), ExpertPath::Gemm);
        // (Forcing either is the engine's path selector's job, tested there.)
        // expert_path_for: decode, E=256 top-8 prefill of 64, E=16 top-4 prefill of 513.
        let by_formula = |t: usize, k: usize, e: usize| {
            let avg = (t * k) as f64 / e.min(t * k) as f64;
            expert_path(t, avg)
        };
        for (t, k, e, want) in [
            (1, 8, 256, ExpertPath::Gemv),
            (64, 8, 256, ExpertPath::Gemv),
            (513, 4, 16, ExpertPath::Gemm),
        ] {
            assert_eq!(by_formula(t, k, e), want);
            assert_eq!(expert_path_for(t, k, e), want);
        }
    }

    #[test]
    fn reference_matches_naive_f64() {
        // 3 tokens, top-2 over 3 experts, expert 2 idle; H = 5, F = 3.
        let (n, h, f, e) = (3usize, 5usize, 3usize, 3usize);
        let x: Vec<f32> = (0..n * h)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 7.0)
            .collect();
        let gu: Vec<f32> = (0..e * 2 * f * h)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 9.0)
            .collect();
        let dn: Vec<f32> = (0..e * h * f)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) / 5.0)
            .collect();
        let ids = [0u32, 1, 1, 0, 0, 1];
        let d = crate::dispatch::dispatch_reference(&ids, 2, e, 1).unwrap();
        let out =
            experts_reference(&x, &d.row_token, &d.counts, &d.offsets, &gu, &dn, n, h, f).unwrap();
        for (slot, &ex) in ids.iter().enumerate() {
            let (t, ex, row) = (slot / 2, ex as usize, d.slot_row[slot] as usize);
            let act: Vec<f64> = (0..f)
                .map(|j| {
                    let dot = |o: usize| {
                        (0..h)
                            .map(|k| x[t * h + k] as f64 * gu[(ex * 2 * f + o) * h + k] as f64)
                            .sum::<f64>()
                    };
                    let (g, u) = (dot(j), dot(f + j));
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            for k in 0..h {
                let want: f64 = (0..f)
                    .map(|j| act[j] * dn[(ex * h + k) * f + j] as f64)
                    .sum();
                assert!(
                    (out[row * h + k] as f64 - want).abs() < 1e-5,
                    "slot {slot} k {k}"
                );
            }
        }
    }
}
