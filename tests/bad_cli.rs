//! The bad-input table for the command line and for everything that writes files: each row runs
//! the real binary (with `RUST_BACKTRACE=1`, so a panic would show) and asserts the exit code, a
//! message naming the file, flag or limit, no panic and no backtrace, and that every input file
//! is byte-for-byte unchanged afterwards (symlinks still symlinks to the same target).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::fixture;

/// Every file under `dir`: its bytes, or the target of a symlink (not followed).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Result<Vec<u8>, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(p.clone(), Err(std::fs::read_link(&p).unwrap()));
            } else if m.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), Ok(std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn run_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    run_env(cwd, &[], args)
}

/// [`run_in`] with extra environment variables (the Hugging Face ones are cleared first, and
/// HF_HOME and HF_ENDPOINT point at nothing real unless `env` sets them).
fn run_env(cwd: Option<&Path>, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moe-run"));
    c.args(args).env("RUST_BACKTRACE", "1");
    if !env.is_empty() {
        for k in [
            "HF_HUB_CACHE",
            "HF_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_OFFLINE",
        ] {
            c.env_remove(k);
        }
        c.env("HF_ENDPOINT", "http://127.0.0.1:1");
        c.envs(env.iter().copied());
    }
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    c.output().expect("spawn moe-run")
}

/// Runs `args`, expecting exit `code` and every string of `want` in stderr, with every file under
/// each of `inputs` unchanged. Returns (stdout, stderr).
fn row(inputs: &[&Path], args: &[&str], code: i32, want: &[&str]) -> (String, String) {
    row_in(None, inputs, args, code, want)
}

fn row_in(
    cwd: Option<&Path>,
    inputs: &[&Path],
    args: &[&str],
    code: i32,
    want: &[&str],
) -> (String, String) {
    row_env(cwd, &[], inputs, args, code, want)
}

fn row_env(
    cwd: Option<&Path>,
    env: &[(&str, &str)],
    inputs: &[&Path],
    args: &[&str],
    code: i32,
    want: &[&str],
) -> (String, String) {
    let before: Vec<_> = inputs.iter().map(|d| snapshot(d)).collect();
    let out = run_env(cwd, env, args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: exit status; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{args:?}: panic: {stderr}"
    );
    for w in want {
        assert!(stderr.contains(w), "{args:?}: stderr lacks {w:?}: {stderr}");
    }
    if code == 1 {
        // One `error:` line, no cause line that repeats it.
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        for l in &lines[1..] {
            if let Some(cause) = l.trim().strip_prefix("caused by: ") {
                assert!(
                    !lines[0].contains(cause),
                    "{args:?}: repeated cause: {stderr}"
                );
            }
        }
    }
    for (d, b) in inputs.iter().zip(before) {
        assert!(
            snapshot(d) == b,
            "{args:?}: files under {} changed",
            d.display()
        );
    }
    (stdout, stderr)
}

/// A scratch copy of a fixture directory.
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "expected.json" {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    to.to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn quantize_into_its_own_input_folder_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("mixtral-base", &t.path().join("m"));
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int4",
            "--out",
            s(&d),
        ],
        1,
        &["--out", s(&d), "is an input"],
    );
    // With --force too, and into a folder inside it, or around it.
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int4",
            "--out",
            s(&d),
            "--force",
        ],
        1,
        &["is an input"],
    );
    let inner = d.join("int4");
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int8",
            "--out",
            s(&inner),
        ],
        1,
        &["inside the input folder"],
    );
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int8",
            "--out",
            s(t.path()),
            "--force",
        ],
        1,
        &["contains the input"],
    );
    // Through a symlink to the input folder.
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&d, &link).unwrap();
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int4",
            "--out",
            s(&link),
            "--force",
        ],
        1,
        &["is an input"],
    );
    assert!(!inner.exists());
}

/// A Hugging Face cache laid out as the hub writes it: snapshot files are symlinks into blobs/.
fn fake_hf_cache(root: &Path) -> (PathBuf, PathBuf) {
    let repo = root.join("hub/models--org--tiny");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for (i, e) in std::fs::read_dir(fixture("mixtral-base"))
        .unwrap()
        .enumerate()
    {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if name == "expected.json" {
            continue;
        }
        let blob = blobs.join(format!("blob{i:02}"));
        std::fs::copy(&p, &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i:02}"), snap.join(name)).unwrap();
    }
    (repo, snap)
}

