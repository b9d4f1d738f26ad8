//! Self-test cases: the decode GEMV's weight-streaming rate, the number issue 21's roofline target is
//! about, for the `qmma_*`, `qgemv_*` and older `qmatmul_*` entries side by side; and at 64 rows per
//! expert (a prefill), `qmma`'s tensor-core GEMM (`qmma_gemm_*`, what the host picks there) against
//! `qmma`'s GEMV and the f32 tiled GEMM (`qmatmul_gemm_*`).
//!
//! On CUDA the shapes are Mixtral-8x7B's experts (H = 4096, F = 14336, 8 experts, one token routed to
//! two of them, and 4, 8 or 64 tokens routed to the same two, bf16 activations): the gate/up projection with its SwiGLU epilogue and the down
//! projection, INT4 g128, INT8 and MXFP4 (gpt-oss's format, no `qgemv` entry). Each case is checked against the CPU reference like every other
//! and timed as the median of [`CALLS`] warm calls; its name carries the bytes the two live experts'
//! weights and params hold and the rate that median gives. A device-to-device copy of the same
//! size gives the rate to compare against (read + write bytes). On the emulator the shapes are small
//! and the rates mean nothing: the cases run there so that CI keeps the code path alive. The CPU
//! (the references, no kernels) runs the copy only.
//!
//! The weights are random codes and params (scales ~0.01, zeros 0..15, MXFP4 exponents 2^-8..2^-5), not
//! quantized floats: only the
//! bytes matter here, and the reference dequantizes whatever they hold.

use super::experts::live_rows;
use super::*;
use crate::dispatch::{dispatch_reference, DispatchHost};
use crate::experts::ExpertPath;
use crate::qformat::QParams;
use crate::qmatmul::{set_gemv_kernel, GemvKernel, QFormat, QMATMUL_NMSE_BF16};
use half::f16;

/// Timed calls per case (after one warm-up).
const CALLS: usize = 20;

/// The experts the one token routes to, of 8.
const LIVE: [u32; 2] = [3, 6];

