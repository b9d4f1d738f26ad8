//! Self-test cases: Quantized matmuls: dense, grouped (expert-stacked) and on a device dispatch (qmatmul_moe), INT8 / INT4 g128 / g32 / g16 / g1024 /
//! MXFP4.

use super::experts::live_rows;
use super::*;
use crate::dispatch::dispatch_reference;
use crate::experts::ExpertPath;
use crate::qexperts::{qmatmul, qmatmul_grouped};
use crate::qmatmul::{QFormat, QMATMUL_NMSE_BF16, QMATMUL_NMSE_F16, QMATMUL_NMSE_F32};

/// Quantizes `w [rows, k]` row by row: (qweight bytes, params in the format's dtype).
pub(super) fn quantize(
    fmt: QFormat,
    w: &[f32],
    rows: usize,
    k: usize,
) -> (Vec<u8>, crate::qformat::QParams) {
    crate::qformat::quantize_rows(fmt, &w[..rows * k], k)
}

/// INT4 with a group of 16 (not a multiple of 32) takes the kernels' scalar INT4 path; it runs on the 7-row
/// shapes only, including K = 200 where the last group is partial. The other INT4 groups skip the shapes
/// whose K they do not divide.
fn skip_shape(fmt: QFormat, k: usize, seven_rows: bool) -> bool {
    match fmt {
        QFormat::Int4 { group: 16 } => !seven_rows,
        QFormat::Int4 { group } => !k.is_multiple_of(group),
        QFormat::Int8 => false,
        // K = 200 (the 7-row shape) ends in a partial group and takes the scalar path.
        QFormat::Mxfp4 => false,
    }
}

/// MXFP4's own shapes beside the shared ones, (M, N, K, offsets) as in [`qmatmul_cases`]: K = 32 (one group),
/// 64, gpt-oss's 2880 and 4096; decode and a few rows; odd N; several experts with empty ones; a grouped
/// prefill that takes the GEMM path on CUDA.
fn mxfp4_shapes() -> Vec<(usize, usize, usize, Vec<u32>)> {
    vec![
        (1, 33, 32, vec![]),
        (5, 17, 64, vec![0, 2, 2, 5]),
        (1, 45, 4096, vec![]),
        (2, 31, 2880, vec![0, 1, 1, 1, 2]),
        (80, 33, 64, vec![0, 0, 70, 80]),
    ]
}