#[test]
fn quantize_inside_a_hugging_face_cache_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (repo, snap) = fake_hf_cache(t.path());
    // In place (the reported data loss), and into a new folder of the same cache.
    row(
        &[&repo],
        &[
            "quantize",
            "--weights",
            s(&snap),
            "--quant",
            "int4",
            "--out",
            s(&snap),
            "--force",
        ],
        1,
        &["Hugging Face cache"],
    );
    let other = repo.join("snapshots/int4");
    row(
        &[&repo],
        &[
            "quantize",
            "--weights",
            s(&snap),
            "--quant",
            "int4",
            "--out",
            s(&other),
        ],
        1,
        &["Hugging Face cache", "never writes"],
    );
    // The same cache found through HF_HUB_CACHE, whatever its layout below.
    let hub = t.path().join("hub");
    let out = Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .args([
            "quantize",
            "--weights",
            s(&snap),
            "--quant",
            "int8",
            "--out",
        ])
        .arg(hub.join("elsewhere"))
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Hugging Face cache"), "{err}");
    assert!(!other.exists() && !hub.join("elsewhere").exists());
    // Reading from the cache is fine: the output goes outside it, and the cache is untouched.
    let q = t.path().join("q");
    row(
        &[&repo],
        &[
            "quantize",
            "--weights",
            s(&snap),
            "--quant",
            "int4",
            "--out",
            s(&q),
        ],
        0,
        &["wrote"],
    );
    assert!(q.join("model.safetensors").is_file());
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn quantized_checkpoints_are_refused_as_input_and_outputs_are_not_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("mixtral-base", &t.path().join("m"));
    let q = t.path().join("q");
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int4",
            "--out",
            s(&q),
        ],
        0,
        &["wrote"],
    );
    // Every file it wrote has the same umask-derived mode (model.safetensors was 0600).
    #[cfg(unix)]
    {
        let want = mode(&q.join("config.json"));
        for f in [
            "model.safetensors",
            "tokenizer.json",
            "generation_config.json",
        ] {
            assert_eq!(mode(&q.join(f)), want, "{f}");
        }
        assert_eq!(want & 0o044, 0o044 & want, "readable as any file is");
    }
    // No staging folder left beside it.
    let names: Vec<String> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Re-quantizing the quantized checkpoint: refused for every format, nothing written.
    let q2 = t.path().join("q2");
    for fmt in ["int4", "int8", "int4:64"] {
        row(
            &[&d, &q],
            &[
                "quantize",
                "--weights",
                s(&q),
                "--quant",
                fmt,
                "--out",
                s(&q2),
            ],
            1,
            &[
                s(&q),
                "already quantized (int4",
                "original dense checkpoint",
            ],
        );
        assert!(!q2.exists(), "{fmt}: an output folder was left behind");
    }
    // An existing output is not replaced without --force; with it, it is.
    row(
        &[&d, &q],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int8",
            "--out",
            s(&q),
        ],
        1,
        &["--out", "already exists", "--force"],
    );
    row(
        &[&d],
        &[
            "quantize",
            "--weights",
            s(&d),
            "--quant",
            "int8",
            "--out",
            s(&q),
            "--force",
        ],
        0,
        &["wrote"],
    );
    let cfg = std::fs::read_to_string(q.join("config.json")).unwrap();
    assert!(cfg.contains("\"bits\": 8"), "{cfg}");
    // A failing quantize (a missing tensor) leaves no output at all.
    let bad = copy_fixture("mixtral-base", &t.path().join("bad"));
    std::fs::write(bad.join("model.safetensors"), b"short").unwrap();
    let q3 = t.path().join("q3");
    row(
        &[&bad],
        &[
            "quantize",
            "--weights",
            s(&bad),
            "--quant",
            "int4",
            "--out",
            s(&q3),
        ],
        1,
        &["model.safetensors"],
    );
    assert!(!q3.exists());
}

#[test]
fn sampling_flags_are_checked_where_they_are_parsed() {
    let d = fixture("mixtral-base");
    for (flag, value, want) in [
        ("--top-k", "0", "at least 1"),
        ("--top-p", "2", "0 < p <= 1"),
        ("--top-p", "0", "0 < p <= 1"),
        ("--temperature", "-1", ">= 0"),
        ("--temperature", "nan", ">= 0"),
        ("--max-new-tokens", "-3", "--max-new-tokens"),
    ] {
        let arg = format!("{flag}={value}");
        let (stdout, _) = row(
            &[&d],
            &["--weights", s(&d), "--prompt", "In the beginning", &arg],
            2,
            &[flag, want],
        );
        assert!(stdout.is_empty(), "{flag}: {stdout}");
    }
}

