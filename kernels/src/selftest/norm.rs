//! Self-test cases: RMSNorm and the fused add+RMSNorm: `out` and `h`.

use super::*;
use crate::norm::{
    add_rms_norm, rms_norm, rms_norm_reference, RMS_NORM_NMSE_BF16, RMS_NORM_NMSE_F16,
    RMS_NORM_NMSE_F32,
};

pub(super) fn norm_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    for &(t, h) in &[(1usize, 129usize), (7, 4096), (64, 1000), (513, 257)] {
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
                let case = format!("{} T={t} H={h}", if fused { "add+norm" } else { "norm" });
                let r = (|| {
                    let (want_h, want) = ref_norm_f32(dtype, &x, fused.then_some(&res[..]), &w, h)?;
                    let xt = upload(&x, &[t, h], dtype, device)?;
                    let rt = upload(&res, &[t, h], dtype, device)?;
                    let wt = upload(&w, &[h], dtype, device)?;
                    let eps = 1e-6;
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
) -> Result<NormOut> {
    fn go<T: crate::common::Elem>(x: &[f32], r: Option<&[f32]>, w: &[f32], h: usize) -> NormOut {
        let c = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let back = |v: Vec<T>| v.iter().map(|a| a.f32()).collect::<Vec<f32>>();
        let r = r.map(c);
        let (hh, out) = rms_norm_reference::<T>(&c(x), r.as_deref(), &c(w), h, 1e-6);
        (hh.map(back), back(out))
    }
    Ok(match dtype {
        DType::F32 => go::<f32>(x, r, w, h),
        DType::BF16 => go::<half::bf16>(x, r, w, h),
        _ => go::<half::f16>(x, r, w, h),
    })
}
