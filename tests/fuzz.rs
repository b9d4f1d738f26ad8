//! Fuzzing of every parser that reads user files or arguments, in-process with proptest: each
//! target mutates seeds taken from the fixtures (byte flips, truncations, insertions, and
//! structural JSON edits that delete keys or put zeros, negatives, huge numbers, wrong types in
//! them) and requires that the code under test returns `Ok` or an `Err`, never panics.
//!
//! Each target runs for `MOE_FUZZ_SECS` seconds (default 3, so `cargo test` stays quick; CI runs
//! them again for 60 s each, and `MOE_FUZZ_SECS=600 cargo test --release --test fuzz` runs
//! longer). A failure prints the smallest input proptest shrank it to; keep it in
//! `regressions` below once fixed.
//!
//! Targets: the safetensors header and tensor validation (the whole loader behind it), the
//! sharded index, `config.json` of every family (and the cost model and random-weight model
//! built from what parses), moe-run's quantized-checkpoint metadata, the tokenizer files, and the
//! command line (flags, `--ids`, prompts through the tokenizer).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

use common::fixture;
use moe::config::ModelConfig;
use moe::loader::{self, Checkpoint, LoadOptions};

fn budget() -> Duration {
    let secs = std::env::var("MOE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Runs `test` on values of `strategy` until the time budget is spent, in rounds of freshly
/// seeded cases; fails (after shrinking) on the first case that panics or returns an error.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let t0 = Instant::now();
    let (mut cases, mut round) = (0u64, 0u64);
    while round == 0 || t0.elapsed() < budget() {
        let config = Config {
            cases: 32,
            max_shrink_time: 30_000,
            failure_persistence: None,
            ..Config::default()
        };
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&round.to_le_bytes());
        seed[8..16].copy_from_slice(&(name.len() as u64).to_le_bytes());
        let rng = TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &seed);
        let mut runner = TestRunner::new_with_rng(config, rng);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("fuzz target {name}: round {round}: {e}");
        }
        cases += 32;
        round += 1;
    }
    eprintln!("fuzz target {name}: {cases} cases in {:.1?}", t0.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// One edit of a byte string; positions are taken modulo the length.
#[derive(Debug, Clone)]
enum ByteEdit {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// Rewrites the 8-byte header length prefix.
    HeaderLen(u64),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteEdit::Set(p, b)),
        1 => any::<usize>().prop_map(ByteEdit::Truncate),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| ByteEdit::Insert(p, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(p, n)| ByteEdit::Remove(p, n)),
        1 => prop_oneof![Just(0u64), Just(7), Just(u64::MAX), Just(1 << 40), any::<u64>()]
            .prop_map(ByteEdit::HeaderLen),
    ]
}

/// Edits land in the header most of the time (where the parsing is), anywhere otherwise.
fn apply_bytes(mut b: Vec<u8>, edits: &[ByteEdit], header_end: usize) -> Vec<u8> {
    for e in edits {
        let n = b.len().max(1);
        let pos = |p: usize| {
            if !p.is_multiple_of(4) {
                p % header_end.clamp(1, n)
            } else {
                p % n
            }
        };
        match e {
            ByteEdit::Set(p, v) => {
                let i = pos(*p);
                if i < b.len() {
                    b[i] = *v;
                }
            }
            ByteEdit::Truncate(p) => b.truncate(p % n),
            ByteEdit::Insert(p, v) => {
                let i = pos(*p).min(b.len());
                b.splice(i..i, v.iter().copied());
            }
            ByteEdit::Remove(p, len) => {
                let i = pos(*p).min(b.len());
                let j = (i + len).min(b.len());
                b.drain(i..j);
            }
            ByteEdit::HeaderLen(v) => {
                if b.len() >= 8 {
                    b[..8].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    b
}

/// One structural edit of a JSON document: the node chosen (among all, in document order) by
/// `at` is removed, replaced, or (for containers) emptied.
#[derive(Debug, Clone)]
enum JsonEdit {
    Remove(usize),
    Replace(usize, Value),
    Empty(usize),
}

fn interesting_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::Bool(true)),
        Just(Value::from(0)),
        Just(Value::from(1)),
        Just(Value::from(-1)),
        Just(Value::from(3)),
        Just(Value::from(65536)),
        Just(Value::from(1u64 << 31)),
        Just(Value::from(1u64 << 32)),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(0.5)),
        Just(Value::from(-0.0)),
        Just(Value::from(1e308)),
        Just(Value::from(1e-308)),
        Just(Value::from("")),
        Just(Value::from("silu")),
        Just(Value::from("gelu")),
        Just(Value::from("mixtral")),
        Just(Value::from("deepseek_v3")),
        Just(Value::Array(vec![])),
        Just(serde_json::json!([0, 1, 2])),
        Just(serde_json::json!([1e9, -5])),
        Just(serde_json::json!({})),
        any::<i64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,12}".prop_map(Value::from),
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        2 => any::<usize>().prop_map(JsonEdit::Remove),
        5 => (any::<usize>(), interesting_value()).prop_map(|(a, v)| JsonEdit::Replace(a, v)),
        1 => any::<usize>().prop_map(JsonEdit::Empty),
    ]
}