/// Random codes and params for `rows` weight rows of `k` inputs of every expert in `live` (of `e`), zero
/// elsewhere: (qweight `[e, rows, row_bytes]`, params `[e, rows, ..]`).
fn random_experts(
    rng: &mut Rng,
    fmt: QFormat,
    e: usize,
    rows: usize,
    k: usize,
) -> (Vec<u8>, QParams) {
    let (kb, pr) = (
        fmt.row_bytes(k),
        fmt.params_shape(k).iter().product::<usize>(),
    );
    let (mut q, mut p) = (vec![0u8; e * rows * kb], vec![f16::ZERO; e * rows * pr]);
    let mut exps = vec![0u8; e * rows * pr];
    for &x in &LIVE {
        let x = x as usize;
        for chunk in q[x * rows * kb..(x + 1) * rows * kb].chunks_mut(8) {
            let r = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let live = x * rows * pr..(x + 1) * rows * pr;
        for (i, v) in p[live.clone()].iter_mut().enumerate() {
            // int4: (scale, zero) pairs; int8: one scale per row.
            let zero = matches!(fmt, QFormat::Int4 { .. }) && i % 2 == 1;
            *v = f16::from_f32(if zero {
                rng.below(16) as f32
            } else {
                0.01 + 0.005 * rng.f32()
            });
        }
        // mxfp4: an E8M0 exponent per 32 weights, scales 2^-8 .. 2^-5.
        for v in &mut exps[live] {
            *v = 119 + rng.below(4) as u8;
        }
    }
    let p = match fmt {
        QFormat::Mxfp4 => QParams::U8(exps),
        _ => QParams::F16(p),
    };
    (q, p)
}

/// The median wall time of [`CALLS`] synchronized calls of `f`, in seconds, after one warm-up (on the
/// emulator and the CPU one call: their rates mean nothing there).
fn median_s(device: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    let calls = if device.is_cuda() { CALLS } else { 1 };
    let mut t = Vec::with_capacity(calls);
    for _ in 0..calls {
        device.synchronize()?;
        let t0 = Instant::now();
        f()?;
        device.synchronize()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[calls / 2])
}

pub(super) fn qgemv_bandwidth_cases(
    device: &Device,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (h, f) = if device.is_cuda() {
        (4096, 14336)
    } else {
        (256, 320)
    };
    // The largest case's bytes: INT8 gate/up, two experts of 2F rows of H codes and one f16 scale.
    let copy_bytes = LIVE.len() * 2 * f * (QFormat::Int8.row_bytes(h) + 2);
    if crate::launch::runs_kernels(device) {
        gemv_cases(device, rng, rows, h, f)?;
    }
    // What the same bytes cost to copy on the device: the rate the GEMVs are measured against.
    let base = format!("device copy {:.1} MB", copy_bytes as f64 / 1e6);
    let res = (|| {
        let src = Tensor::from_slice(&vec![1u8; copy_bytes], copy_bytes, device)?;
        let s = median_s(device, || src.copy())?;
        let same = src.copy()?.eq(&src)?.to_dtype(DType::F32)?.mean_all()?;
        let gb = 2.0 * copy_bytes as f64 / 1e9;
        Ok(Row {
            op: "qgemv_bandwidth",
            case: format!("{base}: {:.0} GB/s (read + write)", gb / s),
            dtype: DType::U8,
            nmse: 1.0 - same.to_scalar::<f32>()? as f64,
            budget: 0.0,
            time_us: s * 1e6,
            note: String::new(),
        })
    })();
    rows.push(row_or_error("qgemv_bandwidth", base, DType::U8, 0.0, res));
    Ok(())
}

/// The GEMV cases of [`qgemv_bandwidth_cases`] at hidden size `h` and expert width `f` (the CPU runs
/// the references, so there is no kernel to time there).
fn gemv_cases(
    device: &Device,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
    h: usize,
    f: usize,
) -> Result<()> {
    let e = 8;
    // One token (batch-1 decode), and batches of 4 and 8 tokens all routed to the same two experts: 4 or 8
    // rows per expert (the qgemv entries' two-row passes; one pass of qmma's 8 columns), same weight bytes;
    // and 64 tokens (64 rows per expert, as a 256-token prefill's top-2 of 8 spreads them), GEMV vs GEMM.
    for tokens in [1usize, 4, 8, 64] {
        let ids: Vec<u32> = LIVE.repeat(tokens);
        let d = dispatch_reference(&ids, LIVE.len(), e, 1)?;
        gemv_batch_cases(device, rng, rows, h, f, tokens, &d)?;
    }
    Ok(())
}

/// [`gemv_cases`] for `tokens` tokens dispatched as `d`.
fn gemv_batch_cases(
    device: &Device,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
    h: usize,
    f: usize,
    tokens: usize,
    d: &DispatchHost,
) -> Result<()> {
    let e = 8;
    let r = d.row_token.len();
    let dev_u32 = |v: &[u32]| Tensor::from_slice(v, v.len(), device);
    let (row_token, counts, offsets) = (
        dev_u32(&d.row_token)?,
        dev_u32(&d.counts)?,
        dev_u32(&d.offsets)?,
    );
    for (fname, fmt) in [
        ("int4-g128", QFormat::Int4 { group: 128 }),
        ("int8", QFormat::Int8),
        ("mxfp4", QFormat::Mxfp4),
    ] {
        // (projection, weight rows per expert, inputs, gather, SwiGLU)
        for (proj, n_rows, k, gather) in [("gate_up", 2 * f, h, true), ("down", h, f, false)] {
            let (q, p) = random_experts(rng, fmt, e, n_rows, k);
            let param_bytes = match &p {
                QParams::F16(v) => 2 * v.len(),
                QParams::U8(v) => v.len(),
            };
            let live_bytes = LIVE.len() * n_rows * (fmt.row_bytes(k) + param_bytes / (e * n_rows));
            let x_rows = if gather { tokens } else { r };
            let x0 = rng.vec(x_rows * k, 1.0);
            let mut pdims = vec![e, n_rows];
            pdims.extend(fmt.params_shape(k));
            let on = |dev: &Device| -> Result<[Tensor; 3]> {
                Ok([
                    upload(&x0, &[x_rows, k], DType::BF16, dev)?,
                    Tensor::from_slice(&q, (e, n_rows, fmt.row_bytes(k)), dev)?,
                    p.to_tensor(&pdims, dev)?,
                ])
            };
            let call = |t: &[Tensor; 3], rt: &Tensor, c: &Tensor, o: &Tensor, path| {
                let path = Some(path);
                if gather {
                    crate::qmatmul_moe_swiglu(&t[0], Some(rt), c, o, &t[1], &t[2], fmt, path)
                } else {
                    crate::qmatmul_moe(&t[0], None, c, o, &t[1], &t[2], fmt, path)
                }
            };
            let cpu = Device::Cpu;
            let want = crate::emu::without(|| -> Result<Vec<f32>> {
                let (rt, c, o) = (
                    Tensor::from_slice(&d.row_token, r, &cpu)?,
                    Tensor::from_slice(&d.counts, e, &cpu)?,
                    Tensor::from_slice(&d.offsets, e + 1, &cpu)?,
                );
                f32s(&call(&on(&cpu)?, &rt, &c, &o, ExpertPath::Gemv)?)
            })?;
            let args = on(device)?;
            let n_out = if gather { f } else { h };
            // Decode batches: the three GEMVs. A prefill-sized batch: qmma's GEMM (what the host picks there,
            // qexperts::qmm_path) against qmma's GEMV and the f32 tiled GEMM (the GEMM under qgemv).
            let kernels: &[(&str, GemvKernel, ExpertPath)] = if tokens <= 8 {
                &[
                    ("qmma", GemvKernel::Qmma, ExpertPath::Gemv),
                    ("qgemv", GemvKernel::Qgemv, ExpertPath::Gemv),
                    ("qmatmul", GemvKernel::Qmatmul, ExpertPath::Gemv),
                ]
            } else {
                &[
                    ("qmma_gemm", GemvKernel::Qmma, ExpertPath::Gemm),
                    ("qmma", GemvKernel::Qmma, ExpertPath::Gemv),
                    ("qmatmul_gemm", GemvKernel::Qgemv, ExpertPath::Gemm),
                ]
            };
            // MXFP4 has no qgemv entries (under that choice it takes qmatmul's).
            let kernels = kernels
                .iter()
                .filter(|(entry, ..)| fmt != QFormat::Mxfp4 || *entry != "qgemv");
            for &(entry, kernel, path) in kernels {
                let base = format!("{entry} {proj} {fname} T={tokens} K={k} O={n_out}");
                let res = (|| {
                    set_gemv_kernel(kernel);
                    let (out, plans) =
                        crate::launch::record(|| call(&args, &row_token, &counts, &offsets, path));
                    let out = out?;
                    let s = median_s(device, || call(&args, &row_token, &counts, &offsets, path))?;
                    set_gemv_kernel(GemvKernel::Qmma);
                    // The entry that ran is the one the case names.
                    let ran: Vec<&str> = plans
                        .iter()
                        .flat_map(|p| p.launches.iter().map(|l| l.entry.as_str()))
                        .collect();
                    if ran.len() != 1 || !ran[0].starts_with(entry) {
                        candle_core::bail!("launched {ran:?}, not one {entry} entry");
                    }
                    let mb = live_bytes as f64 / 1e6;
                    Ok(Row {
                        op: "qgemv_bandwidth",
                        case: format!("{base}: {mb:.1} MB, {:.0} GB/s", mb / 1e3 / s),
                        dtype: DType::BF16,
                        nmse: nmse(
                            &live_rows(&f32s(&out)?, &d.row_token, n_out),
                            &live_rows(&want, &d.row_token, n_out),
                        ),
                        budget: QMATMUL_NMSE_BF16,
                        time_us: s * 1e6,
                        note: String::new(),
                    })
                })();
                set_gemv_kernel(GemvKernel::Qmma);
                rows.push(row_or_error(
                    "qgemv_bandwidth",
                    base,
                    DType::BF16,
                    QMATMUL_NMSE_BF16,
                    res,
                ));
            }
        }
    }
    Ok(())
}