#[test]
fn placement_flags_are_checked() {
    let d = fixture("mixtral-base");
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.json");
    let wrong = tmp.path().join("wrong.json");
    // A profile of another model: 5 layers where mixtral-base has 2.
    std::fs::write(
        &wrong,
        r#"{"model":"other","tokens":1,"layers":[[1,1],[1,1],[1,1],[1,1],[1,1]]}"#,
    )
    .unwrap();
    let (m, w) = (missing.to_str().unwrap(), wrong.to_str().unwrap());
    let run = ["--weights", s(&d), "--ids", "1,2"];
    for (extra, code, want) in [
        (
            &["--gpu-memory", "0"][..],
            2,
            &["--gpu-memory", "size > 0"][..],
        ),
        (&["--gpu-memory", "12XB"], 2, &["--gpu-memory", "24GiB"]),
        (&["--profile", m], 1, &["nope.json"]),
        (
            &["--profile", w],
            1,
            &["routing profile", "5 layers", "has 2"],
        ),
        (
            &["--n-cpu-moe", "1", "--profile", w],
            2,
            &["--n-cpu-moe", "--profile"],
        ),
    ] {
        let mut a = run.to_vec();
        a.extend_from_slice(extra);
        let (stdout, _) = row(&[&d, tmp.path()], &a, code, want);
        assert!(stdout.is_empty(), "{a:?}: {stdout}");
    }
    for (args, want) in [
        (
            &["analyze", "--model", "mixtral-8x7b", "--quant", "int4"][..],
            &["add --gpu"][..],
        ),
        (
            &[
                "analyze",
                "--model",
                "mixtral-8x7b",
                "--gpu",
                "rtx4090",
                "--gpu-memory",
                "1GiB",
            ],
            &[
                "every routed expert on the CPU",
                "KV cache",
                "budget is 1.00 GiB",
            ],
        ),
        (&["profile", "--prompts", m], &["nope.json"]),
    ] {
        row(&[tmp.path()], args, 1, want);
    }
    // profile --out never lands on its inputs (the text, the checkpoint folder); the inputs are
    // byte-for-byte unchanged afterwards (row() snapshots them).
    let text = tmp.path().join("text.txt");
    std::fs::write(
        &text,
        "In the beginning God created the heaven and the earth.",
    )
    .unwrap();
    let t = text.to_str().unwrap();
    let inside = d.join("profile.json");
    for (args, want) in [
        (
            vec!["profile", "--prompts", t, "--out", t, "--force"],
            &["--out", "is an input"][..],
        ),
        (
            vec![
                "profile",
                "--weights",
                s(&d),
                "--out",
                inside.to_str().unwrap(),
            ],
            &["--out", "inside the input folder"],
        ),
    ] {
        row(&[&d, tmp.path()], &args, 1, want);
    }
    assert!(!inside.exists());
}

#[test]
fn weight_dtype_combinations_that_cannot_run_are_refused() {
    let d = fixture("mixtral-base");
    for (extra, want) in [
        (&["--weight-dtype", "int4"][..], "unknown dtype"),
        (&["--weight-dtype", "bf16", "--dtype", "f16"], "--dtype f32"),
        (
            &["--weight-dtype", "bf16", "--quant", "int8"],
            "--quant already",
        ),
    ] {
        for cmd in [
            &["--prompt", "In the"][..],
            &["bench", "--gen", "1", "--runs", "1"],
        ] {
            let mut a: Vec<&str> = cmd.to_vec();
            a.extend(["--weights", s(&d)]);
            a.extend_from_slice(extra);
            let (stdout, _) = row(&[&d], &a, 1, &["--weight-dtype", want]);
            assert!(stdout.is_empty(), "{a:?}: {stdout}");
        }
    }
}

