//! Per-head QK-norm fused with RoPE, and the head transpose in front of attention.
//!
//! Legend: B batch, T tokens, H heads, D head dim (even), P table rows (max positions).
//!
//! ```text
//! x        [B, T, H, D]  f32 | bf16 | f16
//! weight   [D]           same dtype (optional per-head RMSNorm, eps)
//! cos, sin [P, RH]       same dtype; token t sits at position pos + t (pos + T <= P); RH <= D/2 pairs
//!                        rotate (partial rotary: dims 2 RH..D pass through RoPE unchanged)
//! norm(r)  = T(f32(T(r / sqrt(mean(r^2) + eps))) * f32(weight))     (rms_norm's roundings, over D)
//! rope(r)  : pairs (i, i + RH) (rotate-half) or (2i, 2i+1) (interleaved), i < RH, c, s = cos/sin[pos+t, i]:
//!            a' = T(a*c - b*s), b' = T(b*c + a*s)      (f32 arithmetic, one rounding per element)
//! out      [B, H, T, D]  contiguous: rope(norm(x)) (norm before), norm(rope(x)) (after) or rope(x)
//! ```
//! [`qk_norm_rope_reference`] is the specification; the CUDA kernel is `cuda/qk_norm_rope.cu` (one warp per
//! (token, head); written and compiled without a GPU, NOT YET RUN ON ONE).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_act, grid_dim, host, same_device, suffix, At, Elem, STEP_POS};
use crate::launch::{plan::step_input, Arg, Buf, Plan};

const OP: &str = "qk_norm_rope";

/// Largest head dim the CUDA kernel stages in shared memory (`QKR_MAX_D` in `cuda/qk_norm_rope.cu`).
pub const QK_NORM_ROPE_MAX_D: usize = 512;

/// Self-test budgets (not yet measured on a GPU): the kernel's sum of squares is a warp tree and nvcc may
/// contract `a*c - b*s` into an fma, so f32 moves by ~1e-7 relative; bf16/f16 outputs move by an ulp where one
/// of the (up to three) roundings flips, and a flip before RoPE propagates through it.
pub const QK_NORM_ROPE_NMSE_F32: f64 = 1e-11;
pub const QK_NORM_ROPE_NMSE_F16: f64 = 1e-6;
pub const QK_NORM_ROPE_NMSE_BF16: f64 = 1e-4;

/// The optional per-head RMSNorm of [`qk_norm_rope`].
#[derive(Debug, Clone, Copy)]
pub struct HeadNorm<'a> {
    /// `[D]`, the dtype of x.
    pub weight: &'a Tensor,
    pub eps: f32,
    /// Normalise after RoPE (`QkNorm::PerHeadAfterRope`) instead of before it.
    pub after_rope: bool,
}

/// `x [B, T, H, D]` -> `[B, H, T, D]`: optional per-head RMSNorm around RoPE at positions `pos..pos+T`.
pub fn qk_norm_rope(
    x: &Tensor,
    norm: Option<HeadNorm<'_>>,
    cos: &Tensor,
    sin: &Tensor,
    pos: usize,
    interleaved: bool,
) -> Result<Tensor> {
    qk_norm_rope_at(x, norm, cos, sin, At::Host(pos), interleaved)
}

