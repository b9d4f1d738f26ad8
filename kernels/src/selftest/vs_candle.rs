//! Self-test cases: The references against candle composite ops (an independent implementation), f32.

use super::experts::live_rows;
use super::qmatmul::quantize;
use super::*;
use crate::dispatch::dispatch_reference;
use crate::experts::moe_experts;
use crate::norm::add_rms_norm;
use crate::qexperts::qmatmul;
use crate::qmatmul::QFormat;
use crate::route::{moe_route, Router};

/// f32 composite vs op: only the summation order differs.
const VS_CANDLE_NMSE: f64 = 1e-10;

fn vs_candle_row(case: &str, r: Result<(f64, f64, String)>) -> Row {
    match r {
        Ok((nmse, time_us, note)) => Row {
            op: "vs_candle",
            case: case.to_string(),
            dtype: DType::F32,
            nmse,
            budget: VS_CANDLE_NMSE,
            time_us,
            note,
        },
        Err(e) => row_or_error(
            "vs_candle",
            case.to_string(),
            DType::F32,
            VS_CANDLE_NMSE,
            Err(e),
        ),
    }
}

/// softmax over the last dim with candle-core ops.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(candle_core::D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}

fn silu(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.neg()?.exp()? + 1.0)?)
}

pub(super) fn vs_candle_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let cpu = Device::Cpu;
    let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &cpu);

    // route: softmax, top-k by arg-sort, renormalised weights.
    let (n, e, k) = (64usize, 16usize, 4usize);
    let logits = rng.vec(n * e, 4.0);
    let r = (|| {
        let p = softmax_last(&t(&logits, &[n, e])?)?;
        let ids = p.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
        let w = p.gather(&ids, 1)?;
        let w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        let lt = upload(&logits, &[n, e], DType::F32, device)?;
        let router = Router::Softmax { norm_p: Some(1.0) };
        let ((gi, gw), us) = timed(device, || moe_route(&lt, router, k, None))?;
        let same = gi.to_device(&cpu)?.flatten_all()?.to_vec1::<u32>()?
            == ids.flatten_all()?.to_vec1::<u32>()?;
        Ok((
            nmse(&f32s(&gw)?, &f32s(&w)?),
            us,
            if same {
                String::new()
            } else {
                "ids differ".into()
            },
        ))
    })();
    rows.push(vs_candle_row(
        &format!("route softmax-renorm N={n} E={e} k={k}"),
        r,
    ));

    // experts: per expert index_select + matmul + silu * up + matmul, vs moe_experts (live rows).
    let (n, k, e, h, f) = (7usize, 2usize, 8usize, 129usize, 37usize);
    let ids = rng.ids(n, k, e);
    let d = dispatch_reference(&ids, k, e, 1)?;
    let (x0, gu0, dn0) = (
        rng.vec(n * h, 1.0),
        rng.vec(e * 2 * f * h, 0.1),
        rng.vec(e * h * f, 0.2),
    );
    let r = (|| {
        let (x, gu, dn) = (
            t(&x0, &[n, h])?,
            t(&gu0, &[e, 2 * f, h])?,
            t(&dn0, &[e, h, f])?,
        );
        let mut want = vec![0f32; d.row_token.len() * h];
        for ex in 0..e {
            let (lo, c) = (d.offsets[ex] as usize, d.counts[ex] as usize);
            if c == 0 {
                continue;
            }
            let rows_t = Tensor::from_slice(&d.row_token[lo..lo + c], c, &cpu)?;
            let xe = x.index_select(&rows_t, 0)?;
            let g = xe.matmul(&gu.get(ex)?.t()?)?;
            let act = (silu(&g.narrow(1, 0, f)?)? * g.narrow(1, f, f)?)?;
            let y: Vec<f32> = act.matmul(&dn.get(ex)?.t()?)?.flatten_all()?.to_vec1()?;
            want[lo * h..(lo + c) * h].copy_from_slice(&y);
        }
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (xt, gt, dt) = (
            dev(&x0, &[n, h])?,
            dev(&gu0, &[e, 2 * f, h])?,
            dev(&dn0, &[e, h, f])?,
        );
        let rt = Tensor::from_slice(&d.row_token, d.row_token.len(), device)?;
        let ct = Tensor::from_slice(&d.counts, e, device)?;
        let ot = Tensor::from_slice(&d.offsets, e + 1, device)?;
        let (out, us) = timed(device, || moe_experts(&xt, &rt, &ct, &ot, &gt, &dt, None))?;
        Ok((
            nmse(
                &live_rows(&f32s(&out)?, &d.row_token, h),
                &live_rows(&want, &d.row_token, h),
            ),
            us,
            String::new(),
        ))
    })();
    rows.push(vs_candle_row(
        &format!("experts N={n} k={k} E={e} H={h} F={f}"),
        r,
    ));

    // combine: index_select the slots' rows, weight, sum over the k choices.
    let (tk, a, h) = (64usize, 4usize, 136usize);
    let mut perm: Vec<u32> = (0..(tk * a) as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let (y0, w0) = (rng.vec(tk * a * h, 1.0), rng.vec(tk * a, 1.0));
    let r = (|| {
        let y = t(&y0, &[tk * a, h])?;
        let sel = y
            .index_select(&Tensor::from_slice(&perm, tk * a, &cpu)?, 0)?
            .reshape((tk, a, h))?;
        let want = sel.broadcast_mul(&t(&w0, &[tk, a, 1])?)?.sum(1)?;
        let yt = upload(&y0, &[tk * a, h], DType::F32, device)?;
        let st = Tensor::from_slice(&perm, (tk, a), device)?;
        let wt = Tensor::from_slice(&w0, (tk, a), device)?;
        let (out, us) = timed(device, || crate::moe_combine(&yt, &st, &wt))?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(&format!("combine T={tk} k={a} H={h}"), r));

    // add + RMSNorm.
    let (tn, h, eps) = (7usize, 1000usize, 1e-5f32);
    let (x0, r0) = (rng.vec(tn * h, 2.0), rng.vec(tn * h, 2.0));
    let w0: Vec<f32> = (0..h).map(|_| 1.0 + 0.5 * rng.f32()).collect();
    let r = (|| {
        let sum = (t(&x0, &[tn, h])? + t(&r0, &[tn, h])?)?;
        let var = sum.sqr()?.mean_keepdim(1)?;
        let want = sum
            .broadcast_div(&(var + eps as f64)?.sqrt()?)?
            .broadcast_mul(&t(&w0, &[h])?)?;
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (xt, rt, wt) = (dev(&x0, &[tn, h])?, dev(&r0, &[tn, h])?, dev(&w0, &[h])?);
        let ((hs, out), us) = timed(device, || add_rms_norm(&xt, &rt, &wt, eps))?;
        let n1 = nmse(&f32s(&out)?, &f32s(&want)?).max(nmse(&f32s(&hs)?, &f32s(&sum)?));
        Ok((n1, us, String::new()))
    })();
    rows.push(vs_candle_row(&format!("add_rms_norm T={tn} H={h}"), r));

    // qmatmul: the dequantized weight through candle's matmul.
    let (m, nn, kk) = (7usize, 65usize, 256usize);
    for (fname, fmt) in [
        ("int4-g32", QFormat::Int4 { group: 32 }),
        ("mxfp4", QFormat::Mxfp4),
    ] {
        let (q, p) = quantize(fmt, &rng.vec(nn * kk, 0.06), nn, kk);
        let x0 = rng.vec(m * kk, 1.0);
        let r = (|| {
            let kb = fmt.row_bytes(kk);
            let mut pdims = vec![nn];
            pdims.extend(fmt.params_shape(kk));
            let (qc, pc) = (
                Tensor::from_slice(&q, (nn, kb), &Device::Cpu)?,
                p.to_tensor(&pdims, &Device::Cpu)?,
            );
            let wd = crate::qformat::dequantize_tensors(fmt, &qc, &pc, kk)?;
            let want = t(&x0, &[m, kk])?.matmul(&t(&wd, &[nn, kk])?.t()?)?;
            let xt = upload(&x0, &[m, kk], DType::F32, device)?;
            let qt = Tensor::from_slice(&q, (nn, kb), device)?;
            let pt = p.to_tensor(&pdims, device)?;
            let (out, us) = timed(device, || qmatmul(&xt, &qt, &pt, fmt))?;
            Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
        })();
        rows.push(vs_candle_row(
            &format!("qmatmul {fname} M={m} N={nn} K={kk}"),
            r,
        ));
    }

    // QK-norm (per head, before RoPE) + rotate-half RoPE + the head transpose.
    let (b, tq, hh, dd, pos, eps) = (2usize, 5usize, 3usize, 64usize, 9usize, 1e-6f32);
    let half = dd / 2;
    let x0 = rng.vec(b * tq * hh * dd, 2.0);
    let w0: Vec<f32> = (0..dd).map(|_| 1.0 + 0.3 * rng.f32()).collect();
    let (c0, s0): (Vec<f32>, Vec<f32>) = (0..(pos + tq) * half)
        .map(|i| {
            let ang = (i / half) as f32 * 10000f32.powf(-((i % half) as f32) / half as f32);
            (ang.cos(), ang.sin())
        })
        .unzip();
    let r = (|| {
        let x = t(&x0, &[b, tq, hh, dd])?;
        let var = x.sqr()?.mean_keepdim(3)?;
        let xn = x
            .broadcast_div(&(var + eps as f64)?.sqrt()?)?
            .broadcast_mul(&t(&w0, &[dd])?)?;
        let xn = xn.transpose(1, 2)?.contiguous()?; // [B, H, T, D]
        let cos = t(&c0, &[pos + tq, half])?.narrow(0, pos, tq)?;
        let sin = t(&s0, &[pos + tq, half])?.narrow(0, pos, tq)?;
        let (x1, x2) = (xn.narrow(3, 0, half)?, xn.narrow(3, half, half)?);
        let want = Tensor::cat(
            &[
                (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?,
                (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?,
            ],
            3,
        )?;
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (xt, wt) = (dev(&x0, &[b, tq, hh, dd])?, dev(&w0, &[dd])?);
        let (ct, stt) = (dev(&c0, &[pos + tq, half])?, dev(&s0, &[pos + tq, half])?);
        let norm = Some(crate::HeadNorm {
            weight: &wt,
            eps,
            after_rope: false,
        });
        let (out, us) = timed(device, || {
            crate::qk_norm_rope(&xt, norm, &ct, &stt, pos, false)
        })?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(
        &format!("qk_norm_rope B={b} T={tq} H={hh} D={dd} pos={pos}"),
        r,
    ));

    // Decode attention: GQA over the first L rows of a [B, KV, CAP, D] cache, as matmul + softmax.
    let (b, h, kv, d, cap, len) = (2usize, 8usize, 2usize, 64usize, 300usize, 257usize);
    let scale = 1.0 / (d as f32).sqrt();
    let (q0, k0, v0) = (
        rng.vec(b * h * d, 1.0),
        rng.vec(b * kv * cap * d, 1.0),
        rng.vec(b * kv * cap * d, 1.0),
    );
    let r = (|| {
        let g = h / kv;
        let heads: Vec<u32> = (0..h as u32).map(|i| i / g as u32).collect();
        let heads = Tensor::from_slice(&heads, h, &cpu)?;
        let kc = t(&k0, &[b, kv, cap, d])?
            .narrow(2, 0, len)?
            .contiguous()?
            .index_select(&heads, 1)?; // [B, H, L, D]
        let vc = t(&v0, &[b, kv, cap, d])?
            .narrow(2, 0, len)?
            .contiguous()?
            .index_select(&heads, 1)?;
        let s = (t(&q0, &[b, h, 1, d])?.matmul(&kc.t()?)? * scale as f64)?;
        let want = softmax_last(&s)?.matmul(&vc)?;
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (qt, kt, vt) = (
            dev(&q0, &[b, h, 1, d])?,
            dev(&k0, &[b, kv, cap, d])?,
            dev(&v0, &[b, kv, cap, d])?,
        );
        let (out, us) = timed(device, || {
            crate::decode_attention(&qt, &kt, &vt, len, None, scale, None)
        })?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(
        &format!("decode_attention B={b} H={h} KV={kv} D={d} L={len}"),
        r,
    ));
    Ok(())
}