#[test]
fn prefill_only_reports_only_measured_rates() {
    let d = fixture("mixtral-base");
    let (stdout, stderr) = row(
        &[&d],
        &[
            "--weights",
            s(&d),
            "--prompt",
            "In the beginning",
            "--max-new-tokens",
            "0",
        ],
        0,
        &["prompt ", "decode n/a (0 tokens"],
    );
    assert_eq!(stdout.trim_end(), "In the beginning");
    // The prefill rate is a real measurement of the prompt's forward pass, not prompt / 1e-12.
    let rate: f64 = stderr
        .split("prefill ")
        .nth(1)
        .and_then(|r| r.split(" tok/s").next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no prefill rate: {stderr}"));
    assert!(rate > 0.0 && rate < 1e8, "{rate}");
    // The JSON interface: no generated ids.
    let out = run_in(
        None,
        &[
            "--weights",
            s(&d),
            "--ids",
            "1,2,3",
            "--max-new-tokens",
            "0",
            "--json",
        ],
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["generated_ids"], serde_json::json!([]));
}

#[test]
fn a_prompt_longer_than_the_context_prints_nothing_first() {
    let d = fixture("mixtral-base");
    let prompt = "In the beginning was the word ".repeat(200);
    let (stdout, _) = row(
        &[&d],
        &["--weights", s(&d), "--prompt", &prompt],
        1,
        &["context of 128", "max_position_embeddings"],
    );
    assert!(
        stdout.is_empty(),
        "the prompt was echoed: {} bytes",
        stdout.len()
    );
}

#[test]
fn bench_layers_and_memory_are_checked_before_allocating() {
    let r = |args: &[&str], code, want: &[&str]| {
        let mut a = vec!["bench", "--model", "mixtral-8x7b", "--random-weights"];
        a.extend_from_slice(args);
        row(&[], &a, code, want)
    };
    r(
        &["--layers", "33"],
        1,
        &["--layers 33 is out of range", "32 decoder layers"],
    );
    r(&["--layers", "0"], 2, &["--layers", "at least 1"]);
    r(&["--runs", "0"], 2, &["--runs", "at least 1"]);
    // 32 layers in f32 are 174 GiB: refused from analyze's count, before drawing anything.
    let t = std::time::Instant::now();
    r(
        &["--dtype", "f32"],
        1,
        &["cpu (RAM) out of memory", "mixtral-8x7b", "needs 174."],
    );
    assert!(t.elapsed().as_secs() < 60, "it started drawing weights");
}

#[test]
fn sizes_that_would_overflow_or_exhaust_memory_are_refused() {
    for (args, code, want) in [
        (
            &[
                "analyze",
                "--model",
                "mixtral-8x7b",
                "--context",
                "18446744073709551615",
            ][..],
            2,
            &["--context", "1 to 67108864"][..],
        ),
        (
            &["analyze", "--model", "mixtral-8x7b", "--batch", "0"][..],
            2,
            &["--batch"][..],
        ),
        (
            &[
                "analyze",
                "--model",
                "mixtral-8x7b",
                "--bandwidth",
                "1e400",
                "--memory",
                "24",
            ][..],
            2,
            &["--bandwidth", "finite number > 0"][..],
        ),
        (
            &["bench", "--prompt-len", "18446744073709551615"][..],
            1,
            &["--prompt-len", "context of 512"][..],
        ),
        (
            &[
                "bench",
                "--sweep",
                "batch",
                "--points",
                "1,100000000",
                "--runs",
                "1",
            ][..],
            1,
            &["out of memory", "batch 100000000"][..],
        ),
    ] {
        row(&[], args, code, want);
    }
    // Saturating, not wrapping: the largest context and batch analyze accepts.
    let (_, err) = row(
        &[],
        &[
            "analyze",
            "--model",
            "mixtral-8x22b",
            "--context",
            "67108864",
            "--batch",
            "1048576",
            "--json",
        ],
        0,
        &[],
    );
    assert!(err.is_empty(), "{err}");
    // A generation budget past the context stops at the context, no overflow.
    let (_, err) = row(
        &[],
        &[
            "--ids",
            "1,2,3",
            "--max-new-tokens",
            "18446744073709551615",
            "--temperature",
            "0",
            "--json",
        ],
        0,
        &[],
    );
    assert!(
        err.contains("stop: context full") || err.is_empty(),
        "{err}"
    );
}

#[test]
fn results_outside_the_repository_root_says_where_to_run_it() {
    let t = tempfile::tempdir().unwrap();
    row_in(
        Some(t.path()),
        &[t.path()],
        &["results"],
        1,
        &["--dir benches/results: not found", "repository root"],
    );
}

#[test]
fn hub_flags_and_offline_without_a_cache() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("hf");
    std::fs::create_dir(&home).unwrap();
    let d = fixture("mixtral-base");
    let env = [("HF_HOME", s(&home))];
    let offline = [("HF_HOME", s(&home)), ("HF_HUB_OFFLINE", "1")];
    fn with<'a>(head: &[&'a str]) -> Vec<&'a str> {
        let run: [&'a str; 4] = ["--ids", "1,2", "--max-new-tokens", "1"];
        head.iter().chain(&run).copied().collect()
    }
    // --revision nonsense: refused where it is parsed, before anything is read or written.
    for rev in ["", "../../etc", "a b", "x.lock", "/main", "a//b", "-main"] {
        let arg = format!("--revision={rev}");
        let mut args = with(&["--model", "org/tiny"]);
        args.push(&arg);
        row_env(
            None,
            &env,
            &[&home],
            &args,
            2,
            &["--revision", "not a branch, tag or commit"],
        );
    }
    // --revision without --model is a usage error, on every command that takes it.
    for cmd in [&[][..], &["logits"][..], &["analyze"][..], &["bench"][..]] {
        let args = [cmd, &["--revision", "main", "--ids", "1"][..]].concat();
        let args: Vec<&str> = if cmd == ["analyze"] || cmd == ["bench"] {
            args.into_iter()
                .filter(|a| *a != "--ids" && *a != "1")
                .collect()
        } else {
            args
        };
        row_env(None, &env, &[&home], &args, 2, &["--model"]);
    }
    // --revision with a local folder (as --weights or --model) or the embedded model.
    row_env(
        None,
        &env,
        &[&d],
        &[&with(&["--weights", s(&d)])[..], &["--revision", "main"]].concat(),
        1,
        &["--revision main", "local folder"],
    );
    row_env(
        None,
        &env,
        &[&d],
        &[&with(&["--model", s(&d)])[..], &["--revision", "main"]].concat(),
        1,
        &["--revision main", "local folder"],
    );
    row_env(
        None,
        &env,
        &[],
        &[&with(&["--model", "tiny-kjv"])[..], &["--revision", "v1"]].concat(),
        1,
        &["--revision v1", "embedded"],
    );
    // Neither a folder nor a repo id.
    row_env(
        None,
        &env,
        &[],
        &with(&["--model", "./no/such/folder"]),
        1,
        &["neither a folder nor a Hugging Face repo id"],
    );
    // HF_HUB_OFFLINE with nothing cached: refused, naming the repo, the cache and the variable.
    let (_, err) = row_env(
        None,
        &offline,
        &[&home],
        &with(&["--model", "org/tiny", "--revision", "v1.0"]),
        1,
        &[
            "org/tiny",
            "HF_HUB_OFFLINE is set",
            "revision v1.0",
            "models--org--tiny",
        ],
    );
    assert!(!err.contains("cannot reach"), "{err}");
    // A known model by its repo id is the same model, offline too.
    row_env(
        None,
        &offline,
        &[&home],
        &with(&["--model", "MistralAI/Mixtral-8x7B-v0.1"]),
        1,
        &["mixtral-8x7b", "HF_HUB_OFFLINE is set"],
    );
    // HF_ENDPOINT that is not a URL.
    row_env(
        None,
        &[("HF_HOME", s(&home)), ("HF_ENDPOINT", "ftp://x")],
        &[&home],
        &with(&["--model", "org/tiny"]),
        1,
        &["HF_ENDPOINT=\"ftp://x\"", "http://"],
    );
    // Nothing was written in the cache by any of these.
    assert!(std::fs::read_dir(&home).unwrap().next().is_none());
}

