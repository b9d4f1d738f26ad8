//! Self-test cases: QK-norm + RoPE: `out [B, H, T, D]` without norm, norm before and norm after RoPE.

use super::*;

pub(super) fn qk_norm_rope_cases(
    device: &Device,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
) -> Result<()> {
    use crate::common::{At, StepRow};
    use crate::rope::{
        qk_norm_rope, qk_norm_rope_at, HeadNorm, QK_NORM_ROPE_NMSE_BF16, QK_NORM_ROPE_NMSE_F16,
        QK_NORM_ROPE_NMSE_F32,
    };
    // (B, T, heads, D, rotated dims, pos, interleaved): decode and a small prefill, rotate-half and
    // interleaved (MLA's 64), a head dim that is not a multiple of 64 (lanes idle in the last pass) and one
    // of 256; partial rotary (GLM-4.5: half the head dims rotate, the rest pass through), both layouts.
    let cases = [
        (1, 1, 32, 128, 128, 700, false),
        (2, 7, 8, 128, 128, 5, false),
        (2, 1, 16, 64, 64, 33, true),
        (1, 7, 3, 80, 80, 0, true),
        (1, 7, 4, 256, 256, 100, false),
        (1, 1, 12, 128, 64, 300, false),
        (2, 7, 4, 96, 32, 9, true),
    ];
    for &(b, t, h, d, rd, pos, interleaved) in &cases {
        let p = pos + t + 3;
        let rh = rd / 2;
        let x0 = rng.vec(b * t * h * d, 2.0);
        let w0: Vec<f32> = (0..d).map(|_| 1.0 + 0.5 * rng.f32()).collect();
        let (mut c0, mut s0) = (Vec::new(), Vec::new());
        for q in 0..p {
            for i in 0..rh {
                let a = q as f32 / 10_000f32.powf(2.0 * i as f32 / rd as f32);
                c0.push(a.cos());
                s0.push(a.sin());
            }
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let budget = match dtype {
                DType::F32 => QK_NORM_ROPE_NMSE_F32,
                DType::F16 => QK_NORM_ROPE_NMSE_F16,
                _ => QK_NORM_ROPE_NMSE_BF16,
            };
            let (x, w, c, s) = (
                rounded(&x0, dtype)?,
                rounded(&w0, dtype)?,
                rounded(&c0, dtype)?,
                rounded(&s0, dtype)?,
            );
            for mode in 0..3u8 {
                let partial = match rd < d {
                    true => format!(" rotary={rd}"),
                    false => String::new(),
                };
                let case = format!(
                    "{}{} B={b} T={t} H={h} D={d}{partial} pos={pos}",
                    ["rope", "norm+rope", "rope+norm"][mode as usize],
                    if interleaved { "(i)" } else { "" }
                );
                let r = (|| {
                    let nr = (mode > 0).then_some((&w[..], 1e-6f32, mode == 2));
                    let want = ref_qk_norm_rope_f32(
                        dtype,
                        &x,
                        nr,
                        &c,
                        &s,
                        (b, t, h, d, rh),
                        pos,
                        interleaved,
                    );
                    let xt = upload(&x, &[b, t, h, d], dtype, device)?;
                    let wt = upload(&w, &[d], dtype, device)?;
                    let ct = upload(&c, &[p, rh], dtype, device)?;
                    let st = upload(&s, &[p, rh], dtype, device)?;
                    let norm = (mode > 0).then_some(HeadNorm {
                        weight: &wt,
                        eps: 1e-6,
                        after_rope: mode == 2,
                    });
                    let (out, time_us) = timed(device, || {
                        qk_norm_rope(&xt, norm, &ct, &st, pos, interleaved)
                    })?;
                    // The position read from row 0 of a decode step's table.
                    let table = super::attention::step_table(0, [pos, 0, 0, 0], device)?;
                    let at = At::Step(StepRow {
                        table: &table,
                        row: 0,
                    });
                    let stepped = qk_norm_rope_at(&xt, norm, &ct, &st, at, interleaved)?;
                    let stepped = nmse(&f32s(&stepped)?, &want);
                    Ok(Row {
                        op: "qk_norm_rope",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&f32s(&out)?, &want).max(stepped),
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("qk_norm_rope", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ref_qk_norm_rope_f32(
    dtype: DType,
    x: &[f32],
    norm: Option<(&[f32], f32, bool)>,
    c: &[f32],
    s: &[f32],
    dims: (usize, usize, usize, usize, usize),
    pos: usize,
    interleaved: bool,
) -> Vec<f32> {
    fn go<T: crate::common::Elem>(
        x: &[f32],
        norm: Option<(&[f32], f32, bool)>,
        c: &[f32],
        s: &[f32],
        dims: (usize, usize, usize, usize, usize),
        pos: usize,
        interleaved: bool,
    ) -> Vec<f32> {
        let cv = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let w = norm.map(|(w, _, _)| cv(w));
        let nr = norm.zip(w.as_deref()).map(|((_, e, a), w)| (w, e, a));
        crate::rope::qk_norm_rope_reference::<T>(&cv(x), nr, &cv(c), &cv(s), dims, pos, interleaved)
            .iter()
            .map(|v| v.f32())
            .collect()
    }
    match dtype {
        DType::F32 => go::<f32>(x, norm, c, s, dims, pos, interleaved),
        DType::BF16 => go::<half::bf16>(x, norm, c, s, dims, pos, interleaved),
        _ => go::<half::f16>(x, norm, c, s, dims, pos, interleaved),
    }
}