/// [`qk_norm_rope`] with the position fixed or read from a decode step's table (column
/// [`STEP_POS`]) as the kernel runs. The caller checks a table's position against the cos/sin rows
/// (the kernel writes nothing for a position past them).
pub fn qk_norm_rope_at(
    x: &Tensor,
    norm: Option<HeadNorm<'_>>,
    cos: &Tensor,
    sin: &Tensor,
    pos: At<'_>,
    interleaved: bool,
) -> Result<Tensor> {
    check_act(OP, "x", x.dtype())?;
    let (_, t, _, d) = x.dims4()?;
    if d % 2 != 0 {
        bail!("{OP}: head dim must be even, got {d}");
    }
    let step = match pos {
        At::Step(s) => {
            same_device(OP, &[("x", x), ("step table", s.table)])?;
            Some((s.table, s.check(OP)?))
        }
        At::Host(_) => None,
    };
    let runs_kernels = crate::launch::runs_kernels(x.device());
    // The reference reads a table's position on the host; the kernel reads it itself.
    let host_pos = match (pos, runs_kernels) {
        (At::Step(_), true) => 0,
        _ => pos.value(STEP_POS)?,
    };
    let rh = cos.dim(1)?;
    for (name, tab) in [("cos", cos), ("sin", sin)] {
        let (p, half) = tab.dims2()?;
        if half != rh || half == 0 || 2 * half > d || tab.dtype() != x.dtype() || host_pos + t > p {
            bail!(
                "{OP}: {name} must be [>= {}, 1..={}] {:?} (as cos), got {:?} {:?}",
                host_pos + t,
                d / 2,
                x.dtype(),
                tab.dims(),
                tab.dtype()
            );
        }
        same_device(OP, &[("x", x), (name, tab)])?;
    }
    if let Some(n) = &norm {
        if n.weight.dims() != [d] || n.weight.dtype() != x.dtype() {
            bail!(
                "{OP}: norm weight must be [{d}] {:?}, got {:?} {:?}",
                x.dtype(),
                n.weight.dims(),
                n.weight.dtype()
            );
        }
        same_device(OP, &[("x", x), ("weight", n.weight)])?;
    }
    if runs_kernels {
        return run_plan(x, norm, cos, sin, (host_pos, step), interleaved);
    }
    let pos = host_pos;
    match x.device() {
        Device::Cpu => {
            fn run<T: Elem>(
                x: &Tensor,
                norm: Option<HeadNorm<'_>>,
                cos: &Tensor,
                sin: &Tensor,
                pos: usize,
                interleaved: bool,
            ) -> Result<Tensor> {
                let (b, t, h, d) = x.dims4()?;
                let w = norm.map(|n| host::<T>(n.weight)).transpose()?;
                let nr = norm
                    .zip(w.as_deref())
                    .map(|(n, w)| (w, n.eps, n.after_rope));
                let out = qk_norm_rope_reference::<T>(
                    &host(x)?,
                    nr,
                    &host(cos)?,
                    &host(sin)?,
                    (b, t, h, d, cos.dim(1)?),
                    pos,
                    interleaved,
                );
                Tensor::from_vec(out, (b, h, t, d), &Device::Cpu)
            }
            match x.dtype() {
                DType::F32 => run::<f32>(x, norm, cos, sin, pos, interleaved),
                DType::BF16 => run::<half::bf16>(x, norm, cos, sin, pos, interleaved),
                _ => run::<half::f16>(x, norm, cos, sin, pos, interleaved),
            }
        }
        dev => bail!("{OP}: unsupported device {:?}", dev.location()),
    }
}

fn norm_row<T: Elem>(r: &mut [f32], w: &[T], eps: f32) {
    let ss: f32 = r.iter().map(|v| v * v).sum();
    let denom = (ss / r.len() as f32 + eps).sqrt();
    for (v, w) in r.iter_mut().zip(w) {
        *v = T::of(T::of(*v / denom).f32() * w.f32()).f32();
    }
}

/// The specification. `x [B*T*H*D]`, `norm = (weight [D], eps, after_rope)`, `cos`/`sin [P*RH]`,
/// `dims = (B, T, H, D, RH)` (RH <= D/2 rotated pairs); returns `[B, H, T, D]`.
pub fn qk_norm_rope_reference<T: Elem>(
    x: &[T],
    norm: Option<(&[T], f32, bool)>,
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize, usize),
    pos: usize,
    interleaved: bool,
) -> Vec<T> {
    let (b, t, h, d, half) = dims;
    let mut out = vec![T::of(0.0); b * h * t * d];
    let mut r = vec![0f32; d];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                let src = &x[((bi * t + ti) * h + hi) * d..][..d];
                r.iter_mut().zip(src).for_each(|(a, s)| *a = s.f32());
                if let Some((w, eps, false)) = norm {
                    norm_row(&mut r, w, eps);
                }
                let row = (pos + ti) * half;
                for i in 0..half {
                    let (ia, ib) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (c, s) = (cos[row + i].f32(), sin[row + i].f32());
                    let (a, bb) = (r[ia], r[ib]);
                    r[ia] = T::of(a * c - bb * s).f32();
                    r[ib] = T::of(bb * c + a * s).f32();
                }
                if let Some((w, eps, true)) = norm {
                    norm_row(&mut r, w, eps);
                }
                let dst = &mut out[((bi * h + hi) * t + ti) * d..][..d];
                dst.iter_mut().zip(&r).for_each(|(o, &v)| *o = T::of(v));
            }
        }
    }
    out
}

