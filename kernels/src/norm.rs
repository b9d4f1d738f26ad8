//! RMSNorm, optionally fused with the residual add in front of it.
//!
//! Legend: T tokens, H hidden.
//!
//! ```text
//! x, residual [T, H]  f32 | bf16 | f16 (same dtype; residual optional)
//! weight      [H]     same dtype
//! h   = residual ? T(x + residual) : x          (returned by add_rms_norm: the next residual)
//! out = T(f32(T(h / sqrt(mean(h^2) + eps))) * f32(weight))
//! ```
//! the roundings of the engine's `Norm` (`engine/src/model/norm.rs`: statistics in f32, the normalised value
//! cast to the activation dtype, then scaled by the weight in that dtype). [`rms_norm_reference`] is the
//! specification; the CUDA kernel is `cuda/rms_norm.cu` (NOT YET RUN ON A GPU).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_act, grid_dim, host, same_device, suffix, Elem};
use crate::launch::{Arg, Buf, Plan};

const OP: &str = "rms_norm";

/// Self-test budgets: the kernel's sum of squares is a tree, so f32 moves by ~1e-7 relative and bf16/f16
/// outputs by at most an ulp where the rounding flips.
pub const RMS_NORM_NMSE_F32: f64 = 1e-11;
pub const RMS_NORM_NMSE_F16: f64 = 1e-7;
pub const RMS_NORM_NMSE_BF16: f64 = 1e-5;

/// `out = rms_norm(x) * weight` over the last dimension of `x [T, H]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(norm(x, None, weight, eps)?.1)
}

/// `h = x + residual; (h, rms_norm(h) * weight)`: the fused pre-norm of a decoder layer.
pub fn add_rms_norm(
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (h, out) = norm(x, Some(residual), weight, eps)?;
    Ok((h.expect("fused norm returns h"), out))
}

fn norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
) -> Result<(Option<Tensor>, Tensor)> {
    check_act(OP, "x", x.dtype())?;
    let (t, h) = x.dims2()?;
    if weight.dims() != [h] || weight.dtype() != x.dtype() {
        bail!(
            "{OP}: weight must be [{h}] {:?}, got {:?} {:?}",
            x.dtype(),
            weight.dims(),
            weight.dtype()
        );
    }
    same_device(OP, &[("x", x), ("weight", weight)])?;
    if let Some(r) = residual {
        if r.dims() != x.dims() || r.dtype() != x.dtype() {
            bail!(
                "{OP}: residual must be {:?} {:?}, got {:?} {:?}",
                x.dims(),
                x.dtype(),
                r.dims(),
                r.dtype()
            );
        }
        same_device(OP, &[("x", x), ("residual", r)])?;
    }
    if crate::launch::runs_kernels(x.device()) {
        return run_plan(x, residual, weight, eps, t, h);
    }
    match x.device() {
        Device::Cpu => {
            fn run<T: Elem>(
                x: &Tensor,
                r: Option<&Tensor>,
                w: &Tensor,
                eps: f32,
                t: usize,
                h: usize,
            ) -> Result<(Option<Tensor>, Tensor)> {
                let r = r.map(host::<T>).transpose()?;
                let (hv, out) = rms_norm_reference::<T>(&host(x)?, r.as_deref(), &host(w)?, h, eps);
                let dev = Device::Cpu;
                Ok((
                    hv.map(|v| Tensor::from_vec(v, (t, h), &dev)).transpose()?,
                    Tensor::from_vec(out, (t, h), &dev)?,
                ))
            }
            match x.dtype() {
                DType::F32 => run::<f32>(x, residual, weight, eps, t, h),
                DType::BF16 => run::<half::bf16>(x, residual, weight, eps, t, h),
                _ => run::<half::f16>(x, residual, weight, eps, t, h),
            }
        }
        d => bail!("{OP}: unsupported device {:?}", d.location()),
    }
}

/// The specification: `x` (and `residual`) `[T*H]`, `weight [H]`; returns `(h if fused, out)`.
pub fn rms_norm_reference<T: Elem>(
    x: &[T],
    residual: Option<&[T]>,
    weight: &[T],
    h: usize,
    eps: f32,
) -> (Option<Vec<T>>, Vec<T>) {
    let hv: Option<Vec<T>> = residual.map(|r| {
        x.iter()
            .zip(r)
            .map(|(&a, &b)| T::of(a.f32() + b.f32()))
            .collect()
    });
    let src = hv.as_deref().unwrap_or(x);
    let mut out = Vec::with_capacity(src.len());
    for row in src.chunks_exact(h.max(1)) {
        let ss: f32 = row.iter().map(|v| v.f32() * v.f32()).sum();
        let denom = (ss / h as f32 + eps).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(&v, &w)| T::of(T::of(v.f32() / denom).f32() * w.f32())),
        );
    }
    (hv, out)
}

