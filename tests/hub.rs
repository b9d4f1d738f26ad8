//! `--model ORG/NAME` against a local mock of the Hugging Face Hub on 127.0.0.1 (never the real
//! network): the endpoints hf-hub and huggingface_hub call (`/api/models/ORG/NAME/revision/REV`
//! with siblings, `/api/models/ORG/NAME/tree/REV`, `/ORG/NAME/resolve/REV/FILE` with ranges, ETag, X-Repo-Commit and the LFS
//! headers X-Linked-Etag / X-Linked-Size), serving the committed tiny fixtures. Every run gets
//! its own HF_HOME in a temporary folder.
//!
//! `python_interop` (ignored here; tests/hub_interop.sh runs it with `MOE_HUB_PYTHON` set to a
//! venv's python that has huggingface_hub) checks that the Python client and moe-run share the
//! cache both ways.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use common::fixture;
use sha2::{Digest, Sha256};

const COMMIT_A: &str = "a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0";
const COMMIT_B: &str = "b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1";
const COMMIT_C: &str = "c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2";
const TOKEN: &str = "hf_good";

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// One file of a commit: the bytes served, and what the Hub announces of them.
#[derive(Clone)]
struct MockFile {
    served: Vec<u8>,
    sha256: String,
    size: u64,
    lfs: bool,
}

impl MockFile {
    fn new(bytes: Vec<u8>, lfs: bool) -> Self {
        Self {
            sha256: sha256_hex(&bytes),
            size: bytes.len() as u64,
            served: bytes,
            lfs,
        }
    }
}

#[derive(Clone, Default)]
struct MockRepo {
    /// Branch or tag -> commit.
    refs: BTreeMap<String, String>,
    commits: BTreeMap<String, BTreeMap<String, MockFile>>,
    /// A gated repo's files need `Authorization: Bearer <this>`.
    token: Option<String>,
    /// Files answer a redirect without a Location (a broken server).
    broken_redirect: bool,
}

impl MockRepo {
    /// The files of a fixture folder (those named), at `commit` under `rev`, plus extra files that
    /// moe-run must not download.
    fn with(mut self, rev: &str, commit: &str, dir: &Path) -> Self {
        let mut files = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if name == "expected.json" || name == "tokenizer_expected.json" {
                continue;
            }
            let lfs = name.ends_with(".safetensors");
            files.insert(name, MockFile::new(std::fs::read(&p).unwrap(), lfs));
        }
        files.insert(
            "README.md".into(),
            MockFile::new(b"# tiny\n".to_vec(), false),
        );
        files.insert(
            "consolidated.safetensors".into(),
            MockFile::new(vec![7; 1000], true),
        );
        self.refs.insert(rev.into(), commit.into());
        self.commits.insert(commit.into(), files);
        self
    }

    fn edit(mut self, commit: &str, file: &str, f: impl FnOnce(&mut MockFile)) -> Self {
        f(self.commits.get_mut(commit).unwrap().get_mut(file).unwrap());
        self
    }
}

struct HubState {
    repos: BTreeMap<String, MockRepo>,
    log: Mutex<Vec<String>>,
}

fn error(code: StatusCode, kind: &str, msg: &str) -> Response {
    Response::builder()
        .status(code)
        .header("x-error-code", kind)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::json!({ "error": msg }).to_string()))
        .unwrap()
}

fn decode(s: &str) -> String {
    s.replace("%2F", "/").replace("%2f", "/")
}

