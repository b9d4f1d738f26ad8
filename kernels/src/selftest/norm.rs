//! Self-test cases: RMSNorm and the fused add+RMSNorm: `out` and `h`.

use super::*;
use crate::norm::{
    add_rms_norm, rms_norm, rms_norm_reference, RMS_NORM_NMSE_BF16, RMS_NORM_NMSE_F16,
    RMS_NORM_NMSE_F32,
};

pub(super) fn norm_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (rows, H, eps): a large eps on two shapes, where dropping or misplacing it moves every output.
    for &(t, h, eps) in &[
        (1usize, 129usize, 1e-6f32),
        (7, 4096, 1e-6),
        (64, 1000, 0.25),
        (513, 257, 1.0),
    ] {
        let x0 = rng.vec(t * h, 2.0);
        let r0 = rng.vec(t * h, 2.0);
        let w0: Vec<f32> = (0..h).map(|_| 1.0 + 0.5 * rng.f32()).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let budget = match dtype {
                DType::F32 => RMS_NORM_NMSE_F32,
                DType::F16 => RMS_NORM_NMSE_F16,
                _ => RMS_NORM_NMSE_BF16,
            };
            let (x, res, w) = (
                rounded(&x0, dtype)?,
                rounded(&r0, dtype)?,
                rounded(&w0, dtype)?,
            );
            for fused in [false, true] {
                let case = format!(
                    "{} T={t} H={h} eps={eps:e}",
                    if fused { "add+norm" } else { "norm" }
                );
                let r = (|| {
                    let (want_h, want) =
                        ref_norm_f32(dtype, &x, fused.then_some(&res[..]), &w, h, eps)?;
                    let xt = upload(&x, &[t, h], dtype, device)?;
                    let rt = upload(&res, &[t, h], dtype, device)?;
                    let wt = upload(&w, &[h], dtype, device)?;
                    let ((hh, out), time_us) = timed(device, || {
                        if fused {
                            add_rms_norm(&xt, &rt, &wt, eps).map(|(a, b)| (Some(a), b))
                        } else {
                            rms_norm(&xt, &wt, eps).map(|b| (None, b))
                        }
                    })?;
                    let mut e = nmse(&f32s(&out)?, &want);
                    if let (Some(hh), Some(want_h)) = (hh, want_h) {
                        e = e.max(nmse(&f32s(&hh)?, &want_h));
                    }
                    Ok(Row {
                        op: "rms_norm",
                        case: case.clone(),
                        dtype,
                        nmse: e,
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("rms_norm", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

type NormOut = (Option<Vec<f32>>, Vec<f32>);

fn ref_norm_f32(
    dtype: DType,
    x: &[f32],
    r: Option<&[f32]>,
    w: &[f32],
    h: usize,
    eps: f32,
) -> Result<NormOut> {
    fn go<T: crate::common::Elem>(
        x: &[f32],
        r: Option<&[f32]>,
        w: &[f32],
        h: usize,
        eps: f32,
    ) -> NormOut {
        let c = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let back = |v: Vec<T>| v.iter().map(|a| a.f32()).collect::<Vec<f32>>();
        let r = r.map(c);
        let (hh, out) = rms_norm_reference::<T>(&c(x), r.as_deref(), &c(w), h, eps);
        (hh.map(back), back(out))
    }
    Ok(match dtype {
        DType::F32 => go::<f32>(x, r, w, h, eps),
        DType::BF16 => go::<half::bf16>(x, r, w, h, eps),
        _ => go::<half::f16>(x, r, w, h, eps),
    })
}