/// Threads per block of `rms_norm_<dtype>` (NORM_THREADS in rms_norm.cu).
pub const NORM_THREADS: u32 = 256;

/// The launch of `rms_norm_<dtype>` on `x [T, H]`: one block of [`NORM_THREADS`] per row. Inputs `x`,
/// `residual` (when fused), `weight`; outputs `h` (a 1-element placeholder unless fused) and `out`.
pub fn norm_plan(dtype: DType, t: usize, h: usize, fused: bool, eps: f32) -> Result<Plan> {
    let inputs: &[&'static str] = if fused {
        &["x", "residual", "weight"]
    } else {
        &["x", "weight"]
    };
    let mut p = Plan::new(OP, inputs);
    let hout = p.out("h", dtype, if fused { (t, h) } else { (1, 1) });
    let out = p.out("out", dtype, (t, h));
    let (x, r, w) = if fused {
        (
            Arg::Buf(Buf::In(0)),
            Arg::Buf(Buf::In(1)),
            Arg::Buf(Buf::In(2)),
        )
    } else {
        (Arg::Buf(Buf::In(0)), Arg::Null, Arg::Buf(Buf::In(1)))
    };
    if h > 0 {
        p.launch(
            "rms_norm",
            format!("rms_norm_{}", suffix(dtype)?),
            [grid_dim(OP, "rows", t, u32::MAX >> 1)?, 1, 1],
            [NORM_THREADS, 1, 1],
            vec![x, r, w, hout, out, Arg::U32(h as u32), Arg::F32(eps)],
        );
    }
    Ok(p)
}

fn run_plan(
    x: &Tensor,
    residual: Option<&Tensor>,
    weight: &Tensor,
    eps: f32,
    t: usize,
    h: usize,
) -> Result<(Option<Tensor>, Tensor)> {
    let plan = norm_plan(x.dtype(), t, h, residual.is_some(), eps)?;
    let mut outs = match residual {
        Some(r) => plan.run(&[x, r, weight])?,
        None => plan.run(&[x, weight])?,
    };
    let out = outs.pop();
    let hv = outs.pop();
    match (hv, out) {
        (Some(hv), Some(out)) => Ok((residual.is_some().then_some(hv), out)),
        _ => bail!("{OP}: the plan returned too few outputs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_engine_formula() {
        // Every output against an independent f64 evaluation of x / sqrt(mean(x^2) + eps) * w.
        let xs = [[1.0f32, 2.0, 3.0], [0.0, -1.0, 0.5]];
        let ws = [1.0f32, 0.5, 2.0];
        let eps = 1e-6;
        let formula = |rows: &[[f32; 3]; 2]| -> Vec<Vec<f64>> {
            rows.iter()
                .map(|r| {
                    let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 3.0;
                    let d = (ms + eps as f64).sqrt();
                    r.iter()
                        .zip(&ws)
                        .map(|(&v, &w)| v as f64 / d * w as f64)
                        .collect()
                })
                .collect()
        };
        let close = |got: &[Vec<f32>], want: &[Vec<f64>]| {
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!(
                    (*g as f64 - w).abs() < 1e-6 * w.abs().max(1.0),
                    "{g} vs {w}"
                );
            }
            assert_eq!(got.iter().flatten().count(), 6);
        };
        let x = Tensor::new(&xs, &Device::Cpu).unwrap();
        let w = Tensor::new(&ws, &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = rms_norm(&x, &w, eps).unwrap().to_vec2().unwrap();
        close(&got, &formula(&xs));
        // Fused: h = x + residual exactly, out = norm(h).
        let r = Tensor::new(&[[0.5f32, -2.0, 1.0], [4.0, 1.0, -0.5]], &Device::Cpu).unwrap();
        let (hsum, out) = add_rms_norm(&x, &r, &w, eps).unwrap();
        let hs = [[1.5f32, 0.0, 4.0], [4.0, 0.0, 0.0]];
        assert_eq!(
            hsum.to_vec2::<f32>().unwrap(),
            hs.map(|r| r.to_vec()).to_vec()
        );
        close(&out.to_vec2::<f32>().unwrap(), &formula(&hs));
    }
}