/// Every request: the model info API or a file.
async fn handle(
    axum::extract::State(st): axum::extract::State<Arc<HubState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    st.log
        .lock()
        .unwrap()
        .push(format!("{method} {path}{range}"));
    let segs: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let (api, rest) = if segs.len() > 2 && segs[0] == "api" && segs[1] == "models" {
        (true, &segs[2..])
    } else {
        (false, &segs[..])
    };
    if rest.len() < 2 {
        return error(StatusCode::NOT_FOUND, "RepoNotFound", "no such path");
    }
    let id = format!("{}/{}", rest[0], rest[1]);
    let Some(repo) = st.repos.get(&id) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "RepoNotFound",
            "Repository not found",
        );
    };
    let resolve_rev = |rev: &str| {
        repo.refs
            .get(rev)
            .cloned()
            .or_else(|| repo.commits.contains_key(rev).then(|| rev.to_string()))
    };
    if api {
        // /api/models/ORG/NAME[/revision/REV] (model info), /api/models/ORG/NAME/tree/REV (files)
        let tree = rest.get(2).map(String::as_str) == Some("tree");
        let rev = match rest.get(2).map(String::as_str) {
            Some("revision") | Some("tree") => rest[3..].join("/"),
            _ => "main".into(),
        };
        let Some(sha) = resolve_rev(&rev) else {
            return error(
                StatusCode::NOT_FOUND,
                "RevisionNotFound",
                &format!("Invalid rev id: {rev}"),
            );
        };
        if tree {
            let entries: Vec<serde_json::Value> = repo.commits[&sha]
                .iter()
                .map(|(name, f)| {
                    let mut e = serde_json::json!({
                        "type": "file", "path": name, "size": f.size, "oid": &f.sha256[..40],
                    });
                    if f.lfs {
                        e["lfs"] = serde_json::json!({"oid": f.sha256, "size": f.size, "pointerSize": 134});
                    }
                    e
                })
                .collect();
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(serde_json::Value::from(entries).to_string()))
                .unwrap();
        }
        let blobs = uri.query().is_some_and(|q| q.contains("blobs=true"));
        let siblings: Vec<serde_json::Value> = repo.commits[&sha]
            .iter()
            .map(|(name, f)| {
                let mut s = serde_json::json!({ "rfilename": name });
                if blobs {
                    s["size"] = f.size.into();
                    s["blobId"] = f.sha256[..40].into();
                    if f.lfs {
                        s["lfs"] = serde_json::json!({"sha256": f.sha256, "size": f.size, "pointerSize": 134});
                    }
                }
                s
            })
            .collect();
        let body = serde_json::json!({
            "id": id, "modelId": id, "sha": sha, "private": false,
            "gated": if repo.token.is_some() { serde_json::json!("manual") } else { false.into() },
            "disabled": false, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "siblings": siblings,
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
    }
    // /ORG/NAME/resolve/REV/FILE
    if rest.get(2).map(String::as_str) != Some("resolve") || rest.len() < 5 {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "no such path");
    }
    if let Some(t) = &repo.token {
        let sent = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match sent {
            None => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "GatedRepo",
                    &format!("Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in."),
                )
            }
            Some(s) if s != t => {
                return error(
                    StatusCode::FORBIDDEN,
                    "GatedRepo",
                    &format!("Access to model {id} is restricted and you are not in the authorized list. Visit the model page to ask for access."),
                )
            }
            Some(_) => {}
        }
    }
    let Some(sha) = resolve_rev(&rest[3]) else {
        return error(StatusCode::NOT_FOUND, "RevisionNotFound", "Invalid rev id");
    };
    if repo.broken_redirect {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header("x-repo-commit", &sha)
            .header("etag", "\"abc\"")
            .body(Body::empty())
            .unwrap();
    }
    let file = rest[4..].join("/");
    let Some(f) = repo.commits[&sha].get(&file) else {
        return error(StatusCode::NOT_FOUND, "EntryNotFound", "Entry not found");
    };
    let total = f.served.len();
    let etag = if f.lfs {
        f.sha256.clone()
    } else {
        f.sha256[..40].to_string()
    };
    let mut b = Response::builder()
        .header("x-repo-commit", &sha)
        .header("etag", format!("\"{etag}\""))
        .header("accept-ranges", "bytes");
    if f.lfs {
        b = b
            .header("x-linked-etag", format!("\"{}\"", f.sha256))
            .header("x-linked-size", f.size.to_string());
    }
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, z)| {
            let a: usize = a.parse().unwrap_or(0);
            let z: usize = z.parse().map(|z: usize| z + 1).unwrap_or(total).min(total);
            (a, z)
        });
    let (status, body) = match range {
        Some((a, z)) if a < z => {
            b = b.header("content-range", format!("bytes {a}-{}/{total}", z - 1));
            (StatusCode::PARTIAL_CONTENT, f.served[a..z].to_vec())
        }
        Some(_) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{total}"))
                .body(Body::empty())
                .unwrap()
        }
        None => (StatusCode::OK, f.served.clone()),
    };
    let len = body.len();
    b.status(status)
        .header("content-length", len.to_string())
        .body(if method == Method::HEAD {
            Body::empty()
        } else {
            Body::from(body)
        })
        .unwrap()
}