pub(super) fn qmatmul_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let fmts = [
        ("int8", QFormat::Int8),
        ("int4-g128", QFormat::Int4 { group: 128 }),
        ("int4-g32", QFormat::Int4 { group: 32 }),
        ("int4-g16", QFormat::Int4 { group: 16 }),
        ("int4-g1024", QFormat::Int4 { group: 1024 }),
        ("mxfp4", QFormat::Mxfp4),
    ];
    // (M, N, K, experts, offsets): dense (E = 0 means qmatmul) for decode, small and larger prefill with odd
    // N; grouped with an empty expert and an expert spanning several 8-row chunks; int8 K = 200 (not a
    // multiple of 16) takes the kernel's scalar path.
    // On CUDA, M = 40, 64 and 513 (and the grouped 64-row case) take a tiled GEMM, the rest GEMV: for bf16/f16
    // INT4 (group >= 32) and INT8 (K % 16 == 0) qmma's (qexperts::qmm_path), else qmatmul_gemm's; the
    // qmatmul_moe cases below run both paths at every size.
    // M = 6, K = 6272: the qgemv entries over several shared-memory tiles and a partial one, 40 features (five
    // blocks of 8), and a fifth row with activations of 3e19 and -1e25, past what the staging scale takes: the
    // chunk's passes are rows {0, 1}, {2, 3} (fast) and {4, 5} (the exact path, for both) for int4, {0..3}
    // (fast) and {4, 5} (exact) for int8. The sixth row's 3e38 (finite in bf16, but (128 + q) x overflows
    // f32) sends the bf16 qmma blocks (int4 and int8) to their exact path (all six rows).
    // M = 40, K = 1024: qmma's GEMM (bf16/f16) over two 32-row tiles, with a 3e38 in row 33 (the second tile's
    // first 8-row block), which sends that block to the exact path.
    let shapes: [(usize, usize, usize, Vec<u32>); 10] = [
        (1, 129, 256, vec![]),
        (7, 257, 512, vec![]),
        (64, 67, 384, vec![]),
        (513, 130, 256, vec![]),
        (1, 33, 256, vec![0, 0, 1, 1]),
        (7, 129, 256, vec![0, 2, 2, 7]),
        (64, 65, 384, vec![0, 9, 9, 30, 64]),
        (7, 31, 200, vec![]),
        (6, 40, 6272, vec![]),
        (40, 40, 1024, vec![]),
    ];
    for (fname, fmt) in fmts {
        let extra = match fmt {
            QFormat::Mxfp4 => mxfp4_shapes(),
            // The largest group the qgemv entries take (one group per lane's 32 slices): a full shared-memory
            // tile and a partial one of 32 slices (K = 5120), and grouped with an empty expert.
            QFormat::Int4 { group: 1024 } => {
                vec![(3, 40, 5120, vec![]), (5, 24, 2048, vec![0, 2, 2, 5])]
            }
            // K = 96: a partial first iteration of the qmma entries and seven warps with no K at all.
            QFormat::Int4 { group: 32 } => vec![(3, 20, 96, vec![]), (4, 24, 96, vec![0, 1, 1, 4])],
            // K = 80 and 336: int8 qmma's partial iterations (lanes with no 16 weights left load nothing).
            QFormat::Int8 => vec![(3, 20, 80, vec![]), (4, 24, 336, vec![0, 1, 1, 4])],
            _ => vec![],
        };
        for (m, n, k, offsets) in shapes.iter().chain(&extra) {
            let (m, n, k) = (*m, *n, *k);
            if skip_shape(fmt, k, m == 7) {
                continue;
            }
            let e = offsets.len().saturating_sub(1).max(1);
            let grouped = !offsets.is_empty();
            let w0 = rng.vec(e * n * k, 1.0 / (k as f32).sqrt());
            let (q, p) = quantize(fmt, &w0, e * n, k);
            let mut x0 = rng.vec(m * k, 1.0);
            if (m, k) == (6, 6272) {
                (x0[4 * k + 5], x0[4 * k + 3000]) = (3e19, -1e25);
                x0[5 * k + 7] = 3e38;
            }
            if (m, k) == (40, 1024) {
                x0[33 * k + 9] = 3e38;
            }
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dtype == DType::F16 && m != 7 {
                    continue;
                }
                let case = if grouped {
                    format!("{fname} grouped E={e} M={m} N={n} K={k}")
                } else {
                    format!("{fname} M={m} N={n} K={k}")
                };
                let budget = match dtype {
                    DType::F32 => QMATMUL_NMSE_F32,
                    DType::F16 => QMATMUL_NMSE_F16,
                    _ => QMATMUL_NMSE_BF16,
                };
                let r = (|| {
                    let mut qdims = if grouped { vec![e, n] } else { vec![n] };
                    let mut pdims = qdims.clone();
                    qdims.push(fmt.row_bytes(k));
                    pdims.extend(fmt.params_shape(k));
                    let run = |dev: &Device| -> Result<(Tensor, Tensor, Tensor)> {
                        Ok((
                            upload(&x0, &[m, k], dtype, dev)?,
                            Tensor::from_slice(&q, qdims.as_slice(), dev)?,
                            p.to_tensor(&pdims, dev)?,
                        ))
                    };
                    let call = |x: &Tensor, qt: &Tensor, pt: &Tensor| {
                        if grouped {
                            qmatmul_grouped(x, qt, pt, offsets, fmt)
                        } else {
                            qmatmul(x, qt, pt, fmt)
                        }
                    };
                    let (xc, qc, pc) = run(&Device::Cpu)?;
                    // The CPU reference, with the emulator off.
                    let want = crate::emu::without(|| f32s(&call(&xc, &qc, &pc)?))?;
                    let (xt, qt, pt) = run(device)?;
                    let (out, time_us) = timed(device, || call(&xt, &qt, &pt))?;
                    // The worst row's: a row of huge activations must not hide its neighbours' error.
                    let got = f32s(&out)?;
                    let worst = got
                        .chunks(n)
                        .zip(want.chunks(n))
                        .map(|(g, w)| nmse(g, w))
                        .fold(0f64, f64::max);
                    Ok(Row {
                        op: "qmatmul",
                        case: case.clone(),
                        dtype,
                        nmse: worst,
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("qmatmul", case, dtype, budget, r));
            }
        }
    }
    misaligned_cases(device, rng, rows)
}

/// Misaligned inputs: qweight one byte, params or x one element into their buffers (one at a time, then all
/// three), so the vector loads from that pointer are not aligned. The kernels must notice (the emulator faults
/// on a misaligned vector load, as the GPU does) and take their scalar or exact paths; the results must not
/// change.
fn misaligned_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let fmts = [
        ("int8", QFormat::Int8),
        ("int4-g128", QFormat::Int4 { group: 128 }),
        ("int4-g32", QFormat::Int4 { group: 32 }),
        ("mxfp4", QFormat::Mxfp4),
    ];
    // Decode (GEMV) and a prefill (a tiled GEMM on CUDA: qmma's for int8/int4 in bf16/f16) with each input
    // misaligned alone, and the prefill with all three.
    let variants = [
        (5usize, 40usize, 512usize, [true, false, false]),
        (5, 40, 512, [false, true, false]),
        (5, 40, 512, [false, false, true]),
        (70, 24, 256, [true, false, false]),
        (70, 24, 256, [false, true, false]),
        (70, 24, 256, [false, false, true]),
        (70, 24, 256, [true, true, true]),
    ];
    for (fname, fmt) in fmts {
        for (m, n, k, off) in variants {
            let w0 = rng.vec(n * k, 1.0 / (k as f32).sqrt());
            let (q, p) = quantize(fmt, &w0, n, k);
            let x0 = rng.vec(m * k, 1.0);
            let which: Vec<&str> = ["qweight", "params", "x"]
                .into_iter()
                .zip(off)
                .filter_map(|(name, o)| o.then_some(name))
                .collect();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let case = format!("{fname} M={m} N={n} K={k} misaligned {}", which.join("+"));
                let budget = match dtype {
                    DType::F32 => QMATMUL_NMSE_F32,
                    DType::F16 => QMATMUL_NMSE_F16,
                    _ => QMATMUL_NMSE_BF16,
                };
                let r = (|| {
                    let pdims: Vec<usize> = [n].into_iter().chain(fmt.params_shape(k)).collect();
                    let run = |dev: &Device| -> Result<[Tensor; 3]> {
                        Ok([
                            upload(&x0, &[m, k], dtype, dev)?,
                            Tensor::from_slice(&q, (n, fmt.row_bytes(k)), dev)?,
                            p.to_tensor(&pdims, dev)?,
                        ])
                    };
                    let [xc, qc, pc] = run(&Device::Cpu)?;
                    let want = crate::emu::without(|| f32s(&qmatmul(&xc, &qc, &pc, fmt)?))?;
                    let [xt, qt, pt] = run(device)?;
                    let shift = |t: Tensor, o: bool| if o { offset_view(&t, 1) } else { Ok(t) };
                    let (qt, pt, xt) = (shift(qt, off[0])?, shift(pt, off[1])?, shift(xt, off[2])?);
                    let (out, time_us) = timed(device, || qmatmul(&xt, &qt, &pt, fmt))?;
                    Ok(Row {
                        op: "qmatmul",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&f32s(&out)?, &want),
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("qmatmul", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

pub(super) fn qmatmul_moe_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let fmts = [
        ("int8", QFormat::Int8),
        ("int4-g128", QFormat::Int4 { group: 128 }),
        ("int4-g32", QFormat::Int4 { group: 32 }),
        ("int4-g16", QFormat::Int4 { group: 16 }),
        ("mxfp4", QFormat::Mxfp4),
    ];
    // (tokens, top-k, E, used, N_out, K, block, gather): decode over many experts, a prefill with idle experts
    // and rows spanning several 8-row chunks, padding, the un-gathered (down projection) form, and int8 with
    // K = 200 (scalar path).
    let cases = [
        (
            1usize, 8usize, 64usize, 64usize, 96usize, 256usize, 1usize, true,
        ),
        (7, 2, 8, 5, 129, 256, 1, true),
        (64, 8, 256, 256, 40, 128, 1, true),
        (64, 2, 8, 6, 33, 384, 16, false),
        (513, 4, 16, 16, 72, 128, 1, true),
        (7, 2, 8, 8, 31, 200, 1, true),
        // An even O with K = 200 (the scalar path) for the SwiGLU epilogue.
        (5, 2, 8, 6, 48, 200, 1, true),
        // Mixtral-like decode (top-2 of 8) over several shared-memory tiles of the qgemv entries, and its
        // down projection's un-gathered form.
        (1, 2, 8, 8, 38, 6272, 1, true),
        (1, 2, 8, 8, 38, 6272, 1, false),
        // Batched decode: 5 tokens' top-2 among 3 experts (10 rows, one expert with 4 or more), so the qgemv
        // entries' multi-row passes (and an odd last row) run over several tiles.
        (5, 2, 8, 3, 38, 6272, 1, true),
        // A prefill for qmma's GEMM: ~20 rows per expert (a partial 32-row tile each), 300 outputs (three blocks
        // of 128 weight rows, or of 64 SwiGLU features, the last partial) and K = 416 (a partial 128-weight
        // stage of one 32-weight step for int4 g32, 32 weights for int8).
        (40, 2, 4, 4, 300, 416, 1, true),
    ];
    // MXFP4's own: gpt-oss-like decode (top-4 of 32 experts, K = 2880), K = 32 over a few tokens, K = 4096
    // un-gathered.
    let mxfp4_cases = [
        (
            1usize, 4usize, 32usize, 32usize, 45usize, 2880usize, 1usize, true,
        ),
        (5, 2, 8, 4, 17, 32, 1, true),
        (3, 2, 4, 4, 33, 4096, 1, false),
        // gpt-oss's gate_up shape (K = 2880, top-4 of 32) with even O for the SwiGLU epilogue.
        (2, 4, 32, 32, 64, 2880, 1, true),
    ];
    for (fname, fmt) in fmts {
        let extra: &[_] = if fmt == QFormat::Mxfp4 {
            &mxfp4_cases
        } else {
            &[]
        };
        for &(n_tok, k_top, e, pool, n, k, block, gather) in cases.iter().chain(extra) {
            if skip_shape(fmt, k, n_tok == 7) {
                continue;
            }
            let ids = rng.ids(n_tok, k_top, pool);
            let d = dispatch_reference(&ids, k_top, e, block)?;
            let r = d.row_token.len();
            let x_rows = if gather { n_tok } else { r };
            let x0 = rng.vec(x_rows * k, 1.0);
            let w0 = rng.vec(e * n * k, 1.0 / (k as f32).sqrt());
            let (q, p) = quantize(fmt, &w0, e * n, k);
            let mut pdims = vec![e, n];
            pdims.extend(fmt.params_shape(k));
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dtype == DType::F16 && n_tok != 7 {
                    continue;
                }
                for path in [ExpertPath::Gemv, ExpertPath::Gemm] {
                    let case = format!(
                        "{path:?} {fname} N={n_tok} k={k_top} E={e} O={n} K={k} B={block}{}",
                        if gather { "" } else { " rows" }
                    );
                    let budget = match dtype {
                        DType::F32 => QMATMUL_NMSE_F32,
                        DType::F16 => QMATMUL_NMSE_F16,
                        _ => QMATMUL_NMSE_BF16,
                    };
                    let r = (|| {
                        let run = |dev: &Device| -> Result<[Tensor; 6]> {
                            Ok([
                                upload(&x0, &[x_rows, k], dtype, dev)?,
                                Tensor::from_slice(&d.row_token, r, dev)?,
                                Tensor::from_slice(&d.counts, e, dev)?,
                                Tensor::from_slice(&d.offsets, e + 1, dev)?,
                                Tensor::from_slice(&q, (e, n, fmt.row_bytes(k)), dev)?,
                                p.to_tensor(&pdims, dev)?,
                            ])
                        };
                        let call = |t: &[Tensor; 6]| {
                            crate::qmatmul_moe(
                                &t[0],
                                gather.then_some(&t[1]),
                                &t[2],
                                &t[3],
                                &t[4],
                                &t[5],
                                fmt,
                                Some(path),
                            )
                        };
                        // The CPU reference, with the emulator off.
                        let want = crate::emu::without(|| f32s(&call(&run(&Device::Cpu)?)?))?;
                        let dt = run(device)?;
                        let (out, time_us) = timed(device, || call(&dt))?;
                        Ok(Row {
                            op: "qmatmul_moe",
                            case: case.clone(),
                            dtype,
                            nmse: nmse(
                                &live_rows(&f32s(&out)?, &d.row_token, n),
                                &live_rows(&want, &d.row_token, n),
                            ),
                            budget,
                            time_us,
                            note: String::new(),
                        })
                    })();
                    rows.push(row_or_error("qmatmul_moe", case, dtype, budget, r));
                    // The gate/up projection with SwiGLU (fused in the GEMV entries and qmma's GEMM, the
                    // GEMM and the activation otherwise), the O rows read as gate then up halves.
                    if n % 2 != 0 || !gather {
                        continue;
                    }
                    let case = format!(
                        "{path:?} swiglu {fname} N={n_tok} k={k_top} E={e} O={n} K={k} B={block}"
                    );
                    let r = (|| {
                        let args = [
                            upload(&x0, &[x_rows, k], dtype, device)?,
                            Tensor::from_slice(&d.row_token, d.row_token.len(), device)?,
                            Tensor::from_slice(&d.counts, e, device)?,
                            Tensor::from_slice(&d.offsets, e + 1, device)?,
                            Tensor::from_slice(&q, (e, n, fmt.row_bytes(k)), device)?,
                            p.to_tensor(&pdims, device)?,
                        ];
                        let call = |t: &[Tensor; 6]| {
                            crate::qmatmul_moe_swiglu(
                                &t[0],
                                Some(&t[1]),
                                &t[2],
                                &t[3],
                                &t[4],
                                &t[5],
                                fmt,
                                Some(path),
                            )
                        };
                        let cpu = [
                            upload(&x0, &[x_rows, k], dtype, &Device::Cpu)?,
                            Tensor::from_slice(&d.row_token, d.row_token.len(), &Device::Cpu)?,
                            Tensor::from_slice(&d.counts, e, &Device::Cpu)?,
                            Tensor::from_slice(&d.offsets, e + 1, &Device::Cpu)?,
                            Tensor::from_slice(&q, (e, n, fmt.row_bytes(k)), &Device::Cpu)?,
                            p.to_tensor(&pdims, &Device::Cpu)?,
                        ];
                        let want = crate::emu::without(|| f32s(&call(&cpu)?))?;
                        let (out, time_us) = timed(device, || call(&args))?;
                        Ok(Row {
                            op: "qmatmul_moe",
                            case: case.clone(),
                            dtype,
                            nmse: nmse(
                                &live_rows(&f32s(&out)?, &d.row_token, n / 2),
                                &live_rows(&want, &d.row_token, n / 2),
                            ),
                            budget,
                            time_us,
                            note: String::new(),
                        })
                    })();
                    rows.push(row_or_error("qmatmul_moe", case, dtype, budget, r));
                }
            }
        }
    }
    Ok(())
}