/// Warps per block of `qk_norm_rope_<dtype>` (`QKR_WARPS` in `cuda/qk_norm_rope.cu`), one per (b, t, head) row.
pub const QKR_WARPS: usize = 4;

/// The launch of `qk_norm_rope_<dtype>` on `x [B, T, H, D]` (`dims`): one warp per (b, t, head) row,
/// [`QKR_WARPS`] per block. Inputs `x`, `weight` (with a norm), `cos`, `sin` (`[P, RH]`: `table` = (P, RH)), and
/// with `step = Some(row)` the step table (the kernel reads the position from it; `pos` is then unused);
/// output `out [B, H, T, D]`. `norm`: `(eps, after_rope)`. Pure.
pub fn qk_norm_rope_plan(
    dtype: DType,
    dims: (usize, usize, usize, usize),
    norm: Option<(f32, bool)>,
    (pos, step): (usize, Option<u32>),
    (rows_p, rh): (usize, usize),
    interleaved: bool,
) -> Result<Plan> {
    let (b, t, h, d) = dims;
    if d > QK_NORM_ROPE_MAX_D {
        bail!("{OP}: the CUDA kernel takes head dims up to {QK_NORM_ROPE_MAX_D}, got {d}");
    }
    if 2 * rh > d {
        bail!("{OP}: {rh} rotated pairs exceed head dim {d}");
    }
    let u32_of = |what: &str, v: usize| {
        u32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: {what} = {v} exceeds u32")))
    };
    let mut inputs = match norm {
        Some(_) => vec!["x", "weight", "cos", "sin"],
        None => vec!["x", "cos", "sin"],
    };
    let (step_arg, step_row) = step_input(&mut inputs, step);
    let mut p = Plan::new(OP, &inputs);
    let out = p.out("out", dtype, (b, h, t, d));
    let rows = b * t * h;
    if rows == 0 || d == 0 {
        return Ok(p);
    }
    let input = |i| Arg::Buf(Buf::In(i));
    let (weight, tables) = match norm {
        Some(_) => (input(1), 2),
        None => (Arg::Null, 1),
    };
    // 0 none, 1 before RoPE, 2 after RoPE.
    let mode = match norm {
        None => 0,
        Some((_, true)) => 2,
        Some((_, false)) => 1,
    };
    let eps = norm.map_or(0.0, |n| n.0);
    // One warp per (b, t, head) row reads x [B,T,H,D], weight [D] (when mode != 0) and cos/sin rows pos..pos+T
    // of [P, D/2] (the caller checked pos + T <= P; with a step table the kernel reads pos from it and checks
    // it against P itself); writes out [B,H,T,D].
    p.launch(
        "qk_norm_rope",
        format!("qk_norm_rope_{}", suffix(dtype)?),
        [
            grid_dim(OP, "row groups", rows.div_ceil(QKR_WARPS), u32::MAX >> 1)?,
            1,
            1,
        ],
        [32 * QKR_WARPS as u32, 1, 1],
        vec![
            input(0),
            weight,
            input(tables),
            input(tables + 1),
            out,
            Arg::U32(u32_of("B", b)?),
            Arg::U32(u32_of("T", t)?),
            Arg::U32(u32_of("H", h)?),
            Arg::U32(d as u32),
            Arg::U32(u32_of("pos", pos)?),
            Arg::U32(interleaved as u32),
            Arg::U32(mode),
            Arg::F32(eps),
            step_arg,
            Arg::U32(step_row),
            Arg::U32(u32_of("P", rows_p)?),
            Arg::U32(rh as u32),
        ],
    );
    Ok(p)
}

