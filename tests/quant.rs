//! INT8 / INT4 weight-only quantization: matmul accuracy against f32, end-to-end accuracy on
//! parity fixtures (top-1 agreement over the prompt, change in mean NLL of the fixture's own
//! greedy continuation), the saved checkpoint's bit-identical round trip, and weight memory.
//! Budgets are set from measurement (printed with --nocapture) with modest headroom; the
//! fixtures' random weights are much harsher on INT4 than trained weights.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{expected, fixture};
use moe::loader::{load_dir, LoadOptions};
use moe::quant::{QFormat, QuantTensor};

const INT8: QFormat = QFormat::Int8;
const INT4: QFormat = QFormat::Int4 { group: 128 };
const INT4_G32: QFormat = QFormat::Int4 { group: 32 };

fn nmse(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let n = b.sqr().unwrap().sum_all().unwrap();
    (d.to_scalar::<f32>().unwrap()) / n.to_scalar::<f32>().unwrap()
}

/// Symmetric int4 (absmax / 7, no zero-point), only to compare against the asymmetric format.
fn sym_int4_nmse(w: &Tensor, group: usize) -> f32 {
    let v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut err, mut tot) = (0f64, 0f64);
    for g in v.chunks(group) {
        let s = half::f16::from_f32(g.iter().fold(0f32, |m, x| m.max(x.abs())) / 7.0).to_f32();
        for &x in g {
            let q = if s > 0.0 {
                (x / s).round().clamp(-8.0, 7.0) * s
            } else {
                0.0
            };
            err += ((x - q) as f64).powi(2);
            tot += (x as f64).powi(2);
        }
    }
    (err / tot) as f32
}

#[test]
fn quantized_matmul_nmse_against_f32() {
    let dev = Device::Cpu;
    let (m, k, n) = (16, 512, 96);
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
    let want = x.matmul(&w.t().unwrap()).unwrap();
    // (format, weight round-trip NMSE budget, matmul NMSE budget)
    for (fmt, wb, mb) in [
        (INT8, 7.0e-5, 7.0e-5),
        (INT4, 1.2e-2, 1.2e-2),
        (INT4_G32, 8.0e-3, 8.0e-3),
    ] {
        let q = QuantTensor::quantize(&w, fmt, &dev).unwrap();
        let wn = nmse(&q.dequantize(DType::F32).unwrap(), &w);
        let y = q.forward(&x).unwrap();
        let mn = nmse(&y, &want);
        // The dequantized weight through candle's matmul gives the same result (the reference
        // dequantizes exactly this way).
        let yd = x
            .matmul(&q.dequantize(DType::F32).unwrap().t().unwrap())
            .unwrap();
        let same = nmse(&y, &yd);
        println!("{fmt:?}: weight NMSE {wn:.3e}, matmul NMSE {mn:.3e}, vs dequantized {same:.1e}");
        assert!(wn < wb, "{fmt:?}: weight NMSE {wn}");
        assert!(mn < mb, "{fmt:?}: matmul NMSE {mn}");
        assert!(same < 1e-10, "{fmt:?}: {same}");
        if let QFormat::Int4 { group } = fmt {
            let sym = sym_int4_nmse(&w, group);
            println!("  symmetric int4 group {group} would give weight NMSE {sym:.3e}");
            assert!(
                wn < sym,
                "asymmetric int4 must beat symmetric: {wn} vs {sym}"
            );
        }
    }
}

#[test]
fn grouped_matches_per_expert_dense() {
    let dev = Device::Cpu;
    let (e, n, k) = (4, 24, 64);
    let w = Tensor::randn(0f32, 0.1, (e, n, k), &dev).unwrap();
    let offsets = [0u32, 3, 3, 7, 9]; // expert 1 has no rows
    let x = Tensor::randn(0f32, 1.0, (9, k), &dev).unwrap();
    for fmt in [INT8, INT4_G32] {
        let q = QuantTensor::quantize(&w, fmt, &dev).unwrap();
        let y = q.forward_grouped(&x, &offsets).unwrap();
        let wd = q.dequantize(DType::F32).unwrap();
        for ex in 0..e {
            let (lo, hi) = (offsets[ex] as usize, offsets[ex + 1] as usize);
            if lo == hi {
                continue;
            }
            let want = x
                .narrow(0, lo, hi - lo)
                .unwrap()
                .matmul(&wd.get(ex).unwrap().t().unwrap())
                .unwrap();
            let got = y.narrow(0, lo, hi - lo).unwrap();
            assert!(nmse(&got, &want) < 1e-10, "{fmt:?} expert {ex}");
        }
    }
}