#[test]
fn missing_files_are_named_once() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("mixtral-base", &t.path().join("m"));
    std::fs::remove_file(d.join("config.json")).unwrap();
    let (_, err) = row(
        &[&d],
        &["logits", "--weights", s(&d), "--ids", "1"],
        1,
        &["config.json"],
    );
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn closed_stdout_ends_quietly() {
    // The reader has gone before anything is written (as `| head` does after its lines).
    for args in [
        &["analyze", "--model", "mixtral-8x7b", "--json"][..],
        &["analyze", "--claims"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moe-run"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

#[test]
fn bench_and_analyze_outputs_are_checked_before_running() {
    let t = tempfile::tempdir().unwrap();
    let d = copy_fixture("mixtral-base", &t.path().join("m"));
    // Into the weights folder.
    let inside = d.join("bench.json");
    row(
        &[&d],
        &[
            "bench",
            "--weights",
            s(&d),
            "--json-out",
            s(&inside),
            "--runs",
            "1",
        ],
        1,
        &["--json-out", "inside the input folder"],
    );
    // Over an existing file: only with --force.
    let existing = t.path().join("r.json");
    std::fs::write(&existing, "keep").unwrap();
    row(
        &[&d],
        &[
            "bench",
            "--weights",
            s(&d),
            "--json-out",
            s(&existing),
            "--runs",
            "1",
        ],
        1,
        &["--json-out", "already exists", "--force"],
    );
    let plot = t.path().join("p.svg");
    std::fs::write(&plot, "keep").unwrap();
    row(
        &[&d],
        &["analyze", "--weights", s(&d), "--plot", s(&plot)],
        1,
        &["--plot", "already exists"],
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
    assert_eq!(std::fs::read(&plot).unwrap(), b"keep");
    row(
        &[&d],
        &["analyze", "--weights", s(&d), "--plot", s(&plot), "--force"],
        0,
        &["wrote"],
    );
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
}

#[test]
fn threads_goes_on_either_side_of_a_subcommand_and_run_flags_do_not() {
    let d = fixture("mixtral-base");
    for args in [
        &["--threads", "1", "analyze", "--weights", s(&d), "--json"][..],
        &["analyze", "--threads", "1", "--weights", s(&d), "--json"][..],
    ] {
        let (stdout, _) = row(&[&d], args, 0, &[]);
        assert!(stdout.contains("\"total"), "{args:?}: {stdout}");
    }
    let (stdout, _) = row(
        &[&d],
        &["--prompt", "x", "analyze", "--weights", s(&d)],
        2,
        &["--prompt", "cannot be used with `analyze`"],
    );
    assert!(stdout.is_empty(), "{stdout}");
    row(
        &[&d],
        &["--threads", "0", "analyze", "--weights", s(&d)],
        2,
        &["--threads"],
    );
}

#[test]
fn serve_and_chat_flags_are_checked() {
    let d = fixture("mixtral-base");
    for (args, code, want) in [
        (&["serve", "--port", "70000"][..], 2, &["--port"][..]),
        (
            &["serve", "--max-batch", "0"],
            2,
            &["--max-batch", "at least 1"],
        ),
        (&["serve", "--prefill-chunk", "0"], 2, &["--prefill-chunk"]),
        (&["serve", "--host", "not-an-ip"], 2, &["--host"]),
        (
            &["serve", "--kv-memory", "900TB"],
            1,
            &["--kv-memory", "free"],
        ),
        (&["serve", "--kv-memory", "0"], 2, &["--kv-memory", "> 0"]),
        // The fixture has a tokenizer but no chat template.
        (&["chat", "--weights", s(&d)], 1, &["no chat template"]),
    ] {
        row(&[&d], args, code, want);
    }
    // A port already taken is named, with the address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    row(
        &[],
        &["serve", "--port", &port],
        1,
        &["--host/--port", &format!("127.0.0.1:{port}")],
    );
    // `chat` with its input closed at once ends cleanly.
    let out = Command::new(env!("CARGO_BIN_EXE_moe-run"))
        .arg("chat")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The llama.cpp-style flags of a run: out-of-range values are usage errors (exit 2) naming the
/// flag; impossible combinations are refused before anything runs.
#[test]
fn run_habit_flags_are_checked() {
    let d = fixture("mixtral-base");
    let missing = std::env::temp_dir().join("moe-run-no-such-prompt-file.txt");
    for (args, code, want) in [
        (&["-p", "x", "--min-p", "0"][..], 2, &["--min-p"][..]),
        (&["-p", "x", "--min-p", "1.5"], 2, &["--min-p"]),
        (
            &["-p", "x", "--repeat-penalty=-1"],
            2,
            &["--repeat-penalty", "> 0"],
        ),
        (
            &["-p", "x", "--repeat-last-n", "0"],
            2,
            &["--repeat-last-n"],
        ),
        (&["-p", "x", "--ctx-size", "0"], 2, &["--ctx-size"]),
        (
            &["-p", "x", "-c", "100000"],
            1,
            &["--ctx-size 100000", "512", "max_position_embeddings"],
        ),
        (&["-p", "x", "--chat", "y"], 2, &["--chat"]),
        (&["-p", "x", "--system", "y"], 1, &["--system", "--chat"]),
        (
            &["--prompt-file", s(&missing)],
            1,
            &["--prompt-file", "moe-run-no-such-prompt-file"],
        ),
        (
            &["-p", "x", "--device", "tpu"],
            1,
            &["unknown device", "auto, cpu or cuda"],
        ),
        (
            &["--weights", s(&d), "--chat", "hi"],
            1,
            &["--chat", "no chat template"],
        ),
    ] {
        row(&[&d], args, code, want);
    }
}
