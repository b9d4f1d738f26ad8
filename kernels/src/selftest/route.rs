//! Self-test cases: Route: ids exactly, weights by nmse, every router kind at N = 1, 7, 64, 513.

use super::*;
use crate::route::{moe_route, route_reference, Router, ROUTE_NMSE};

pub(super) fn route_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let routers: [(&str, usize, usize, Router); 5] = [
        ("softmax", 8, 2, Router::Softmax { norm_p: None }),
        (
            "softmax-renorm",
            64,
            8,
            Router::Softmax { norm_p: Some(1.0) },
        ),
        ("softmax-p2", 16, 4, Router::Softmax { norm_p: Some(2.0) }),
        (
            "v2-group",
            160,
            6,
            Router::SoftmaxGroupLimited {
                n_group: 8,
                topk_group: 3,
                scaling: 16.0,
            },
        ),
        (
            "v3-sigmoid",
            256,
            8,
            Router::SigmoidBiasGrouped {
                n_group: 8,
                topk_group: 4,
                renormalize: true,
                scaling: 2.5,
            },
        ),
    ];
    for &n in &[1usize, 7, 64, 513] {
        for &(name, e, k, router) in &routers {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dtype == DType::F16 && n != 7 {
                    continue;
                }
                let case = format!("{name} N={n} E={e} k={k}");
                let logits = rounded(&rng.vec(n * e, 4.0), dtype)?;
                let bias = rng.vec(e, 0.5);
                let r = (|| {
                    let (want_ids, want_w) = route_reference(&logits, e, router, k, Some(&bias))?;
                    let lt = upload(&logits, &[n, e], dtype, device)?;
                    let bt = Tensor::from_slice(&bias, e, device)?;
                    let ((ids, w), time_us) =
                        timed(device, || moe_route(&lt, router, k, Some(&bt)))?;
                    let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                    let bad = ids.iter().zip(&want_ids).filter(|(a, b)| a != b).count();
                    Ok(Row {
                        op: "route",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&f32s(&w)?, &want_w),
                        budget: ROUTE_NMSE,
                        time_us,
                        note: if bad == 0 {
                            String::new()
                        } else {
                            format!("{bad} ids differ")
                        },
                    })
                })();
                rows.push(row_or_error("route", case, dtype, ROUTE_NMSE, r));
            }
        }
    }
    Ok(())
}
