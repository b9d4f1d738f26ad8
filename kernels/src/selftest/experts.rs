//! Self-test cases: Experts: the live rows of `out` per forced path (GEMV, GEMM, and the FMA GEMM where WMMA is the default).

use super::*;
use crate::dispatch::dispatch_reference;
use crate::experts::{
    experts_reference, moe_experts_with, ExpertPath, EXPERTS_NMSE_BF16, EXPERTS_NMSE_F16,
    EXPERTS_NMSE_F32,
};

fn experts_budget(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => EXPERTS_NMSE_F32,
        DType::F16 => EXPERTS_NMSE_F16,
        _ => EXPERTS_NMSE_BF16,
    }
}

pub(super) fn experts_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (N, K, E, used, H, F, block): decode, small prefill, many experts, odd H / F, idle experts, padding.
    let cases = [
        (1, 8, 64, 64, 129, 96, 1),
        (7, 2, 8, 8, 128, 64, 1),
        (7, 2, 8, 5, 129, 37, 1),
        (64, 8, 256, 256, 64, 32, 1),
        (64, 4, 32, 12, 255, 80, 16),
        (513, 4, 16, 16, 136, 72, 1),
        (513, 2, 8, 6, 129, 65, 64),
        // Decode with rows long enough for the GEMV's batches of 16-byte loads in flight, and a remainder.
        (1, 2, 8, 8, 2072, 1104, 1),
    ];
    for &(n, k, e, pool, h, f, block) in &cases {
        let ids = rng.ids(n, k, pool);
        let d = dispatch_reference(&ids, k, e, block)?;
        let x0 = rng.vec(n * h, 1.0);
        let gu0 = rng.vec(e * 2 * f * h, 1.0 / (h as f32).sqrt());
        let dn0 = rng.vec(e * h * f, 1.0 / (f as f32).sqrt());
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            if dtype == DType::F16 && n != 7 && n != 64 {
                continue;
            }
            let (x, gu, dn) = (
                rounded(&x0, dtype)?,
                rounded(&gu0, dtype)?,
                rounded(&dn0, dtype)?,
            );
            let want = reference_experts_f32(dtype, &x, &d, &gu, &dn, n, h, f)?;
            // bf16/f16 GEMM: the tensor-core entries where the target has them, and the FMA entries as well.
            let fma = (dtype != DType::F32).then_some((ExpertPath::Gemm, false, "Gemm(fma)"));
            let paths = [
                (ExpertPath::Gemv, true, "Gemv"),
                (ExpertPath::Gemm, true, "Gemm"),
            ];
            // H = 128, F = 64 (the vector paths) twice more, with x or both weights one element into their
            // buffers: the 16-byte loads must notice and take the scalar path. ([x, weights] offsets)
            let offsets: &[[usize; 2]] = if (h, f) == (128, 64) {
                &[[0, 0], [1, 0], [0, 1]]
            } else {
                &[[0, 0]]
            };
            let runs = paths.into_iter().chain(fma);
            for ((path, tensor_cores, name), &off) in
                runs.flat_map(|p| offsets.iter().map(move |o| (p, o)))
            {
                let mis = match off {
                    [1, _] => " misaligned x",
                    [_, 1] => " misaligned weights",
                    _ => "",
                };
                let case = format!("{name} N={n} k={k} E={e} H={h} F={f} B={block}{mis}");
                let budget = experts_budget(dtype);
                let r = (|| {
                    let xt = offset_view(&upload(&x, &[n, h], dtype, device)?, off[0])?;
                    let gt = offset_view(&upload(&gu, &[e, 2 * f, h], dtype, device)?, off[1])?;
                    let dt = offset_view(&upload(&dn, &[e, h, f], dtype, device)?, off[1])?;
                    let rt = Tensor::from_slice(&d.row_token, d.row_token.len(), device)?;
                    let ct = Tensor::from_slice(&d.counts, e, device)?;
                    let ot = Tensor::from_slice(&d.offsets, e + 1, device)?;
                    let (out, time_us) = timed(device, || {
                        moe_experts_with(&xt, &rt, &ct, &ot, &gt, &dt, Some(path), tensor_cores)
                    })?;
                    let got = live_rows(&f32s(&out)?, &d.row_token, h);
                    Ok(Row {
                        op: "experts",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&got, &live_rows(&want, &d.row_token, h)),
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("experts", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

/// Rows of `[R, H]` whose row_token is not padding, concatenated.
pub(super) fn live_rows(v: &[f32], row_token: &[u32], h: usize) -> Vec<f32> {
    row_token
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != crate::PAD_ROW)
        .flat_map(|(r, _)| v[r * h..(r + 1) * h].iter().copied())
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn reference_experts_f32(
    dtype: DType,
    x: &[f32],
    d: &crate::DispatchHost,
    gu: &[f32],
    dn: &[f32],
    n: usize,
    h: usize,
    f: usize,
) -> Result<Vec<f32>> {
    fn go<T: crate::common::Elem>(
        x: &[f32],
        d: &crate::DispatchHost,
        gu: &[f32],
        dn: &[f32],
        n: usize,
        h: usize,
        f: usize,
    ) -> Result<Vec<f32>> {
        let c = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let out = experts_reference::<T>(
            &c(x),
            &d.row_token,
            &d.counts,
            &d.offsets,
            &c(gu),
            &c(dn),
            n,
            h,
            f,
        )?;
        Ok(out.iter().map(|v| v.f32()).collect())
    }
    match dtype {
        DType::F32 => go::<f32>(x, d, gu, dn, n, h, f),
        DType::BF16 => go::<half::bf16>(x, d, gu, dn, n, h, f),
        _ => go::<half::f16>(x, d, gu, dn, n, h, f),
    }
}