/// The mock Hub on 127.0.0.1, on its own thread; stopped (port closed) by [`MockHub::stop`] or
/// when dropped.
struct MockHub {
    url: String,
    state: Arc<HubState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockHub {
    fn start(repos: Vec<(&str, MockRepo)>) -> Self {
        let state = Arc::new(HubState {
            repos: repos.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            log: Mutex::new(Vec::new()),
        });
        let (tx_addr, rx_addr) = std::sync::mpsc::channel();
        let (tx_stop, rx_stop) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx_addr.send(listener.local_addr().unwrap()).unwrap();
                let app = axum::Router::new().fallback(handle).with_state(st);
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx_stop.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = rx_addr.recv().unwrap();
        Self {
            url: format!("http://{addr}"),
            state,
            stop: Some(tx_stop),
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The repos every test serves.
fn repos() -> Vec<(&'static str, MockRepo)> {
    let tiny = MockRepo::default()
        .with("main", COMMIT_A, &fixture("mixtral-base"))
        .with("v1.0", COMMIT_B, &fixture("mixtral-odd"))
        // The same weights as main, a newer config.json.
        .with("v1.1", COMMIT_C, &fixture("mixtral-base"))
        .edit(COMMIT_C, "config.json", |f| {
            *f = MockFile::new([f.served.clone(), b"\n".to_vec()].concat(), false)
        });
    let gated = MockRepo {
        token: Some(TOKEN.into()),
        ..MockRepo::default().with("main", COMMIT_A, &fixture("mixtral-base"))
    };
    let corrupt = MockRepo::default()
        .with("main", COMMIT_A, &fixture("mixtral-base"))
        .edit(COMMIT_A, "model.safetensors", |f| {
            let n = f.served.len();
            f.served[n / 2] ^= 0xff;
        });
    let huge = MockRepo::default()
        .with("main", COMMIT_A, &fixture("mixtral-base"))
        .edit(COMMIT_A, "model.safetensors", |f| f.size = 1 << 60);
    vec![
        ("org/tiny", tiny),
        (
            "org/sharded",
            MockRepo::default().with("main", COMMIT_A, &fixture("mixtral-swa")),
        ),
        ("org/gated", gated),
        (
            "org/broken",
            MockRepo {
                broken_redirect: true,
                ..MockRepo::default().with("main", COMMIT_A, &fixture("mixtral-base"))
            },
        ),
        ("org/corrupt", corrupt),
        ("org/huge", huge),
    ]
}

/// moe-run with a clean Hugging Face environment: HF_HOME = `home`, HF_ENDPOINT = `endpoint`,
/// plus `env`.
fn run(home: &Path, endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moe-run"));
    c.args(args).env("RUST_BACKTRACE", "1");
    for k in [
        "HF_HUB_CACHE",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HUGGING_FACE_HUB_TOKEN",
    ] {
        c.env_remove(k);
    }
    c.env("HF_HOME", home).env("HF_ENDPOINT", endpoint);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn moe-run")
}

const IDS: &[&str] = &["--ids", "1,2,3", "--json", "--max-new-tokens", "4"];

fn with_ids<'a>(head: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(IDS).copied().collect()
}

fn ok(o: &Output) -> (String, String) {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "exit {:?}: {err}", o.status.code());
    assert!(!err.contains("panicked"), "{err}");
    (out, err)
}

fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    // Download progress lines may come first; the error is the last line.
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(
        (last.starts_with("error: ") || err.starts_with("error: ")) && !err.contains("panicked"),
        "{err}"
    );
    err
}

/// The command fails (as [`failed`]) with an error naming every one of `want`.
fn refused(
    home: &Path,
    endpoint: &str,
    env: &[(&str, &str)],
    args: &[&str],
    want: &[&str],
) -> String {
    let err = failed(&run(home, endpoint, env, args));
    for w in want {
        assert!(err.contains(w), "lacks {w:?}: {err}");
    }
    err
}

/// The same command on the fixture folder itself.
fn with_weights(dir: &Path) -> String {
    let d = dir.to_str().unwrap();
    ok(&run(
        Path::new("/nonexistent"),
        "http://127.0.0.1:1",
        &[("HF_HUB_OFFLINE", "1")],
        &with_ids(&["--weights", d]),
    ))
    .0
}

fn repo_dir(home: &Path, repo: &str) -> PathBuf {
    home.join("hub")
        .join(format!("models--{}", repo.replace('/', "--")))
}

/// Every file name under `dir`, recursively.
fn names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(names(&p));
            } else {
                out.push(p.file_name().unwrap().to_string_lossy().to_string());
            }
        }
    }
    out
}