/// Paths (object keys / array indices from the root) of every node but the root.
fn node_paths(v: &Value, prefix: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(PathStep::Key(k.clone()));
                out.push(prefix.clone());
                node_paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            // Long arrays (vocabularies, merges) are sampled at a few places.
            let n = a.len();
            let picks: Vec<usize> = if n <= 8 {
                (0..n).collect()
            } else {
                vec![0, 1, n / 2, n - 1]
            };
            for i in picks {
                prefix.push(PathStep::Index(i));
                out.push(prefix.clone());
                node_paths(&a[i], prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn apply_json(mut v: Value, edits: &[JsonEdit]) -> Value {
    for e in edits {
        let mut paths = Vec::new();
        node_paths(&v, &mut Vec::new(), &mut paths);
        let at = match e {
            JsonEdit::Remove(a) | JsonEdit::Replace(a, _) | JsonEdit::Empty(a) => *a,
        };
        if paths.is_empty() {
            return v;
        }
        let path = &paths[at % paths.len()];
        let (last, parents) = path.split_last().unwrap();
        let mut parent = &mut v;
        for step in parents {
            parent = match step {
                PathStep::Key(k) => &mut parent[k.as_str()],
                PathStep::Index(i) => &mut parent[*i],
            };
        }
        match (e, last) {
            (JsonEdit::Remove(_), PathStep::Key(k)) => {
                parent.as_object_mut().map(|m| m.remove(k));
            }
            (JsonEdit::Remove(_), PathStep::Index(i)) => {
                parent.as_array_mut().map(|a| a.remove(*i));
            }
            (JsonEdit::Replace(_, new), step) => {
                let slot = match step {
                    PathStep::Key(k) => &mut parent[k.as_str()],
                    PathStep::Index(i) => &mut parent[*i],
                };
                *slot = new.clone();
            }
            (JsonEdit::Empty(_), step) => {
                let slot = match step {
                    PathStep::Key(k) => &mut parent[k.as_str()],
                    PathStep::Index(i) => &mut parent[*i],
                };
                match slot {
                    Value::Object(m) => m.clear(),
                    Value::Array(a) => a.clear(),
                    Value::String(s) => s.clear(),
                    other => *other = Value::from(0),
                }
            }
        }
    }
    v
}

fn edits<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Vec<T>> {
    proptest::collection::vec(s, 1..6)
}

// ---------------------------------------------------------------------------------------------
// Seeds.

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&read(p)).unwrap()
}

/// (config, safetensors bytes) of a few small fixtures, and of a quantized copy of one.
fn checkpoint_seeds(tmp: &Path) -> Vec<(ModelConfig, Vec<u8>)> {
    let mut seeds: Vec<(ModelConfig, Vec<u8>)> = ["mixtral-base", "deepseek-v3", "qwen3-moe"]
        .iter()
        .map(|n| {
            let d = fixture(n);
            (
                ModelConfig::from_file(&d.join("config.json")).unwrap(),
                read(&d.join("model.safetensors")),
            )
        })
        .collect();
    let q = tmp.join("q");
    moe::loader::save::quantize_checkpoint(
        &fixture("mixtral-base"),
        &q,
        moe::quant::parse_quant("int4:32").unwrap().unwrap(),
        false,
    )
    .unwrap();
    seeds.push((
        ModelConfig::from_file(&q.join("config.json")).unwrap(),
        read(&q.join("model.safetensors")),
    ));
    seeds
}

fn header_end(b: &[u8]) -> usize {
    if b.len() < 8 {
        return b.len();
    }
    let n = u64::from_le_bytes(b[..8].try_into().unwrap());
    (8 + n.min(b.len() as u64) as usize).min(b.len())
}

/// The header JSON and the data section of a safetensors buffer.
fn split_safetensors(b: &[u8]) -> (Value, &[u8]) {
    let end = header_end(b);
    (serde_json::from_slice(&b[8..end]).unwrap(), &b[end..])
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Loads a model from `ck` and, if it loads, runs three tokens through it.
fn load_and_run(cfg: &ModelConfig, ck: Checkpoint, quant: bool) -> moe::Result<()> {
    let opts = LoadOptions {
        quant: quant.then(|| moe::quant::parse_quant("int4:32").unwrap().unwrap()),
        ..Default::default()
    };
    let model = loader::load_checkpoint(cfg.clone(), ck, &opts)?;
    let mut cache = model.new_cache(1, 3)?;
    let ids = Tensor::new(&[1u32, 2, 3], &Device::Cpu)?.unsqueeze(0)?;
    model.forward(&ids, &mut cache, true, None)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Targets.

#[test]
fn fuzz_safetensors_header_and_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let seeds = checkpoint_seeds(tmp.path());
    let n = seeds.len();
    // Raw byte edits, mostly in the header.
    fuzz("safetensors bytes", (0..n, edits(byte_edit())), |(i, e)| {
        let (cfg, bytes) = &seeds[i];
        let b = apply_bytes(bytes.clone(), &e, header_end(bytes));
        if let Ok(ck) = Checkpoint::from_bytes("fuzz.safetensors", b) {
            let _ = load_and_run(cfg, ck, i == n - 1);
        }
        Ok(())
    });
    // Structural edits of the header JSON (dtypes, shapes, offsets, names, __metadata__).
    fuzz(
        "safetensors header json",
        (0..n, edits(json_edit())),
        |(i, e)| {
            let (cfg, bytes) = &seeds[i];
            let (header, data) = split_safetensors(bytes);
            let b = join_safetensors(&apply_json(header, &e), data);
            if let Ok(ck) = Checkpoint::from_bytes("fuzz.safetensors", b) {
                let _ = load_and_run(cfg, ck, i == n - 1);
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_sharded_index() {
    // mixtral-base split in two shards with a true index, then the index is mutated.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let src = fixture("mixtral-base");
    let bytes = read(&src.join("model.safetensors"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    for (shard, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &d.join(&file)).unwrap();
        for n in part.iter() {
            map.insert(n.clone(), Value::from(file.clone()));
        }
    }
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": map});
    let index_path = d.join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).unwrap();
    loader::load_dir(d, &LoadOptions::default()).expect("the true index loads");
    let extra = prop_oneof![
        Just(Value::from("../model.safetensors")),
        Just(Value::from("/etc/passwd")),
        Just(Value::from("model-00001-of-00002.safetensors")),
        Just(Value::from("missing.safetensors")),
        Just(Value::from(".")),
    ];
    fuzz(
        "sharded index",
        (
            edits(json_edit()),
            proptest::option::of((any::<usize>(), extra)),
        ),
        |(e, redirect)| {
            let mut v = apply_json(index.clone(), &e);
            if let (Some((at, file)), Some(m)) = (redirect, v["weight_map"].as_object_mut()) {
                if let Some(k) = m.keys().nth(at % m.len().max(1)).cloned() {
                    m.insert(k, file);
                }
            }
            std::fs::write(&index_path, v.to_string()).unwrap();
            let _ = loader::load_dir(d, &LoadOptions::default());
            Ok(())
        },
    );
}

/// Every family's config: the fixtures' and the real published ones in configs/.
fn config_seeds() -> Vec<Value> {
    let mut out: Vec<Value> = common::FIXTURES
        .iter()
        .map(|n| json(&fixture(n).join("config.json")))
        .collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            out.push(json(&p));
        }
    }
    out
}

#[test]
fn fuzz_config_json() {
    let seeds = config_seeds();
    let gpus = moe::analysis::builtin_gpus();
    fuzz(
        "config.json",
        (0..seeds.len(), edits(json_edit())),
        |(i, e)| {
            let text = apply_json(seeds[i].clone(), &e).to_string();
            let Ok(cfg) = ModelConfig::from_json_str(&text, Path::new("config.json")) else {
                return Ok(());
            };
            // The cost model on whatever parses...
            let report = moe::analysis::analyze("fuzz", &cfg, 4096, 4, &gpus);
            let _ = serde_json::to_string(&report);
            let _ = moe::analysis::render::report_text(&report, true);
            let inv = moe::analysis::tensor_inventory(&cfg);
            let bytes = moe::analysis::bytes::weight_bytes(&inv, moe::analysis::Precision::Fp32);
            // ...and, when it is small, a random-weight model and a forward pass.
            if bytes < 16 << 20 && cfg.num_layers() <= 8 && cfg.max_position_embeddings <= 1 << 16 {
                let w = moe::bench::random::random_weights(&cfg, 0, DType::F32, &Device::Cpu, None);
                if let Ok(w) = w {
                    if let Ok(model) =
                        moe::model::Model::new(cfg.clone(), w, DType::F32, &Device::Cpu)
                    {
                        let ids = Tensor::new(&[0u32, 1], &Device::Cpu)
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap();
                        if let Ok(mut cache) = model.new_cache(1, 2) {
                            let _ = model.forward(&ids, &mut cache, true, None);
                        }
                    }
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_quantized_checkpoint_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q");
    moe::loader::save::quantize_checkpoint(
        &fixture("mixtral-base"),
        &q,
        moe::quant::parse_quant("int8").unwrap().unwrap(),
        false,
    )
    .unwrap();
    let cfg = json(&q.join("config.json"));
    let cfg_path = q.join("config.json");
    fuzz(
        "quantization_config",
        (edits(json_edit()), "\\PC{0,10}"),
        |(e, spec)| {
            let _ = moe::quant::parse_quant(&spec);
            let mut v = cfg.clone();
            v["quantization_config"] = apply_json(
                serde_json::json!({"qc": cfg["quantization_config"].clone()}),
                &e,
            )["qc"]
                .clone();
            let _ = moe::quant::parse_quantization_config(&v["quantization_config"]);
            std::fs::write(&cfg_path, v.to_string()).unwrap();
            let _ = loader::load_dir(&q, &LoadOptions::default());
            Ok(())
        },
    );
}

#[test]
fn fuzz_tokenizer_files() {
    let d = fixture("mixtral-base");
    let cfg = ModelConfig::from_file(&d.join("config.json")).unwrap();
    let kjv = &loader::embedded::TINY_KJV;
    let seeds: Vec<(Value, Value, Value)> = vec![
        (
            json(&d.join("tokenizer.json")),
            json(&d.join("tokenizer_config.json")),
            json(&d.join("generation_config.json")),
        ),
        (
            serde_json::from_slice(kjv.tokenizer_json).unwrap(),
            serde_json::from_str(kjv.tokenizer_config).unwrap(),
            serde_json::from_str(kjv.generation_config).unwrap(),
        ),
    ];
    fuzz(
        "tokenizer files",
        (0..seeds.len(), 0..3usize, edits(json_edit()), "\\PC{0,24}"),
        |(i, which, e, text)| {
            let (mut t, mut tc, mut gc) = seeds[i].clone();
            let target = [&mut t, &mut tc, &mut gc];
            let slot = target.into_iter().nth(which).unwrap();
            *slot = apply_json(slot.clone(), &e);
            let files = moe::runtime::tokenizer::TokenizerFiles {
                tokenizer_config: Some(tc.to_string()),
                generation_config: Some(gc.to_string()),
            };
            let tok = moe::runtime::tokenizer::TextTokenizer::from_bytes(
                t.to_string().as_bytes(),
                &files,
                &cfg,
                PathBuf::from("tokenizer.json"),
            );
            if let Ok(tok) = tok {
                if let Ok(ids) = tok.encode(&text) {
                    let _ = tok.decode(&ids);
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_command_line() {
    use clap::Parser;
    let kjv = &loader::embedded::TINY_KJV;
    let cfg = kjv.config().unwrap();
    let tok = moe::runtime::tokenizer::TextTokenizer::embedded(kjv, &cfg).unwrap();
    let model = kjv.load(&LoadOptions::default()).unwrap();
    let flags = prop_oneof![
        Just("--ids"),
        Just("--prompt"),
        Just("--top-k"),
        Just("--top-p"),
        Just("--temperature"),
        Just("--max-new-tokens"),
        Just("--seed"),
        Just("--quant"),
        Just("--dtype"),
        Just("--device"),
        Just("--layers"),
        Just("--runs"),
        Just("--model"),
        Just("bench"),
        Just("logits"),
        Just("analyze"),
        Just("quantize"),
        Just("--context"),
        Just("--batch"),
        Just("--gpu"),
        Just("--bandwidth"),
        Just("--memory"),
        Just("--tflops"),
        Just("--claims"),
        Just("--json"),
    ];
    let value = prop_oneof![
        Just("1,2,3".to_string()),
        Just("".to_string()),
        Just(",".to_string()),
        Just("1,,2".to_string()),
        Just("-1".to_string()),
        Just("4294967296".to_string()),
        Just("0".to_string()),
        Just("nan".to_string()),
        Just("int4:0".to_string()),
        Just("int4:33".to_string()),
        Just("cuda:99999999999999999999".to_string()),
        Just("mixtral-8x7b".to_string()),
        Just("deepseek-v3".to_string()),
        Just("h100".to_string()),
        Just("67108864".to_string()),
        Just("1048576".to_string()),
        Just("1e-300".to_string()),
        "[0-9,]{0,12}",
        "\\PC{0,16}",
    ];
    fuzz(
        "command line",
        (
            proptest::collection::vec((flags, value), 0..5),
            "\\PC{0,40}",
            proptest::collection::vec(any::<u32>(), 0..6),
        ),
        |(args, prompt, ids)| {
            let mut argv = vec!["moe-run".to_string()];
            for (f, v) in args {
                argv.push(f.to_string());
                argv.push(v);
            }
            // `analyze` computes from its arguments alone: run it on whatever parses.
            if let Ok(moe::cli::Cli {
                cmd: Some(moe::cli::Cmd::Analyze(a)),
                ..
            }) = moe::cli::Cli::try_parse_from(&argv)
            {
                if a.plot.is_none() {
                    if let Ok(out) = moe::cli::analyze::compute(&a) {
                        let _ = serde_json::to_string(&out);
                    }
                }
            }
            // Ids and prompts as `run` takes them: parsed, encoded, checked, decoded as streamed.
            let _ = moe::cli::Cli::try_parse_from(["moe-run", "--ids", &prompt]);
            if let Ok(enc) = tok.encode(&prompt) {
                let _ = moe::runtime::generate::validate_prompt(&model, &enc);
            }
            let _ = moe::runtime::generate::validate_prompt(&model, &ids);
            let mut stream = moe::runtime::tokenizer::TextStream::default();
            for id in ids {
                let _ = stream.push(&tok, id);
            }
            Ok(())
        },
    );
}

/// Inputs the fuzzers once found to fail, kept after the fix.
#[test]
fn regressions() {
    // A header whose shape multiplies past u64 (was: overflow panic in the header diagnosis).
    let bytes = read(&fixture("mixtral-base").join("model.safetensors"));
    let (mut header, data) = split_safetensors(&bytes);
    header["model.norm.weight"]["shape"] = serde_json::json!([u64::MAX, 2]);
    let e = Checkpoint::from_bytes("x.safetensors", join_safetensors(&header, data))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("overflows"),
        "{e}"
    );

    let config_err = |fixture_name: &str, key: &str, v: Value| {
        let mut c = json(&fixture(fixture_name).join("config.json"));
        c[key] = v;
        ModelConfig::from_json_str(&c.to_string(), Path::new("config.json"))
            .err()
            .unwrap_or_else(|| panic!("{key} accepted"))
            .to_string()
    };
    // A RoPE of width 0 (was: a panic inside candle's rotary embedding).
    let e = config_err("deepseek-v2-greedy", "qk_rope_head_dim", Value::from(0));
    assert!(e.contains("qk_rope_head_dim must be positive"), "{e}");
    // Layer counts that would size a vector of billions of layers (was: killed for memory).
    let e = config_err("mixtral-base", "num_hidden_layers", Value::from(1u64 << 32));
    assert!(
        e.contains("num_hidden_layers = 4294967296") && e.contains("limit 4096"),
        "{e}"
    );
    let e = config_err("mixtral-base", "num_hidden_layers", Value::from(1u64 << 40));
    assert!(e.contains("larger than any model's"), "{e}");
    // A post-processor template naming a special token it does not define (was: a panic inside
    // the tokenizers crate at the first encode).
    let d = fixture("mixtral-base");
    let mut t = json(&d.join("tokenizer.json"));
    t["post_processor"]["special_tokens"] = serde_json::json!({});
    let cfg = ModelConfig::from_file(&d.join("config.json")).unwrap();
    let e = moe::runtime::tokenizer::TextTokenizer::from_bytes(
        t.to_string().as_bytes(),
        &Default::default(),
        &cfg,
        d.join("tokenizer.json"),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("malformed tokenizer"),
        "{e}"
    );
    // Dimensions whose products overflow the cost model's 64-bit counts.
    let e = config_err("mixtral-base", "hidden_size", Value::from(1u64 << 31));
    assert!(e.contains("parameters") && e.contains("limit"), "{e}");
}
