//! Self-test cases: Decode attention: `out [B, H, 1, D]`; cache rows outside the visible range are NaN.

use super::*;

pub(super) fn decode_attention_cases(
    device: &Device,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
) -> Result<()> {
    use crate::attention::{
        decode_attention, decode_attention_reference, window_start, DECODE_ATTN_NMSE_BF16,
        DECODE_ATTN_NMSE_F16, DECODE_ATTN_NMSE_F32,
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
        let cap = len + 5;
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
                Ok(Row {
                    op: "decode_attention",
                    case: case.clone(),
                    dtype,
                    nmse: nmse(&f32s(&out)?, &want),
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
