//! `moe-run analyze`: parameter counts against Hugging Face transformers' (the committed output
//! of `tests/hf_param_counts.py`), the byte / KV / FLOP formulas on hand-checkable shapes, the
//! claims and naive-formula tables, the plot, and the CLI.

mod common;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use common::moe_run;
use moe::analysis::bytes::{
    attention_flops, kv_bytes_per_token, tensor_bytes, weight_bytes, Precision, Storage,
};
use moe::analysis::counts::{tensor_inventory, Component, TensorGroup, TensorKind};
use moe::analysis::{
    analyze, builtin_gpus, claims_table, expected_experts_touched, find_gpu, param_counts, storage,
};
use moe::config::registry::KNOWN_MODELS;
use moe::config::{FfnKind, ModelConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Deserialize)]
struct HfCounts {
    transformers_version: String,
    models: Vec<HfEntry>,
}

#[derive(Deserialize)]
struct HfEntry {
    config: String,
    total_params: u64,
    active_params: u64,
    input_embedding_params: u64,
    tied_word_embeddings: bool,
    moe_layers: Vec<HfMoeLayers>,
}

#[derive(Deserialize, Debug, PartialEq)]
struct HfMoeLayers {
    layers: usize,
    experts: usize,
    top_k: usize,
    per_expert_params: u64,
}

