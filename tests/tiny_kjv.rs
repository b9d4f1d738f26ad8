//! The embedded model `tiny-kjv` (trained by tests/train_tiny_kjv.py): parity with
//! transformers on the trained weights, and the no-download default run end to end.

mod common;

use candle_core::{DType, Tensor};
use common::{expected, fixture, max_abs_diff, moe_run};
use moe::loader::embedded::TINY_KJV;
use moe::loader::LoadOptions;
use moe::model::Trace;
use moe::runtime::generate::{generate, GenerateParams, SamplingParams};

/// f32 compute on f32 weights (the default), and on the stored bf16 weights kept 16-bit
/// (`--weight-dtype bf16`, read in place by the CPU kernels): the checkpoint is bf16, so both hold
/// the same values and must both match transformers' f32 run.
#[test]
fn parity_with_transformers() {
    let bf16_weights = LoadOptions {
        weight_dtype: Some(DType::BF16),
        ..Default::default()
    };
    for (what, opts) in [
        ("f32", LoadOptions::default()),
        ("bf16 weights", bf16_weights),
    ] {
        parity_with_transformers_as(what, &opts);
    }
}

fn parity_with_transformers_as(what: &str, opts: &LoadOptions) {
    let exp = expected(&fixture("tiny-kjv"));
    let model = TINY_KJV.load(opts).unwrap();
    // The loaded bytes are analyze's for the precision (bf16 linears: well under the f32 model's).
    let want = moe::loader::predicted_weight_bytes(&model.cfg, opts);
    assert_eq!(model.weight_bytes() as u64, want, "{what}: weight bytes");
    let tok = moe::runtime::tokenizer::TextTokenizer::embedded(&TINY_KJV, &model.cfg).unwrap();
    assert_eq!(
        tok.encode("And God said").unwrap(),
        exp.prompt_ids,
        "tokenizer"
    );

    let mut cache = model.new_cache(1, exp.prompt_ids.len()).unwrap();
    let ids = Tensor::new(exp.prompt_ids.as_slice(), model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut trace = Trace::default();
    let logits: Vec<Vec<f32>> = model
        .forward(&ids, &mut cache, true, Some(&mut trace))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let diff = max_abs_diff(&logits, &exp.logits);
    assert!(diff < 1e-4, "{what}: prompt logits differ by {diff}");
    for (layer, want) in exp.router_ids.iter().enumerate() {
        let want: Vec<u32> = want.iter().flatten().copied().collect();
        assert_eq!(
            trace.router_ids[layer], want,
            "{what}: router choices of layer {layer}"
        );
    }

    let params = GenerateParams {
        max_new_tokens: exp.greedy_ids.len(),
        sampling: SamplingParams::greedy(),
        eos: vec![],
        cuda_graph: false,
    };
    let g = generate(&model, &exp.prompt_ids, &params, |_| Ok(()), None).unwrap();
    assert_eq!(
        g.generated_ids, exp.greedy_ids,
        "{what}: greedy ids (HF margins {:?})",
        exp.greedy_margins
    );
}

/// The embedded model's greedy continuation of "And God said", 24 tokens.
const GREEDY_24: [&str; 6] = [
    "--prompt",
    "And God said",
    "--max-new-tokens",
    "24",
    "--temperature",
    "0",
];

#[test]
fn default_run_needs_no_files() {
    // No --model, no --weights: the embedded model, from any working directory.
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(GREEDY_24)
        .arg("--stats")
        .current_dir(tmp.path())
        .env("HF_HUB_CACHE", tmp.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let text = String::from_utf8(out.stdout).unwrap();
    // Exactly transformers' greedy continuation (expected.json), streamed as text.
    let exp = expected(&fixture("tiny-kjv"));
    let model = TINY_KJV.load(&LoadOptions::default()).unwrap();
    let tok = moe::runtime::tokenizer::TextTokenizer::embedded(&TINY_KJV, &model.cfg).unwrap();
    let want = &exp.greedy_ids[..24];
    assert!(
        !want.iter().any(|id| tok.eos.contains(id)),
        "EOS inside the 24"
    );
    assert_eq!(
        text,
        format!("And God said{}\n", tok.decode(want).unwrap()),
        "the default run's text"
    );
    let json = moe_run(&[&GREEDY_24[..], &["--json"]].concat());
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["prompt_ids"], serde_json::json!(exp.prompt_ids));
    assert_eq!(v["generated_ids"], serde_json::json!(want));
    assert!(
        stderr.contains("imbalance") && stderr.contains("decode "),
        "{stderr}"
    );
    // The same model by name.
    let named = moe_run(&[&["--model", "tiny-kjv"][..], &GREEDY_24].concat());
    assert_eq!(String::from_utf8(named.stdout).unwrap(), text);
    // --cuda-graph off CUDA: the same text, and one line saying why the steps run eagerly.
    let graph = moe_run(&[&GREEDY_24[..], &["--cuda-graph"]].concat());
    assert_eq!(String::from_utf8(graph.stdout).unwrap(), text);
    let why = String::from_utf8_lossy(&graph.stderr);
    assert!(
        why.matches("CUDA graphs off (CUDA graphs need a CUDA device)")
            .count()
            == 1,
        "{why}"
    );
    // With --stats (routing read back every step) it says so instead.
    let stats = moe_run(&[&GREEDY_24[..], &["--cuda-graph", "--stats"]].concat());
    assert_eq!(String::from_utf8(stats.stdout).unwrap(), text);
    let why = String::from_utf8_lossy(&stats.stderr);
    assert!(why.contains("CUDA graphs off (routing statistics"), "{why}");
}

#[test]
fn analyze_counts_match_the_training_script() {
    // transformers' own count of the trained model, printed by tests/train_tiny_kjv.py and
    // recorded in engine/assets/tiny-kjv/TRAINING.md: 7,942,912 total, 3,519,232 active.
    let out = moe_run(&["analyze", "--model", "tiny-kjv", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total_params"], 7_942_912);
    assert_eq!(v["active_params"], 3_519_232);
}