#[test]
fn downloads_then_runs_from_the_cache_offline() {
    let mut hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let (out, err) = ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny"]),
    ));
    assert_eq!(out, with_weights(&fixture("mixtral-base")), "{err}");
    assert!(
        err.contains(&format!(
            "snapshot: org/tiny revision main commit {COMMIT_A} (downloaded 5 files"
        )),
        "{err}"
    );
    // The standard layout: refs/main, snapshot links into blobs named by the ETag.
    let repo = repo_dir(home.path(), "org/tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT_A
    );
    let snap = repo.join("snapshots").join(COMMIT_A);
    let weights = std::fs::read(fixture("mixtral-base").join("model.safetensors")).unwrap();
    let link = std::fs::read_link(snap.join("model.safetensors")).unwrap();
    assert_eq!(
        link,
        Path::new("../../blobs").join(sha256_hex(&weights)),
        "a relative link into blobs/"
    );
    assert!(names(&repo.join("blobs"))
        .iter()
        .all(|n| !n.ends_with(".part")));
    // Only what the model needs: no README, no unreferenced safetensors.
    let log = hub.requests();
    assert!(
        !log.iter()
            .any(|r| r.contains("README.md") || r.contains("consolidated")),
        "{log:?}"
    );

    // The server gone: from the cache, with HF_HUB_OFFLINE and without it (the cache comes first).
    hub.stop();
    for env in [&[("HF_HUB_OFFLINE", "1")][..], &[]] {
        let (again, err) = ok(&run(
            home.path(),
            &hub.url,
            env,
            &with_ids(&["--model", "org/tiny"]),
        ));
        assert_eq!(again, out);
        assert!(
            err.contains(&format!("commit {COMMIT_A} (local cache")),
            "{err}"
        );
    }
    // Offline, a revision that is not in the cache is refused and says why.
    refused(
        home.path(),
        &hub.url,
        &[("HF_HUB_OFFLINE", "1")],
        &with_ids(&["--model", "org/tiny", "--revision", "v1.0"]),
        &["HF_HUB_OFFLINE", "org/tiny"],
    );
    // With the server down and no cache: the endpoint is named.
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/other"]),
        &["cannot reach", &hub.url],
    );
}

/// A download interrupted earlier (hf-hub's `blobs/<etag>.part`) resumes where it stopped.
#[test]
fn partial_download_resumes() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let weights = std::fs::read(fixture("mixtral-base").join("model.safetensors")).unwrap();
    let blobs = repo_dir(home.path(), "org/tiny").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = weights.len() / 2;
    std::fs::write(
        blobs.join(format!("{}.part", sha256_hex(&weights))),
        &weights[..half],
    )
    .unwrap();
    let (out, err) = ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny"]),
    ));
    assert_eq!(out, with_weights(&fixture("mixtral-base")), "{err}");
    let log = hub.requests();
    assert!(
        log.iter()
            .any(|r| r.ends_with(&format!("model.safetensors bytes={half}-"))),
        "{log:?}"
    );
    assert!(names(&blobs).iter().all(|n| !n.ends_with(".part")));

    // A .part longer than the file cannot be resumed: the error says what to delete.
    let home = tempfile::tempdir().unwrap();
    let blobs = repo_dir(home.path(), "org/tiny").join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let long = [&weights[..], b"extra"].concat();
    std::fs::write(blobs.join(format!("{}.part", sha256_hex(&weights))), long).unwrap();
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny"]),
        &["file model.safetensors", "delete that .part file"],
    );
}

#[test]
fn sharded_checkpoint_downloads_only_its_shards() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let (out, err) = ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/sharded"]),
    ));
    assert_eq!(out, with_weights(&fixture("mixtral-swa")), "{err}");
    let log = hub.requests();
    let got: Vec<&String> = log.iter().filter(|r| r.contains(".safetensors")).collect();
    assert!(
        got.iter()
            .all(|r| r.contains("model-0000") || r.contains(".index.json"))
            && (1..=4).all(|i| got
                .iter()
                .any(|r| r.contains(&format!("model-0000{i}-of-00004")))),
        "{log:?}"
    );
}

