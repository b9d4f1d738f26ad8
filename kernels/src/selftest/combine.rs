//! Self-test cases: Combine: the weighted sum of each token's expert rows.

use super::*;

/// Combine is specified to match its reference bit for bit in f32 (ordered f32 sum, no FMA), so the budget
/// only absorbs nothing but a changed rounding mode.
const COMBINE_NMSE: f64 = 1e-12;

pub(super) fn combine_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (T, A, H, padding rows): decode with top-8, prefill top-2 at a large H, odd H with padding rows (NaN,
    // never read), T = 513; every 5th token has one choice with weight 0 whose row is NaN.
    let cases = [
        (1usize, 8usize, 129usize, 0usize),
        (7, 2, 4096, 0),
        (64, 8, 255, 16),
        (513, 4, 136, 3),
    ];
    // The vector case (H = 4096) twice more, with expert_out or add one element into its buffer: the
    // 16-byte loads must notice and take the scalar path. (which input is misaligned: none, expert_out, add)
    let runs = cases
        .iter()
        .map(|&c| (c, [0, 0]))
        .chain([(cases[1], [1, 0]), (cases[1], [0, 1])]);
    for ((t, a, h, pad), off) in runs {
        let r = t * a + pad;
        let mut x0 = rng.vec(r * h, 1.0);
        // A random permutation of the live rows as slot_of.
        let mut perm: Vec<u32> = (0..(t * a) as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut w0: Vec<f32> = (0..t * a).map(|_| 0.5 * (rng.f32() + 1.0)).collect();
        for tok in (0..t).step_by(5) {
            if a > 1 {
                w0[tok * a + a - 1] = 0.0;
                let row = perm[tok * a + a - 1] as usize;
                x0[row * h..(row + 1) * h].fill(f32::NAN);
            }
        }
        for row in t * a..r {
            x0[row * h..(row + 1) * h].fill(f32::NAN);
        }
        let add0 = rng.vec(t * h, 1.0);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let plus = if t != 513 { " +add" } else { "" };
            let mis = match off {
                [1, _] => " misaligned expert_out",
                [_, 1] => " misaligned add",
                _ => "",
            };
            let case = format!("T={t} k={a} H={h} pad={pad}{plus}{mis}");
            let r2 = (|| {
                let run = |dev: &Device| -> Result<[Tensor; 3]> {
                    Ok([
                        upload(&x0, &[r, h], dtype, dev)?,
                        Tensor::from_slice(&perm, (t, a), dev)?,
                        Tensor::from_slice(&w0, (t, a), dev)?,
                    ])
                };
                let [xc, sc, wc] = run(&Device::Cpu)?;
                // With `add` (but at T = 513): the shared experts' output added before the rounding,
                // on the vector path (H = 4096) and the scalar one (odd H).
                let add = (t != 513).then(|| add0.clone());
                let a_at = |dev: &Device| {
                    add.as_ref()
                        .map(|v| upload(v, &[t, h], dtype, dev))
                        .transpose()
                };
                let ac = a_at(&Device::Cpu)?;
                // The CPU reference, with the emulator off (the expected side never runs the op under test).
                let want = crate::emu::without(|| {
                    f32s(&crate::moe_combine_add(&xc, &sc, &wc, ac.as_ref())?)
                })?;
                let [xt, st, wt] = run(device)?;
                let xt = offset_view(&xt, off[0])?;
                let at = a_at(device)?.map(|a| offset_view(&a, off[1])).transpose()?;
                let (out, time_us) = timed(device, || {
                    crate::moe_combine_add(&xt, &st, &wt, at.as_ref())
                })?;
                Ok(Row {
                    op: "combine",
                    case: case.clone(),
                    dtype,
                    nmse: nmse(&f32s(&out)?, &want),
                    budget: COMBINE_NMSE,
                    time_us,
                    note: String::new(),
                })
            })();
            rows.push(row_or_error("combine", case, dtype, COMBINE_NMSE, r2));
        }
    }
    Ok(())
}

// ---- the ops against candle's composite ops ----------------------------------------------------------
// Independent of the references: every op family computed with plain candle-core tensor ops (softmax,
// arg-sort, gather, matmul, index_select...) in f32 on the CPU, compared with the op on `device` (on the
// CPU: the reference). This is what `cargo test` checks the references with; on a GPU it is one more check.