/// Prompt logits `[T][V]` and the NLL of each greedy token (teacher-forced) under `opts`.
fn eval(name: &str, quant: Option<QFormat>) -> (Vec<Vec<f32>>, f64, usize) {
    let dir = fixture(name);
    let exp = expected(&dir);
    let opts = LoadOptions {
        quant,
        ..Default::default()
    };
    let model = load_dir(&dir, &opts).unwrap();
    let mut ids = exp.prompt_ids.clone();
    ids.extend(&exp.greedy_ids);
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let input = Tensor::new(ids.as_slice(), model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(&input, &mut cache, true, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let t = exp.prompt_ids.len();
    // NLL of greedy token i (at position t + i) given everything before it.
    let mut nll = 0f64;
    for (i, &tok) in exp.greedy_ids.iter().enumerate() {
        let row = &logits[t - 1 + i];
        let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
        nll += lse - row[tok as usize] as f64;
    }
    (
        logits[..t].to_vec(),
        nll / exp.greedy_ids.len() as f64,
        model.weight_bytes(),
    )
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// (fixture, format, min top-1 agreement over prompt positions, max mean-NLL increase in nats)
fn end_to_end(name: &str, budgets: &[(QFormat, f64, f64)]) {
    let (base, nll0, bytes0) = eval(name, None);
    for &(fmt, min_top1, max_dnll) in budgets {
        let (q, nll, bytes) = eval(name, Some(fmt));
        let agree = base
            .iter()
            .zip(&q)
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count() as f64
            / base.len() as f64;
        println!(
            "{name} {fmt:?}: top-1 agreement {agree:.3} over {} positions, greedy NLL {nll0:.4} -> {nll:.4} ({:+.4}), weights {bytes0} -> {bytes} bytes ({:.3}x)",
            base.len(),
            nll - nll0,
            bytes as f64 / bytes0 as f64
        );
        assert!(agree >= min_top1, "{name} {fmt:?}: top-1 agreement {agree}");
        assert!(
            nll - nll0 <= max_dnll,
            "{name} {fmt:?}: NLL change {}",
            nll - nll0
        );
        assert!(bytes < bytes0, "{name} {fmt:?}: weight bytes did not drop");
        assert!(q.iter().flatten().all(|v| v.is_finite()), "{name} {fmt:?}");
    }
}

#[test]
fn end_to_end_mixtral() {
    end_to_end(
        "mixtral-base",
        // Measured: int8 12/12, NLL -0.018; int4 g128 7/12, -0.044; int4 g32 9/12, +0.010.
        &[(INT8, 0.99, 0.05), (INT4, 0.5, 0.2), (INT4_G32, 0.66, 0.1)],
    );
}

#[test]
fn end_to_end_deepseek() {
    // Measured with kv_b_proj kept dense: int8 12/12, NLL +0.109; int4 g128 9/12, +0.139.
    // (With kv_b quantized too: int8 +0.079, int4 7/12, +0.533. On 12 tokens of a random
    // fixture the int8 change is rounding noise, not a trend.)
    end_to_end("deepseek-v3", &[(INT8, 0.99, 0.15), (INT4, 0.6, 0.25)]);
}

/// `moe-run quantize` output loads without re-quantizing and gives bit-identical logits.
#[test]
fn saved_checkpoint_round_trip_is_bit_identical() {
    for (name, fmt) in [
        ("mixtral-base", INT4),
        ("dbrx", INT8),
        ("deepseek-v2-greedy", INT4_G32),
        ("qwen2-moe", INT8),
        // MXFP4's u8 exponents stored as such.
        ("mixtral-base", QFormat::Mxfp4),
        // gpt-oss's published MXFP4 experts copied as they are beside INT8 attention.
        ("gpt-oss-mxfp4", INT8),
    ] {
        let out = tempfile::tempdir().unwrap();
        moe::loader::save::quantize_checkpoint(&fixture(name), out.path(), fmt, false).unwrap();
        let (direct, _, b1) = eval_dir(&fixture(name), Some(fmt));
        let (saved, _, b2) = eval_dir(out.path(), None);
        assert_eq!(
            direct, saved,
            "{name} {fmt:?}: saved checkpoint logits differ"
        );
        assert_eq!(b1, b2);
        // Loading it as another format is refused, not silently re-quantized.
        let other = if fmt == INT8 { INT4 } else { INT8 };
        let err = load_dir(
            out.path(),
            &LoadOptions {
                quant: Some(other),
                ..Default::default()
            },
        );
        assert!(err.is_err());
    }
}

fn eval_dir(dir: &std::path::Path, quant: Option<QFormat>) -> (Vec<Vec<f32>>, (), usize) {
    let model = load_dir(
        dir,
        &LoadOptions {
            quant,
            ..Default::default()
        },
    )
    .unwrap();
    let ids = [1u32, 5, 9, 2, 7, 3];
    let mut cache = model.new_cache(1, ids.len()).unwrap();
    let input = Tensor::new(&ids[..], model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let l = model
        .forward(&input, &mut cache, true, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    (l, (), model.weight_bytes())
}

#[test]
fn other_quantization_configs_are_still_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("mixtral-base");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] =
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = load_dir(dir.path(), &LoadOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fp8"), "{err}");
}

/// Perplexity of the embedded trained model on held-out KJV text: the realistic budget.
#[test]
fn tiny_kjv_heldout_perplexity() {
    use moe::loader::embedded::TINY_KJV;
    let text = std::fs::read_to_string(fixture("tiny-kjv").join("heldout.txt")).unwrap();
    let ppl = |quant: Option<QFormat>| {
        let model = TINY_KJV
            .load(&LoadOptions {
                quant,
                ..Default::default()
            })
            .unwrap();
        let tok = moe::runtime::tokenizer::TextTokenizer::embedded(&TINY_KJV, &model.cfg).unwrap();
        let mut ids = tok.encode(&text).unwrap();
        ids.truncate(model.cfg.max_position_embeddings);
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let input = Tensor::new(ids.as_slice(), model.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<Vec<f32>> = model
            .forward(&input, &mut cache, true, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut nll = 0f64;
        for (row, &next) in logits.iter().zip(&ids[1..]) {
            let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            nll += lse - row[next as usize] as f64;
        }
        (
            (nll / (ids.len() - 1) as f64).exp(),
            ids.len(),
            model.weight_bytes(),
        )
    };
    let (p0, n, b0) = ppl(None);
    // The f32 baseline first: transformers' own held-out NLL of the same tokens.
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-kjv").join("expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Some(n as u64),
        exp["heldout_tokens"].as_u64(),
        "held-out tokens"
    );
    let want = exp["heldout_nll"].as_f64().unwrap();
    assert!(
        (p0.ln() - want).abs() < 1e-4,
        "f32 held-out NLL {} vs transformers {want}",
        p0.ln()
    );
    // Measured: int8 +0.04%, int4 g128 +0.94%, int4 g32 +0.27% (perplexity 23.53 over 483
    // tokens). Bounded on both sides: quantization noise does not make a trained model better
    // by more than noise either (a drop would mean the comparison itself broke).
    for (fmt, budget) in [(INT8, 1.005), (INT4, 1.02), (INT4_G32, 1.01)] {
        let (p, _, b) = ppl(Some(fmt));
        println!(
            "tiny-kjv {fmt:?}: perplexity {p0:.4} -> {p:.4} ({:+.2}%) over {n} tokens, weights {b0} -> {b} bytes",
            100.0 * (p / p0 - 1.0)
        );
        assert!(p / p0 <= budget, "{fmt:?}: perplexity ratio {}", p / p0);
        assert!(p / p0 >= 0.998, "{fmt:?}: perplexity ratio {}", p / p0);
        assert!(
            2 * b < b0,
            "{fmt:?}: weights {b0} -> {b} bytes (measured: int8 0.35x)"
        );
    }
}

#[test]
fn weight_memory_matches_analyze() {
    // The bytes the engine holds for a quantized bf16 model equal the analytic prediction of
    // `moe-run analyze` for that format within 2% (issue: quantization "done when"). DeepSeek
    // (MLA) too: its kv_b_proj is held once, dense, as analyze's storage rule says.
    use moe::analysis::bytes::{weight_bytes, Precision};
    use moe::analysis::counts::tensor_inventory;
    use moe::loader::embedded::TINY_KJV;
    let formats = [
        (None, Precision::Bf16),
        (Some(QFormat::Int8), Precision::Int8),
        (Some(QFormat::Int4 { group: 128 }), Precision::INT4),
        // Smaller groups are costed at their own size (they were costed at 128).
        (
            Some(QFormat::Int4 { group: 32 }),
            Precision::Int4 { group: 32 },
        ),
    ];
    for (fmt, p) in formats {
        assert_eq!(Precision::of(DType::BF16, fmt), p, "the one precision rule");
        let opts = LoadOptions {
            dtype: DType::BF16,
            quant: fmt,
            ..Default::default()
        };
        let models = [
            ("tiny-kjv", TINY_KJV.load(&opts).unwrap()),
            (
                "deepseek-v3",
                load_dir(&fixture("deepseek-v3"), &opts).unwrap(),
            ),
            (
                "deepseek-v2-greedy",
                load_dir(&fixture("deepseek-v2-greedy"), &opts).unwrap(),
            ),
        ];
        for (name, model) in models {
            let measured = model.weight_bytes() as f64;
            let predicted = weight_bytes(&tensor_inventory(&model.cfg), p) as f64;
            let err = (measured / predicted - 1.0).abs();
            println!("{name} {p:?}: engine {measured} bytes, analyze {predicted}");
            assert!(
                err < 0.02,
                "{name} {p:?}: engine {measured} bytes vs analyze {predicted} ({:.2}%)",
                err * 100.0
            );
        }
    }
}

/// `--quant int8|int4` on every supported family (every parity fixture): weights shrink, and the
/// greedy continuation's NLL and the prompt's top-1 stay within budgets set from measurement
/// (printed with --nocapture). The fixtures are random weights, much harsher on INT4 than
/// trained ones (tiny-kjv's held-out perplexity is the trained-model budget).
#[test]
fn every_family_quantizes() {
    // Measured over the 16 fixtures (12 prompt positions each): INT8 top-1 >= 0.75 (one
    // near-tie family), NLL <= +0.109; INT4 g128 top-1 >= 0.583, NLL <= +0.735.
    for name in common::FIXTURES {
        // glm4-moe (added later) measured INT4 g128 top-1 0.333 with NLL +0.292 (g64 0.417,
        // g32 0.667, INT8 1.000): its 12 prompt positions have near-ties that 4 bits over whole
        // 64-wide rows flip; its NLL stays inside the common budget.
        let int4_top1 = if *name == "glm4-moe" { 0.33 } else { 0.5 };
        // gpt-oss (added later) measured INT8 top-1 1.000 with NLL +0.289: one greedy position
        // (14) flips a near-tie expert choice under INT8 (logits move 7.0 there, by 0.07-0.17
        // before it; the kernel and candle paths agree to 1e-5), and its strong sinks carry
        // the change to later positions.
        let int8_nll = if name.starts_with("gpt-oss") {
            0.35
        } else {
            0.15
        };
        end_to_end(name, &[(INT8, 0.74, int8_nll), (INT4, int4_top1, 0.9)]);
    }
}
