//! Shared helpers for the integration tests: fixture paths, expected outputs written by
//! `tests/make_fixtures.py` (Hugging Face transformers on CPU), and running the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

/// Every parity fixture directory (tiny random checkpoints with transformers' outputs).
pub const FIXTURES: &[&str] = &[
    "mixtral-base",
    "mixtral-swa",
    "mixtral-odd",
    "mixtral-bf16",
    "mixtral-f16",
    "dbrx",
    "dbrx-pnorm2",
    "qwen3-moe",
    "qwen3-moe-nonorm",
    "qwen3-moe-swa",
    "qwen2-moe-swa",
    "dots1-swa",
    "olmoe",
    "hunyuan-moe",
    "qwen2-moe",
    "deepseek-v2-greedy",
    "deepseek-v2-group",
    "deepseek-v3",
    "dots1",
    "glm4-moe",
    "llama4-scout",
    "llama4-maverick",
    "gpt-oss",
    "gpt-oss-mxfp4",
];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[derive(Deserialize)]
pub struct Expected {
    pub prompt_ids: Vec<u32>,
    /// `[T][V]`
    pub logits: Vec<Vec<f32>>,
    pub greedy_ids: Vec<u32>,
    pub greedy_margins: Vec<f32>,
    /// `[layer][T][k]`
    pub router_ids: Vec<Vec<Vec<u32>>>,
    pub router_weights: Vec<Vec<Vec<f32>>>,
    pub dtype_on_disk: String,
}

pub fn expected(dir: &Path) -> Expected {
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row length");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

pub fn moe_run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(args)
        .output()
        .expect("spawn moe-run")
}

/// Runs moe-run with `input` on its standard input (then closed).
pub fn moe_run_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn moe-run");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    child.wait_with_output().expect("wait for moe-run")
}

pub fn ids_arg(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// 16 KJV-like prompts of different lengths (the batching and serving tests).
pub const KJV_PROMPTS: [&str; 16] = [
    "And God said",
    "In the beginning",
    "And it came to pass, when",
    "The LORD is my shepherd",
    "Blessed are the",
    "And Moses spake unto",
    "Then said Jesus unto them,",
    "For God so loved",
    "And the earth was",
    "Honour thy father",
    "And he said unto them, Go ye into all the world, and",
    "Behold,",
    "And Abraham",
    "Now the serpent was more subtil than any beast of the field",
    "I am the",
    "And there was",
];