fn hf_counts() -> HfCounts {
    let text = std::fs::read_to_string(root().join("tests/fixtures/param_counts.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// (experts, top-k, per-expert params) per MoE layer, consecutive equal layers merged.
fn moe_layers(cfg: &ModelConfig) -> Vec<HfMoeLayers> {
    let mut out: Vec<HfMoeLayers> = Vec::new();
    for l in &cfg.layers {
        if let FfnKind::Moe(m) = l {
            let per = moe::spec::counts::expert_params(m, cfg.hidden_size);
            match out.last_mut() {
                Some(x)
                    if (x.experts, x.top_k, x.per_expert_params)
                        == (m.num_experts, m.top_k, per) =>
                {
                    x.layers += 1
                }
                _ => out.push(HfMoeLayers {
                    layers: 1,
                    experts: m.num_experts,
                    top_k: m.top_k,
                    per_expert_params: per,
                }),
            }
        }
    }
    out
}

#[test]
fn counts_equal_transformers_for_every_config() {
    let hf = hf_counts();
    // 5.23 wrote the first counts; 5.25 (which added the glm4-moe fixture) gives every earlier
    // entry unchanged.
    assert!(["5.23", "5.25"]
        .iter()
        .any(|v| hf.transformers_version.starts_with(v)));
    // Every listed config must be present and parse: configs/ and the fixtures are in the repository, and
    // CI runs with ../shared beside it. No skip.
    for e in &hf.models {
        let path = root().join(&e.config);
        let cfg = ModelConfig::from_file(&path)
            .unwrap_or_else(|err| panic!("{}: does not load: {err}", e.config));
        let k = param_counts(&cfg);
        let want_excl = if e.tied_word_embeddings {
            e.active_params
        } else {
            e.active_params - e.input_embedding_params
        };
        assert_eq!(
            (
                k.total,
                k.active,
                k.active_excluding_embedding,
                k.tied_embeddings
            ),
            (
                e.total_params,
                e.active_params,
                want_excl,
                e.tied_word_embeddings
            ),
            "{}: (total, active, active excl. embedding, tied) vs transformers",
            e.config
        );
        assert_eq!(moe_layers(&cfg), e.moe_layers, "{}: MoE layers", e.config);
    }
    assert!(hf.models.len() >= 25, "{} configs listed", hf.models.len());
}

/// Every config in configs/ and every fixture is in param_counts.json (rerun the script
/// after adding one).
#[test]
fn param_counts_json_covers_every_config() {
    let hf = hf_counts();
    let listed: Vec<&str> = hf.models.iter().map(|e| e.config.as_str()).collect();
    let mut want = vec![];
    for entry in std::fs::read_dir(root().join("configs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            want.push(format!(
                "configs/{}",
                p.file_name().unwrap().to_str().unwrap()
            ));
        }
    }
    for entry in std::fs::read_dir(root().join("tests/fixtures")).unwrap() {
        let p = entry.unwrap().path();
        if p.join("config.json").exists() {
            want.push(format!(
                "tests/fixtures/{}/config.json",
                p.file_name().unwrap().to_str().unwrap()
            ));
        }
    }
    for w in &want {
        assert!(
            listed.contains(&w.as_str()),
            "{w} is not in tests/fixtures/param_counts.json: run python tests/hf_param_counts.py"
        );
    }
}

#[test]
fn mixtral_8x7b_by_hand() {
    let m = KNOWN_MODELS
        .iter()
        .find(|m| m.name == "mixtral-8x7b")
        .unwrap();
    let cfg = ModelConfig::from_json_str(m.config_json, Path::new("x")).unwrap();
    let k = param_counts(&cfg);
    // V 32000, H 4096, 32 layers, 32 q / 8 kv heads x 128, 8 experts of 3 x 14336 x 4096, top-2.
    let (v, h, l, f) = (32000u64, 4096u64, 32u64, 14336u64);
    let attn = h * 4096 * 2 + h * 1024 * 2;
    let expert = 3 * f * h;
    let router = 8 * h;
    let norms = 2 * h * l + h;
    assert_eq!(
        k.total,
        2 * v * h + l * (attn + router + 8 * expert) + norms
    );
    assert_eq!(k.total, 46_702_792_704);
    assert_eq!(
        k.active,
        2 * v * h + l * (attn + router + 2 * expert) + norms
    );
    assert_eq!(k.active_excluding_embedding, k.active - v * h);
    // FLOPs: every active linear (lm_head in), no norms, no lookup.
    assert_eq!(k.matmul_active, v * h + l * (attn + router + 2 * expert));
    let by = |c: Component| {
        k.by_component
            .iter()
            .find(|x| x.component == c)
            .unwrap()
            .total
    };
    assert_eq!(by(Component::RoutedExperts), l * 8 * expert);
    assert_eq!(by(Component::SharedExperts), 0);
}

fn tiny_cfg(extra: &str) -> ModelConfig {
    let json = format!(
        r#"{{"model_type": "mixtral", "vocab_size": 100, "hidden_size": 256, "intermediate_size": 200,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 4, "num_experts_per_tok": 2{extra}}}"#
    );
    ModelConfig::from_json_str(&json, Path::new("tiny")).unwrap()
}

#[test]
fn quantized_bytes_are_exact() {
    let lin = |c: Component, out: usize, inp: usize| TensorGroup {
        name: "t",
        component: c,
        kind: TensorKind::Linear { out, inp },
        stored: 1,
        active: 1,
        f32: false,
        mxfp4: false,
    };
    let w = lin(Component::RoutedExperts, 200, 300);
    assert_eq!(storage(&w), Storage::Quantized);
    assert_eq!(tensor_bytes(&w, Precision::Fp32), 4 * 60_000);
    assert_eq!(tensor_bytes(&w, Precision::Bf16), 2 * 60_000);
    // int8: N x K bytes + N 16-bit scales.
    assert_eq!(tensor_bytes(&w, Precision::Int8), 60_000 + 2 * 200);
    // int4: N x K/2 bytes + N x ceil(300/128) = 3 groups x (scale + zero) x 2 bytes.
    assert_eq!(tensor_bytes(&w, Precision::INT4), 30_000 + 200 * 3 * 4);
    // Router and lm_head stay 16-bit; a router kept in f32 stays 4 bytes.
    let r = lin(Component::Router, 8, 300);
    assert_eq!(storage(&r), Storage::Keep16);
    assert_eq!(tensor_bytes(&r, Precision::INT4), 2 * 2400);
    let rf = TensorGroup { f32: true, ..r };
    assert_eq!(tensor_bytes(&rf, Precision::Bf16), 4 * 2400);
    assert_eq!(storage(&lin(Component::LmHead, 8, 300)), Storage::Keep16);

    // Whole model: fp32 bytes are exactly 4 x params; int4 < bf16 / 3.
    let cfg = tiny_cfg("");
    let inv = tensor_inventory(&cfg);
    let total = param_counts(&cfg).total;
    assert_eq!(weight_bytes(&inv, Precision::Fp32), 4 * total);
    assert_eq!(weight_bytes(&inv, Precision::Bf16), 2 * total);
    assert!(weight_bytes(&inv, Precision::INT4) * 3 < weight_bytes(&inv, Precision::Bf16));
}

#[test]
fn kv_and_attention_flops() {
    let cfg = tiny_cfg("");
    // GQA: 2 x layers x kv x hd x bytes = 2 x 2 x 2 x 64 x 2.
    assert_eq!(kv_bytes_per_token(&cfg, 2), 1024);
    assert_eq!(attention_flops(&cfg, 10), 4 * 2 * 4 * 64 * 10);
    // MLA from the DeepSeek-V3 fixture: layers x (kv_lora_rank + rope) x bytes.
    let ds = ModelConfig::from_file(&root().join("tests/fixtures/deepseek-v3/config.json"))
        .expect("the DeepSeek-V3 fixture parses");
    let m = ds.mla.as_ref().expect("deepseek_v3 is MLA");
    assert_eq!(
        kv_bytes_per_token(&ds, 2),
        ds.num_layers() as u64 * (m.kv_lora_rank + m.qk_rope_head_dim) as u64 * 2
    );
    // A sliding window caps the keys a decode step reads and, the cache being a ring of W
    // positions, the allocation too.
    let swa = tiny_cfg(r#", "sliding_window": 100"#);
    let r = analyze("swa", &swa, 1000, 1, &[]);
    let bf16 = &r.precisions[1];
    assert_eq!(bf16.kv_read_bytes, 100 * 1024);
    assert_eq!(bf16.kv_bytes_per_sequence, 100 * 1024);
    let r = analyze("swa", &swa, 60, 1, &[]);
    assert_eq!(r.precisions[1].kv_bytes_per_sequence, 60 * 1024);
    // Windows on some layers only (Qwen2-MoE: layers 0 and 2 of 4 slide, window 5): each layer
    // keeps its own count of positions.
    let q2 = ModelConfig::from_file(&root().join("tests/fixtures/qwen2-moe-swa/config.json"))
        .expect("the qwen2-moe-swa fixture parses");
    let per_layer = kv_bytes_per_token(&q2, 2) / 4;
    let r = analyze("q2", &q2, 100, 1, &[]);
    assert_eq!(
        r.precisions[1].kv_bytes_per_sequence,
        per_layer * (5 + 100 + 5 + 100)
    );
    assert_eq!(r.precisions[1].kv_read_bytes, per_layer * 210);
}

#[test]
fn batch_experts_and_ceilings() {
    assert!((expected_experts_touched(8, 2, 1) - 2.0).abs() < 1e-12);
    // 8 experts top-2, 2 tokens: 8 x (1 - 0.75^2) = 3.5.
    assert!((expected_experts_touched(8, 2, 2) - 3.5).abs() < 1e-12);
    assert!((expected_experts_touched(8, 2, 1000) - 8.0).abs() < 1e-9);

    let m = KNOWN_MODELS
        .iter()
        .find(|m| m.name == "mixtral-8x7b")
        .unwrap();
    let cfg = ModelConfig::from_json_str(m.config_json, Path::new("x")).unwrap();
    let gpu = find_gpu("RTX-4090").unwrap();
    let r = analyze("mixtral", &cfg, 4096, 64, &[gpu]);
    let c = &r.gpus[0].ceilings;
    // Decode ceiling = bandwidth / (active weight bytes + KV read).
    for (c, b) in c.iter().zip(&r.precisions) {
        let want = 1008e9 / b.decode_bytes_per_token as f64;
        assert!((c.decode_tokens_per_s - want).abs() < 1e-9 * want);
        // Batch 64 touches nearly all 8 experts: more bytes per step, more tokens/s.
        assert!(c.batch.experts_touched_per_moe_layer > 7.9);
        assert!(c.batch.tokens_per_s > c.decode_tokens_per_s);
    }
    // bf16 Mixtral (87 GiB) does not fit 24 GiB; the fp32 prefill uses the tf32 peak.
    assert!(!c[1].fits);
    assert!(
        (c[1].prefill_tokens_per_s.unwrap() / c[0].prefill_tokens_per_s.unwrap() - 165.2 / 82.6)
            .abs()
            < 1e-9
    );
    assert_eq!(builtin_gpus().len(), 6);
}

#[test]
fn naive_formulas_against_exact() {
    let m = KNOWN_MODELS
        .iter()
        .find(|m| m.name == "mixtral-8x7b")
        .unwrap();
    let cfg = ModelConfig::from_json_str(m.config_json, Path::new("x")).unwrap();
    let r = analyze("mixtral", &cfg, 4096, 1, &[]);
    let row = |q: &str, f: &str| {
        r.naive
            .iter()
            .find(|n| n.quantity.starts_with(q) && n.formula.starts_with(f))
            .unwrap()
            .clone()
    };
    assert!(row("weights fp32", "params").error_pct.abs() < 1e-9);
    assert!(row("weights int4", "params").error_pct < -5.0);
    // total / 8 x 2 = 11.68B against 12.88B.
    let a = row("active", "total");
    assert!((a.naive - 46_702_792_704.0 / 4.0).abs() < 1.0);
    assert_eq!(a.exact, 12_879_925_248.0);
    // MHA-style KV is 4x the GQA cache (32 heads / 8 KV heads).
    assert!((row("KV", "2 x layers").error_pct - 300.0).abs() < 1e-9);
    assert!(row("FLOPs", "2 x params").error_pct > 100.0);
}

#[test]
fn claims_table_checks_and_flags() {
    let rows = claims_table();
    let get = |m: &str| rows.iter().find(|r| r.model.starts_with(m)).unwrap();
    let mix = get("Mixtral-8x7B");
    assert_eq!(mix.computed_total_params, Some(46_702_792_704));
    assert!(!mix.flagged);
    for m in [
        "Mixtral-8x22B",
        "DBRX",
        "Qwen3-30B-A3B",
        "OLMoE",
        "Hunyuan-A13B",
        "Grok-1",
        "Llama-4 Scout",
        "Llama-4 Maverick",
    ] {
        let r = get(m);
        assert!(
            r.computed_total_params.is_some() && !r.flagged,
            "{m}: {r:?}"
        );
    }
    // gpt-oss-20b's 3.6B active leaves out the input embedding only (4.19B with it, 3.03B
    // without embedding and unembedding): flagged, explained.
    let go = get("gpt-oss-20b");
    assert_eq!(go.computed_total_params, Some(20_914_757_184));
    assert!(
        go.flagged
            && go
                .notes
                .iter()
                .any(|n| n.contains("without the input embedding")),
        "{go:?}"
    );
    // MiniMax's 45.9B is active without embedding and lm_head: flagged, explained.
    let mm = get("MiniMax");
    assert!(mm.flagged && mm.notes.iter().any(|n| n.contains("without embedding")));
    assert_eq!(get("ERNIE").basis, "not computable");
    assert!(get("Llama-4 Behemoth").notes[0].contains("114.13B"));
    assert!(get("\"a 136B").notes[0].contains("1.52 bits"));
    // DeepSeek-V3 / dots.llm1: computed from their configs, equal to transformers' counts
    // (tests/fixtures/param_counts.json).
    for (m, total) in [
        ("DeepSeek-V3", 671_026_404_352),
        ("dots.llm1", 142_774_373_888),
    ] {
        let r = get(m);
        assert_eq!(r.computed_total_params, Some(total), "{m}: {r:?}");
    }
}

#[test]
fn plot_renders_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let m = KNOWN_MODELS
        .iter()
        .find(|m| m.name == "mixtral-8x7b")
        .unwrap();
    let cfg = ModelConfig::from_json_str(m.config_json, Path::new("x")).unwrap();
    let r = analyze(
        "mixtral-8x7b",
        &cfg,
        4096,
        1,
        &[find_gpu("rtx4090").unwrap()],
    );
    let svg = dir.path().join("a.svg");
    moe::analysis::plot::plot(&r, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("routed experts") && text.contains("RTX 4090"));
    let png = dir.path().join("a.png");
    moe::analysis::plot::plot(&r, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(moe::analysis::plot::plot(&r, &dir.path().join("a.jpg")).is_err());
}

/// `moe-run analyze --model NAME --json` for every known model equals transformers' counts.
#[test]
fn cli_json_matches_transformers_for_known_models() {
    let hf = hf_counts();
    let mut checked = 0;
    for e in hf
        .models
        .iter()
        .filter(|e| e.config.starts_with("configs/"))
    {
        let text = std::fs::read_to_string(root().join(&e.config)).unwrap();
        let Some(m) = KNOWN_MODELS.iter().find(|m| m.config_json == text) else {
            println!("skip {}: not a known model name", e.config);
            continue;
        };
        let out = moe_run(&["analyze", "--model", m.name, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["total_params"].as_u64(),
            Some(e.total_params),
            "{}",
            m.name
        );
        assert_eq!(
            v["active_params"].as_u64(),
            Some(e.active_params),
            "{}",
            m.name
        );
        assert!(v["active_params_excluding_embedding"].as_u64().is_some());
        checked += 1;
    }
    assert!(checked >= 6, "{checked}");
}

#[test]
fn cli_text_claims_plot_and_errors() {
    let out = moe_run(&["analyze", "--model", "mixtral-8x7b", "--gpu", "rtx4090"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "46,702,792,704",
        "12,879,925,248",
        "Ceilings on RTX 4090",
        "Seed-article formulas",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let out = moe_run(&["analyze", "--claims"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("Published claims") && text.contains("MiniMax-Text-01"));

    let cfg = root().join("tests/fixtures/qwen2-moe/config.json");
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("q.png");
    let out = moe_run(&[
        "analyze",
        "--config",
        cfg.to_str().unwrap(),
        "--bandwidth",
        "500",
        "--memory",
        "16",
        "--plot",
        png.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(png.exists());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gpus"][0]["gpu"]["bandwidth_gb_s"].as_f64(), Some(500.0));

    let weights = root().join("tests/fixtures/olmoe");
    let out = moe_run(&["analyze", "--weights", weights.to_str().unwrap(), "--json"]);
    assert!(out.status.success());

    for bad in [
        vec!["analyze"],
        vec!["analyze", "--model", "no-such-model"],
        vec!["analyze", "--model", "dbrx", "--gpu", "tpu"],
    ] {
        let out = moe_run(&bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
    // Out-of-range numbers are usage errors, caught where clap parses them (exit 2).
    let out = moe_run(&["analyze", "--model", "dbrx", "--context", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("--context"),
        "{err}"
    );
}
