//! Self-test cases: Decode attention: `out [B, H, 1, D]`; cache rows outside the visible range are NaN.

use super::*;
use crate::common::{At, StepRow};

pub(super) fn decode_attention_cases(
    device: &Device,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
) -> Result<()> {
    use crate::attention::{
        decode_attention, decode_attention_keys, decode_attention_reference, window_start, Keys,
        DECODE_ATTN_NMSE_BF16, DECODE_ATTN_NMSE_F16, DECODE_ATTN_NMSE_F32,
    };
    // (B, H, KV, D, L, window, sinks): one key, a few, one chunk, a chunk boundary + 1, many chunks; GQA
    // groups of 1, 3, 5, 7 and 8; windows shorter than L (rows before the window are NaN, as are rows >=
    // L, so a kernel reading them fails); gpt-oss's per-head sink logits (N(0, 2): some above every
    // score, some below) over one key, a window and several chunks.
    let cases = [
        (1, 8, 8, 128, 1, None, false),
        (1, 8, 8, 128, 1, None, true),
        (2, 12, 4, 128, 7, None, false),
        (2, 12, 4, 128, 7, Some(3), false),
        (2, 12, 4, 64, 7, Some(3), true),
        (1, 10, 2, 64, 64, None, false),
        (1, 10, 2, 64, 64, Some(40), false),
        (2, 7, 1, 80, 513, None, false),
        (2, 7, 1, 80, 513, Some(257), false),
        (2, 8, 2, 64, 600, Some(128), true),
        (1, 32, 4, 128, 4096, None, false),
        (1, 32, 4, 128, 4096, Some(1000), false),
    ];
    for &(b, h, kv, d, len, window, with_sinks) in &cases {
        let sinks = with_sinks.then(|| rng.vec(h, 2.0));
        // Rows past L up to CAP: a step-table launch sized for the whole cache has chunks that must not run.
        let cap = len + 300;
        let start = window_start(len, window);
        let q0 = rng.vec(b * h * d, 1.0);
        let mut k0 = rng.vec(b * kv * cap * d, 1.0);
        let mut v0 = rng.vec(b * kv * cap * d, 1.0);
        for (i, (kx, vx)) in k0.iter_mut().zip(v0.iter_mut()).enumerate() {
            let j = (i / d) % cap;
            if j < start || j >= len {
                *kx = f32::NAN;
                *vx = f32::NAN;
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            if dtype == DType::F16 && len != 64 && len != 513 {
                continue;
            }
            let budget = match dtype {
                DType::F32 => DECODE_ATTN_NMSE_F32,
                DType::F16 => DECODE_ATTN_NMSE_F16,
                _ => DECODE_ATTN_NMSE_BF16,
            };
            let w = window.map_or(String::new(), |w| format!(" w={w}"));
            let s = if with_sinks { " sinks" } else { "" };
            let case = format!("B={b} H={h} KV={kv} D={d} L={len}{w}{s}");
            let (q, k, v) = (
                rounded(&q0, dtype)?,
                rounded(&k0, dtype)?,
                rounded(&v0, dtype)?,
            );
            let r = (|| {
                fn go<T: crate::common::Elem>(
                    [q, k, v]: [&[f32]; 3],
                    dims: (usize, usize, usize, usize, usize),
                    args: (usize, Option<usize>, f32),
                    sinks: Option<&[f32]>,
                ) -> Vec<f32> {
                    let c = |x: &[f32]| x.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
                    decode_attention_reference::<T>(&c(q), &c(k), &c(v), dims, args, sinks)
                        .iter()
                        .map(|x| x.f32())
                        .collect()
                }
                let dims = (b, h, kv, cap, d);
                let (qkv, args, s) = ([&q[..], &k, &v], (len, window, scale), sinks.as_deref());
                let want = match dtype {
                    DType::F32 => go::<f32>(qkv, dims, args, s),
                    DType::BF16 => go::<half::bf16>(qkv, dims, args, s),
                    _ => go::<half::f16>(qkv, dims, args, s),
                };
                let qt = upload(&q, &[b, h, 1, d], dtype, device)?;
                let kt = upload(&k, &[b, kv, cap, d], dtype, device)?;
                let vt = upload(&v, &[b, kv, cap, d], dtype, device)?;
                let st = s.map(|s| upload(s, &[h], DType::F32, device)).transpose()?;
                let (out, time_us) = timed(device, || {
                    decode_attention(&qt, &kt, &vt, len, window, scale, st.as_ref())
                })?;
                // The same keys read from row 1 of a decode step's table, the launch sized for the
                // whole cache (the chunks past the keys write neutral partials).
                let table = step_table(1, [len - 1, start, len, len - 1], device)?;
                let keys = Keys::Step {
                    row: StepRow {
                        table: &table,
                        row: 1,
                    },
                    max: cap,
                };
                let stepped = decode_attention_keys(&qt, &kt, &vt, keys, scale, st.as_ref())?;
                let stepped = nmse(&f32s(&stepped)?, &want);
                let plain = nmse(&f32s(&out)?, &want);
                Ok(Row {
                    op: "decode_attention",
                    case: case.clone(),
                    dtype,
                    nmse: plain.max(stepped),
                    budget,
                    time_us,
                    note: String::new(),
                })
            })();
            rows.push(row_or_error("decode_attention", case, dtype, budget, r));
        }
    }
    Ok(())
}

/// A u32 step table `[3, 4]` whose row `row` is `values` (the other rows hold numbers no kernel may use:
/// a kernel reading the wrong row fails its case).
pub(super) fn step_table(row: usize, values: [usize; 4], device: &Device) -> Result<Tensor> {
    let mut t = vec![u32::MAX / 2; 3 * 4];
    for (c, v) in values.iter().enumerate() {
        t[row * 4 + c] = *v as u32;
    }
    Tensor::from_vec(t, (3, 4), device)
}

/// kv_store: the whole caches after the write vs the expected caches, for a fixed slot and a slot read from a
/// step table; a slot past the cache leaves it as it was.
pub(super) fn kv_store_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    use crate::attention::kv_store;
    // (B, KV, CAP, DK, DV, slot): GQA (DK = DV), MLA's latent and rope key (one head, DK != DV), a slot past
    // the cache.
    let cases = [
        (1, 8, 16, 128, 128, 5),
        (2, 4, 7, 64, 64, 6),
        (1, 1, 9, 512, 64, 0),
        (2, 1, 4, 96, 96, 4),
    ];
    for &(b, kv, cap, dk, dv, slot) in &cases {
        let k0 = rng.vec(b * kv * dk, 1.0);
        let v0 = rng.vec(b * kv * dv, 1.0);
        let kc0 = rng.vec(b * kv * cap * dk, 1.0);
        let vc0 = rng.vec(b * kv * cap * dv, 1.0);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for from_table in [false, true] {
                let how = if from_table { " (step table)" } else { "" };
                let case = format!("B={b} KV={kv} CAP={cap} DK={dk} DV={dv} slot={slot}{how}");
                let r = (|| {
                    let (k, v) = (rounded(&k0, dtype)?, rounded(&v0, dtype)?);
                    let (kc, vc) = (rounded(&kc0, dtype)?, rounded(&vc0, dtype)?);
                    let expect = |cache: &[f32], new: &[f32], d: usize| -> Vec<f32> {
                        let mut c = cache.to_vec();
                        if slot < cap {
                            for head in 0..b * kv {
                                c[(head * cap + slot) * d..][..d]
                                    .copy_from_slice(&new[head * d..][..d]);
                            }
                        }
                        c
                    };
                    let (want_k, want_v) = (expect(&kc, &k, dk), expect(&vc, &v, dv));
                    let kt = upload(&k, &[b, kv, 1, dk], dtype, device)?;
                    let vt = upload(&v, &[b, kv, 1, dv], dtype, device)?;
                    let kct = upload(&kc, &[b, kv, cap, dk], dtype, device)?;
                    let vct = upload(&vc, &[b, kv, cap, dv], dtype, device)?;
                    let table = step_table(2, [0, 0, 0, slot], device)?;
                    let at = match from_table {
                        true => At::Step(StepRow {
                            table: &table,
                            row: 2,
                        }),
                        false => At::Host(slot),
                    };
                    let ((), time_us) = timed(device, || kv_store(&kct, &vct, &kt, &vt, at))?;
                    let mut got = f32s(&kct)?;
                    got.extend(f32s(&vct)?);
                    let mut want = want_k;
                    want.extend(want_v);
                    Ok(Row {
                        op: "kv_store",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&got, &want),
                        budget: 0.0,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("kv_store", case, dtype, 0.0, r));
            }
        }
    }
    Ok(())
}
