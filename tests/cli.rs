//! The machine interface and the text path, through the real binary.

mod common;

use common::{expected, fixture, ids_arg, max_abs_diff, moe_run};
use serde_json::Value;

/// On the CPU path and on `--device emu` (the CUDA kernels' own source, emulated: 5e-6 to 7e-6
/// from transformers on these, measured).
#[test]
fn logits_command_matches_transformers() {
    for (name, device) in [
        ("mixtral-odd", "cpu"),
        ("mixtral-swa", "cpu"),
        ("mixtral-odd", "emu"),
        ("deepseek-v3", "emu"),
    ] {
        let dir = fixture(name);
        let exp = expected(&dir);
        let out = moe_run(&[
            "logits",
            "--weights",
            dir.to_str().unwrap(),
            "--ids",
            &ids_arg(&exp.prompt_ids),
            "--device",
            device,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
        let logits: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
        assert_eq!(ids, exp.prompt_ids);
        let diff = max_abs_diff(&logits, &exp.logits);
        assert!(diff < 1e-4, "{name} on {device}: {diff}");
    }
}

#[test]
fn json_generation_is_greedy_and_exact() {
    let dir = fixture("mixtral-base");
    let exp = expected(&dir);
    let out = moe_run(&[
        "--weights",
        dir.to_str().unwrap(),
        "--ids",
        &ids_arg(&exp.prompt_ids),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    let gen: Vec<u32> = serde_json::from_value(v["generated_ids"].clone()).unwrap();
    assert_eq!(prompt, exp.prompt_ids);
    assert_eq!(gen, exp.greedy_ids);
}

#[test]
fn text_prompt_streams_and_reports() {
    let dir = fixture("mixtral-base");
    let out = moe_run(&[
        "--weights",
        dir.to_str().unwrap(),
        "--prompt",
        "In the beginning",
        "--max-new-tokens",
        "12",
        "--seed",
        "7",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("In the beginning"), "{stdout:?}");
    assert!(
        stdout.trim_end().len() > "In the beginning".len(),
        "no continuation: {stdout:?}"
    );
    for field in ["prompt ", "prefill ", "decode ", "peak RSS"] {
        assert!(
            stderr.contains(field),
            "summary line lacks {field:?}: {stderr}"
        );
    }
}

#[test]
fn sampling_is_seeded() {
    let dir = fixture("mixtral-base");
    let args = |seed: &str| {
        let out = moe_run(&[
            "--weights",
            dir.to_str().unwrap(),
            "--ids",
            "1,5,9",
            "--max-new-tokens",
            "24",
            "--temperature",
            "1.0",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
            "--json",
        ]);
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value::<Vec<u32>>(v["generated_ids"].clone()).unwrap()
    };
    assert_eq!(args("1"), args("1"), "same seed, same tokens");
    assert_ne!(
        args("1"),
        args("2"),
        "different seeds should differ over 24 sampled tokens"
    );
}

#[test]
fn stats_report_routing_and_latent_kv_size() {
    // DeepSeek-V3 fixture: 3 layers, MLA latent 32 + rope key 8, f32 -> 480 bytes per token.
    let dir = fixture("deepseek-v3");
    let out = moe_run(&[
        "--weights",
        dir.to_str().unwrap(),
        "--ids",
        "5,6,7,8",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--stats",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kv_cache_bytes_per_token"], 480);
    // 4 prompt + 3 fed-back tokens went through the 2 MoE layers (layer 0 is dense), top-4.
    assert_eq!(v["routing"]["tokens"], 7);
    let layers = v["routing"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        let counts: Vec<u64> = serde_json::from_value(l["counts"].clone()).unwrap();
        assert_eq!(counts.iter().sum::<u64>(), 7 * 4);
        assert!(l["imbalance"].as_f64().unwrap() >= 1.0);
    }
    let out = moe_run(&[
        "--weights",
        dir.to_str().unwrap(),
        "--ids",
        "5,6,7",
        "--max-new-tokens",
        "2",
        "--stats",
        "--ignore-eos",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("KV cache: 480 bytes per token")
            && stderr.contains("MLA latent 32 + rope key 8"),
        "{stderr}"
    );
    assert!(stderr.contains("imbalance"), "{stderr}");
}

/// The short flags and aliases users bring from llama.cpp give the same run as the long ones;
/// `--prompt-file -` reads stdin; `--chat` renders the template (tiny-kjv's: BOS, then one line per
/// message) and prints only the reply; the stop reason is a word.
#[test]
fn short_flags_prompt_file_and_chat() {
    let ids = |out: &std::process::Output| -> Vec<u32> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(v["generated_ids"].clone()).unwrap()
    };
    let long = moe_run(&[
        "--model",
        "tiny-kjv",
        "--prompt",
        "And God said",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.7",
        "--seed",
        "5",
        "--threads",
        "1",
        "--json",
    ]);
    let short = moe_run(&[
        "-m",
        "tiny-kjv",
        "-p",
        "And God said",
        "-n",
        "12",
        "--temp",
        "0.7",
        "-s",
        "5",
        "-t",
        "1",
        "--json",
    ]);
    assert_eq!(ids(&long), ids(&short));
    assert_eq!(ids(&long).len(), 12);

    let from_stdin = common::moe_run_stdin(
        &["--prompt-file", "-", "-n", "8", "--temp", "0", "--json"],
        b"And God said",
    );
    let plain = moe_run(&["-p", "And God said", "-n", "8", "--temp", "0", "--json"]);
    assert_eq!(ids(&from_stdin), ids(&plain));

    // --chat's prompt is the rendered template, encoded without adding a second BOS.
    let chat = moe_run(&[
        "--chat",
        "Who made the earth?",
        "--system",
        "Answer briefly.",
        "-n",
        "4",
        "--temp",
        "0",
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&chat.stdout).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    let rendered = moe_run(&[
        "-p",
        "Answer briefly.\nWho made the earth?",
        "-n",
        "1",
        "--temp",
        "0",
        "--json",
    ]);
    let r: Value = serde_json::from_slice(&rendered.stdout).unwrap();
    let want: Vec<u32> = serde_json::from_value(r["prompt_ids"].clone()).unwrap();
    assert_eq!(
        prompt, want,
        "--chat prompt vs the template rendered by hand"
    );
    // transformers 5.x: apply_chat_template([system, user], add_generation_prompt=True) on
    // engine/assets/tiny-kjv.
    let hf = [
        1, 35, 80, 763, 269, 3923, 757, 432, 16, 201, 1273, 539, 261, 614, 33,
    ];
    assert_eq!(prompt, hf, "--chat prompt vs transformers");

    // -c bounds prompt + generated tokens; the stop reason is printed as words.
    let out = moe_run(&["-p", "And God said", "-n", "50", "-c", "10", "--temp", "0"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(6 tokens, stop: max tokens)"), "{err}");
}

/// `moe-run chat`, driven as a user would: each turn re-renders the whole history (the prompt
/// grows by the previous turn and its reply), `/reset` starts over (the prompt is back to one
/// message), and the end of input exits cleanly.
#[test]
fn chat_keeps_history_and_resets() {
    let out = common::moe_run_stdin(
        &["chat", "--max-new-tokens", "6", "--temperature", "0"],
        b"And God said\nLet there be light\n/reset\nAnd God said\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let prompts: Vec<usize> = err
        .lines()
        .filter_map(|l| l.strip_prefix("(prompt "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(prompts.len(), 3, "{err}");
    assert!(prompts[1] > prompts[0] + 6, "history kept: {prompts:?}");
    assert_eq!(prompts[2], prompts[0], "after /reset: {prompts:?}");
    assert!(err.contains("(history cleared)"), "{err}");
    let text = String::from_utf8_lossy(&out.stdout);
    // Three prompts answered, then the prompt at which input ended.
    assert_eq!(text.matches("> ").count(), 5, "{text}");
    // Greedy: the same first message gets the same reply after /reset.
    let replies: Vec<&str> = text.split("> ").filter(|r| !r.trim().is_empty()).collect();
    assert_eq!(replies[0], replies[2], "{text}");
}