fn run_plan(
    x: &Tensor,
    norm: Option<HeadNorm<'_>>,
    cos: &Tensor,
    sin: &Tensor,
    (pos, step): (usize, Option<(&Tensor, u32)>),
    interleaved: bool,
) -> Result<Tensor> {
    let plan = qk_norm_rope_plan(
        x.dtype(),
        x.dims4()?,
        norm.map(|n| (n.eps, n.after_rope)),
        (pos, step.map(|s| s.1)),
        cos.dims2()?,
        interleaved,
    )?;
    let mut inputs = vec![x];
    inputs.extend(norm.map(|n| n.weight));
    inputs.extend([cos, sin]);
    inputs.extend(step.map(|s| s.0));
    let mut outs = plan.run(&inputs)?;
    match outs.pop() {
        Some(out) => Ok(out),
        None => bail!("{OP}: the plan returned no output"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_geometry() {
        let input = |i| Arg::Buf(Buf::In(i));
        // B=2, T=3, H=5: 30 rows, 8 blocks of 4 warps (the last one half full); norm before RoPE.
        let p = qk_norm_rope_plan(
            DType::BF16,
            (2, 3, 5, 128),
            Some((1e-6, false)),
            (7, None),
            (10, 64),
            true,
        )
        .unwrap();
        assert_eq!(p.inputs, ["x", "weight", "cos", "sin"]);
        assert_eq!(p.outs[0].shape.dims(), &[2, 5, 3, 128]);
        let [l] = &p.launches[..] else {
            panic!("{:?}", p.launches)
        };
        assert_eq!(
            (l.module, l.entry.as_str()),
            ("qk_norm_rope", "qk_norm_rope_bf16")
        );
        assert_eq!((l.grid, l.block), ([8, 1, 1], [128, 1, 1]));
        let dims = [2, 3, 5, 128, 7, 1, 1].map(Arg::U32);
        let mut want = vec![
            input(0),
            input(1),
            input(2),
            input(3),
            Arg::Buf(Buf::Out(0)),
        ];
        want.extend(dims);
        want.extend([
            Arg::F32(1e-6),
            Arg::Null,
            Arg::U32(0),
            Arg::U32(10),
            Arg::U32(64),
        ]);
        assert_eq!(l.args, want);
        // With a step table: one more input, read at row 3; the host's position is not passed on.
        let p = qk_norm_rope_plan(
            DType::BF16,
            (1, 1, 5, 128),
            None,
            (0, Some(3)),
            (10, 64),
            true,
        )
        .unwrap();
        assert_eq!(p.inputs, ["x", "cos", "sin", "step"]);
        assert_eq!(
            &p.launches[0].args[13..],
            &[input(3), Arg::U32(3), Arg::U32(10), Arg::U32(64)]
        );
        // No norm: a null weight, the tables are inputs 1 and 2; 32 rows fill 8 blocks; norm after RoPE is mode 2.
        let p =
            qk_norm_rope_plan(DType::F32, (1, 8, 4, 64), None, (0, None), (8, 32), false).unwrap();
        assert_eq!(p.inputs, ["x", "cos", "sin"]);
        let l = &p.launches[0];
        assert_eq!((l.entry.as_str(), l.grid), ("qk_norm_rope_f32", [8, 1, 1]));
        assert_eq!(
            &l.args[..5],
            &[
                input(0),
                Arg::Null,
                input(1),
                input(2),
                Arg::Buf(Buf::Out(0))
            ]
        );
        assert_eq!(
            (l.args[10], l.args[11], l.args[12]),
            (Arg::U32(0), Arg::U32(0), Arg::F32(0.0))
        );
        let p = qk_norm_rope_plan(
            DType::F16,
            (1, 1, 1, 2),
            Some((1e-5, true)),
            (0, None),
            (1, 1),
            false,
        )
        .unwrap();
        assert_eq!(
            (p.launches[0].grid, p.launches[0].args[11]),
            ([1, 1, 1], Arg::U32(2))
        );
        // No rows: the output, no launch; head dims past the shared-memory stage: an error.
        let p =
            qk_norm_rope_plan(DType::F32, (1, 0, 4, 64), None, (0, None), (1, 32), false).unwrap();
        assert!(p.launches.is_empty());
        assert!(
            qk_norm_rope_plan(DType::F32, (1, 1, 1, 514), None, (0, None), (1, 257), false)
                .is_err()
        );
    }

    fn tables(p: usize, half: usize) -> (Tensor, Tensor) {
        let mut c = Vec::new();
        let mut s = Vec::new();
        for pos in 0..p {
            for i in 0..half {
                let a = pos as f32 / 10_000f32.powf(2.0 * i as f32 / (2 * half) as f32);
                c.push(a.cos());
                s.push(a.sin());
            }
        }
        (
            Tensor::from_vec(c, (p, half), &Device::Cpu).unwrap(),
            Tensor::from_vec(s, (p, half), &Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn rotates_pairs_and_transposes() {
        // B=1, T=2, H=2, D=4; position 3 for token 0, 4 for token 1.
        let x: Vec<f32> = (0..16).map(|v| v as f32 + 1.0).collect();
        let xt = Tensor::from_vec(x.clone(), (1, 2, 2, 4), &Device::Cpu).unwrap();
        let (cos, sin) = tables(8, 2);
        let (cv, sv): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (cos.to_vec2().unwrap(), sin.to_vec2().unwrap());
        for interleaved in [false, true] {
            let got: Vec<f32> = qk_norm_rope(&xt, None, &cos, &sin, 3, interleaved)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (ti, hi) in [(0usize, 0usize), (0, 1), (1, 0), (1, 1)] {
                let src = &x[(ti * 2 + hi) * 4..][..4];
                let dst = &got[(hi * 2 + ti) * 4..][..4];
                for i in 0..2 {
                    let (ia, ib) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + 2)
                    };
                    let (c, s) = (cv[3 + ti][i], sv[3 + ti][i]);
                    assert!((dst[ia] - (src[ia] * c - src[ib] * s)).abs() < 1e-5);
                    assert!((dst[ib] - (src[ib] * c + src[ia] * s)).abs() < 1e-5);
                }
            }
        }
    }

    #[test]
    fn norm_placement() {
        let (b, t, h, d) = (1, 2, 3, 4);
        let x = Tensor::randn(0f32, 1.0, (b, t, h, d), &Device::Cpu).unwrap();
        let w = Tensor::new(&[1.0f32, 0.5, 2.0, 1.5], &Device::Cpu).unwrap();
        let (cos, sin) = tables(4, d / 2);
        let normed = crate::norm::rms_norm(&x.reshape((t * h, d)).unwrap(), &w, 1e-6)
            .unwrap()
            .reshape((b, t, h, d))
            .unwrap();
        let before = qk_norm_rope(
            &x,
            Some(HeadNorm {
                weight: &w,
                eps: 1e-6,
                after_rope: false,
            }),
            &cos,
            &sin,
            1,
            false,
        )
        .unwrap();
        let plain = qk_norm_rope(&normed, None, &cos, &sin, 1, false).unwrap();
        let diff = (before - plain).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let roped = qk_norm_rope(&x, None, &cos, &sin, 1, false).unwrap(); // [B, H, T, D]
        let after = qk_norm_rope(
            &x,
            Some(HeadNorm {
                weight: &w,
                eps: 1e-6,
                after_rope: true,
            }),
            &cos,
            &sin,
            1,
            false,
        )
        .unwrap();
        let want = crate::norm::rms_norm(&roped.reshape((h * t, d)).unwrap(), &w, 1e-6)
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap();
        let diff = (after - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