#[test]
fn revision_by_tag() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let args = with_ids(&["--model", "org/tiny", "--revision", "v1.0"]);
    let (out, err) = ok(&run(home.path(), &hub.url, &[], &args));
    assert_eq!(out, with_weights(&fixture("mixtral-odd")), "{err}");
    assert!(
        err.contains(&format!("revision v1.0 commit {COMMIT_B}")),
        "{err}"
    );
    let repo = repo_dir(home.path(), "org/tiny");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v1.0")).unwrap(),
        COMMIT_B
    );
    assert!(!repo.join("refs/main").exists());
    // The commit itself names the same snapshot, from the cache.
    let (by_commit, err) = ok(&run(
        home.path(),
        &hub.url,
        &[("HF_HUB_OFFLINE", "1")],
        &with_ids(&["--model", "org/tiny", "--revision", COMMIT_B]),
    ));
    assert_eq!(by_commit, out, "{err}");
    // Downloading by commit writes no ref named by the commit.
    let home2 = tempfile::tempdir().unwrap();
    ok(&run(
        home2.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny", "--revision", COMMIT_B]),
    ));
    let refs = repo_dir(home2.path(), "org/tiny").join("refs");
    assert!(names(&refs).is_empty(), "{:?}", names(&refs));
    // A revision whose weights are a blob main already brought: linked, not downloaded again.
    ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny"]),
    ));
    let before = hub.requests().len();
    let (out_c, err) = ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny", "--revision", "v1.1"]),
    ));
    assert_eq!(out_c, with_weights(&fixture("mixtral-base")), "{err}");
    let log = hub.requests()[before..].to_vec();
    assert!(
        log.iter().any(|r| r.contains("/resolve/v1.1/config.json"))
            && !log.iter().any(|r| r.contains("model.safetensors")),
        "{log:?} {err}"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v1.1")).unwrap(),
        COMMIT_C
    );
    // A revision the repo does not have.
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny", "--revision", "v9"]),
        &["org/tiny (revision v9)", "no revision \"v9\""],
    );
}

#[test]
fn gated_repo_says_how_to_get_access() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let args = with_ids(&["--model", "org/gated"]);
    let page = format!("{}/org/gated", hub.url);
    refused(
        home.path(),
        &hub.url,
        &[],
        &args,
        &[
            "org/gated",
            "HTTP 401",
            "gated",
            "no Hugging Face token was sent",
            "accept",
            &page,
            "HF_TOKEN",
        ],
    );
    refused(
        home.path(),
        &hub.url,
        &[("HF_TOKEN", "hf_wrong")],
        &args,
        &["HTTP 403", "has no access"],
    );
    // The token from HF_TOKEN, and from the token file `huggingface-cli login` writes.
    ok(&run(home.path(), &hub.url, &[("HF_TOKEN", TOKEN)], &args));
    let home2 = tempfile::tempdir().unwrap();
    std::fs::write(home2.path().join("token"), format!("{TOKEN}\n")).unwrap();
    ok(&run(home2.path(), &hub.url, &[], &args));
}

#[test]
fn corrupt_download_is_rejected_and_deleted() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    let good =
        sha256_hex(&std::fs::read(fixture("mixtral-base").join("model.safetensors")).unwrap());
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/corrupt"]),
        &[
            "org/corrupt",
            "model.safetensors",
            "sha256",
            &good,
            "corrupt",
            "deleted",
        ],
    );
    let repo = repo_dir(home.path(), "org/corrupt");
    let blobs = names(&repo.join("blobs"));
    assert!(!blobs.iter().any(|n| n.starts_with(&good)), "{blobs:?}");
    assert!(!repo
        .join("snapshots")
        .join(COMMIT_A)
        .join("model.safetensors")
        .exists());
}

#[test]
fn refused_before_downloading_what_the_disk_cannot_hold() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/huge"]),
        &["only", "is free", "HF_HUB_CACHE"],
    );
    let log = hub.requests();
    assert!(
        !log.iter().any(|r| r.contains("model.safetensors")),
        "{log:?}"
    );
}

#[test]
fn missing_repo_and_local_folder_as_model() {
    let hub = MockHub::start(repos());
    let home = tempfile::tempdir().unwrap();
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/none"]),
        &["org/none", "no such repository"],
    );
    // A server whose answer makes hf-hub panic (a redirect without a Location): an error line.
    refused(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/broken"]),
        &[
            "org/broken (revision main) file config.json",
            "the hf-hub client failed",
        ],
    );
    // A folder given to --model is read as --weights, with nothing asked of the Hub.
    let dir = fixture("mixtral-base");
    let (out, _) = ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", dir.to_str().unwrap()]),
    ));
    assert_eq!(out, with_weights(&dir));
    assert_eq!(hub.requests().len(), 3, "{:?}", hub.requests());
}

