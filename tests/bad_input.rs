//! Bad input never panics: every case exits non-zero with a message naming the file, tensor or
//! limit, and the checkpoint on disk is left untouched.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{fixture, moe_run};
use safetensors::tensor::{Dtype, TensorView};

/// A scratch copy of the `mixtral-base` fixture.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("mixtral-base")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    (tmp, dir)
}

/// Runs `moe-run logits` on `dir` and returns stderr, asserting a clean failure.
fn fails(dir: &Path, extra: &[&str], want: &[&str]) -> String {
    let st = dir.join("model.safetensors");
    let before = std::fs::read(&st).ok();
    let mut args = vec![
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--ids",
        "1,2,3",
    ];
    args.extend_from_slice(extra);
    let out = moe_run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "stderr lacks {w:?}: {stderr}");
    }
    assert_eq!(
        std::fs::read(&st).ok(),
        before,
        "the checkpoint was modified"
    );
    stderr
}

/// Rewrites model.safetensors through the safetensors crate after `edit` changes the tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, d, s, data)| (n.clone(), TensorView::new(*d, s.clone(), data).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// Replaces the JSON header (keeping the data section) and its length prefix.
fn rewrite_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}

const Q0: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn truncated_safetensors() {
    let (_t, dir) = scratch();
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    fails(&dir, &[], &["model.safetensors", "truncated"]);
}

#[test]
fn file_shorter_than_header_length_field() {
    let (_t, dir) = scratch();
    std::fs::write(dir.join("model.safetensors"), b"abc").unwrap();
    fails(
        &dir,
        &[],
        &["model.safetensors", "shorter than the 8-byte header length"],
    );
}

#[test]
fn header_length_larger_than_file() {
    let (_t, dir) = scratch();
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&(len * 2).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    fails(
        &dir,
        &[],
        &[
            "model.safetensors",
            "header length",
            "runs past the end of the file",
        ],
    );
}

#[test]
fn header_offsets_run_past_the_file() {
    let (_t, dir) = scratch();
    rewrite_header(&dir, |h| {
        // Stretch one tensor's end offset far beyond the data section.
        let offs = &mut h[Q0]["data_offsets"];
        let end = offs[1].as_u64().unwrap();
        offs[1] = (end + 1_000_000).into();
    });
    fails(&dir, &[], &["model.safetensors", Q0]);
}

#[test]
fn garbage_header_json() {
    let (_t, dir) = scratch();
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = b'#';
    std::fs::write(&p, bytes).unwrap();
    fails(
        &dir,
        &[],
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn wrong_dtype() {
    let (_t, dir) = scratch();
    rewrite(&dir, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == Q0).unwrap();
        t.1 = Dtype::I32; // same 4 bytes per element as F32
    });
    fails(&dir, &[], &[Q0, "dtype I32", "F32, F16, BF16"]);
}

#[test]
fn wrong_shape() {
    let (_t, dir) = scratch();
    rewrite(&dir, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == Q0).unwrap();
        let (a, b) = (t.2[0], t.2[1]);
        t.2 = vec![a / 2, b * 2];
    });
    fails(
        &dir,
        &[],
        &[
            Q0,
            "has shape [32, 128], expected [64, 64]",
            "model.safetensors",
        ],
    );
}

#[test]
fn missing_tensor() {
    let (_t, dir) = scratch();
    let name = "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    rewrite(&dir, |ts| ts.retain(|t| t.0 != name));
    fails(&dir, &[], &[name, "missing", "model.safetensors"]);
}

#[test]
fn extra_tensor() {
    let (_t, dir) = scratch();
    rewrite(&dir, |ts| {
        ts.push((
            "model.layers.0.mystery.weight".into(),
            Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    fails(
        &dir,
        &[],
        &[
            "unexpected tensor",
            "model.layers.0.mystery.weight",
            "mixtral",
        ],
    );
}

#[test]
fn missing_config() {
    let (_t, dir) = scratch();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    fails(&dir, &[], &["config.json", "No such file"]);
}

#[test]
fn garbled_config() {
    let (_t, dir) = scratch();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"mixtral\", ").unwrap();
    fails(&dir, &[], &["config.json", "invalid JSON"]);
}

#[test]
fn config_missing_a_field() {
    let (_t, dir) = scratch();
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_local_experts");
    std::fs::write(&p, v.to_string()).unwrap();
    fails(&dir, &[], &["config.json", "num_local_experts"]);
}

#[test]
fn unknown_model_type() {
    let (_t, dir) = scratch();
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"mixtral\"", "\"gpt_neo_moe\"");
    std::fs::write(&p, text).unwrap();
    fails(
        &dir,
        &[],
        &["unknown model_type \"gpt_neo_moe\"", "supported: mixtral"],
    );
}

#[test]
fn missing_weights_dir() {
    let tmp = tempfile::tempdir().unwrap();
    fails(&tmp.path().join("nope"), &[], &["nope", "not found"]);
}

#[test]
fn token_id_out_of_vocab() {
    let (_t, dir) = scratch();
    let out = moe_run(&[
        "logits",
        "--weights",
        dir.to_str().unwrap(),
        "--ids",
        "1,2,999",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"));
    assert!(
        err.contains("token id 999 at position 2") && err.contains("vocab_size is 320"),
        "{err}"
    );
}

#[test]
fn prompt_longer_than_context() {
    let (_t, dir) = scratch();
    let ids = vec!["5"; 129].join(",");
    let out = moe_run(&["--weights", dir.to_str().unwrap(), "--ids", &ids, "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"));
    assert!(
        err.contains("129 tokens") && err.contains("context of 128"),
        "{err}"
    );
}

#[test]
fn empty_prompt() {
    let (_t, dir) = scratch();
    let out = moe_run(&["--weights", dir.to_str().unwrap(), "--prompt", ""]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"));
    assert!(err.contains("prompt is empty"), "{err}");
    let out = moe_run(&["logits", "--weights", dir.to_str().unwrap(), "--ids", ""]);
    assert!(!out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn unknown_model_name_and_model_not_in_cache() {
    let out = moe_run(&["--model", "no-such-model", "--prompt", "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("unknown model \"no-such-model\"")
            && err.contains("mixtral-8x7b"),
        "{err}"
    );

    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args(["--model", "mixtral-8x7b", "--prompt", "hi"])
        .env("HF_HUB_CACHE", empty.path())
        // Not in the cache, it would be downloaded: offline, it is refused (tests/hub.rs
        // downloads from a local mock Hub).
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"));
    assert!(
        err.contains("mistralai/Mixtral-8x7B-v0.1") && err.contains("HF_HUB_OFFLINE is set"),
        "{err}"
    );
    assert!(
        err.contains("models--mistralai--Mixtral-8x7B-v0.1"),
        "{err}"
    );
}

#[test]
fn prequantized_checkpoint_is_refused_clearly() {
    let (_t, dir) = scratch();
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["quantization_config"] =
        serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    std::fs::write(&p, v.to_string()).unwrap();
    fails(&dir, &[], &["config.json", "stored quantized (fp8)"]);
}