/// `analyze` reads a known model's config by one rule for both spellings: its cached snapshot's
/// config.json when the cache has one, else the built-in configs/ copy.
#[test]
fn analyze_one_answer_per_model_name() {
    let home = tempfile::tempdir().unwrap();
    let analyze = |name: &str| {
        let o = run(
            home.path(),
            "http://127.0.0.1:1",
            &[],
            &["analyze", "--model", name, "--json", "--gpu", "h100"],
        );
        ok(&o).0
    };
    let builtin = analyze("mixtral-8x7b");
    assert_eq!(analyze("mistralai/Mixtral-8x7B-v0.1"), builtin);
    assert_eq!(analyze("MISTRALAI/mixtral-8x7b-v0.1"), builtin);
    // A cached snapshot (here with half the layers) is what both spellings read.
    let repo = repo_dir(home.path(), "mistralai/Mixtral-8x7B-v0.1");
    let snap = repo.join("snapshots").join(COMMIT_A);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT_A).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(include_str!("../configs/mixtral-8x7b.json")).unwrap();
    cfg["num_hidden_layers"] = 16.into();
    std::fs::write(snap.join("config.json"), cfg.to_string()).unwrap();
    let cached = analyze("mixtral-8x7b");
    assert_ne!(cached, builtin);
    assert!(cached.contains("cached snapshot"), "{cached}");
    assert_eq!(analyze("mistralai/Mixtral-8x7B-v0.1"), cached);
}

/// huggingface_hub (Python) and moe-run share one cache, both ways. Run by tests/hub_interop.sh.
#[test]
#[ignore = "needs MOE_HUB_PYTHON: a python with huggingface_hub (tests/hub_interop.sh)"]
fn python_interop() {
    let python = std::env::var("MOE_HUB_PYTHON").expect("MOE_HUB_PYTHON");
    let mut hub = MockHub::start(repos());
    let py = |home: &Path, code: &str| {
        let o = Command::new(&python)
            .args(["-c", code])
            .env("HF_HOME", home)
            .env("HF_ENDPOINT", &hub.url)
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "python failed: {err}");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    // 1. moe-run writes, huggingface_hub reads (offline): the same snapshot and files.
    let home = tempfile::tempdir().unwrap();
    ok(&run(
        home.path(),
        &hub.url,
        &[],
        &with_ids(&["--model", "org/tiny"]),
    ));
    let snap = repo_dir(home.path(), "org/tiny")
        .join("snapshots")
        .join(COMMIT_A);
    let seen = py(
        home.path(),
        "import os\n\
         from huggingface_hub import snapshot_download, try_to_load_from_cache\n\
         p = snapshot_download('org/tiny', local_files_only=True)\n\
         for f in ['config.json', 'tokenizer.json', 'model.safetensors']:\n\
         \x20   c = try_to_load_from_cache('org/tiny', f)\n\
         \x20   assert isinstance(c, str) and os.path.samefile(c, os.path.join(p, f)), (f, c)\n\
         print(p)",
    );
    assert_eq!(Path::new(&seen), snap);
    // 2. huggingface_hub downloads from the mock (main and the v1.0 tag), moe-run reads its cache
    //    offline, with the server stopped.
    let home2 = tempfile::tempdir().unwrap();
    py(
        home2.path(),
        "from huggingface_hub import snapshot_download\n\
         pat = ['*.json', 'model.safetensors']\n\
         snapshot_download('org/tiny', allow_patterns=pat)\n\
         snapshot_download('org/tiny', revision='v1.0', allow_patterns=pat)",
    );
    hub.stop();
    let offline = [("HF_HUB_OFFLINE", "1")];
    let (out, err) = ok(&run(
        home2.path(),
        &hub.url,
        &offline,
        &with_ids(&["--model", "org/tiny"]),
    ));
    assert_eq!(out, with_weights(&fixture("mixtral-base")), "{err}");
    assert!(
        err.contains(&format!("commit {COMMIT_A} (local cache")),
        "{err}"
    );
    let (out, err) = ok(&run(
        home2.path(),
        &hub.url,
        &offline,
        &with_ids(&["--model", "org/tiny", "--revision", "v1.0"]),
    ));
    assert_eq!(out, with_weights(&fixture("mixtral-odd")), "{err}");
}
