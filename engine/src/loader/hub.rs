//! `--model NAME|ORG/NAME`: the model's snapshot in the local Hugging Face cache, else downloaded
//! into it through the Hub's own Rust client (`hf-hub`, blocking API), in the layout every HF
//! tool shares: `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) /
//! `models--ORG--NAME/{blobs/<etag>, snapshots/<commit>/<file> -> ../../blobs/<etag>,
//! refs/<revision>}`.
//!
//! What this module adds around hf-hub, which does not do it: the choice of files (config.json,
//! the tokenizer and generation files the repo has, the safetensors index and only the shards it
//! names, or model.safetensors), a free-space check before starting, the sha256 check of every
//! LFS blob against its ETag (a mismatch deletes the blob), `HF_HUB_OFFLINE`, the token from
//! `HF_TOKEN` or the token file, errors that name the repo, file and HTTP status (a gated repo
//! says how to get access), and progress bars per file and overall. hf-hub itself resumes a
//! partial download (`blobs/<etag>.part`) and writes the blob, the snapshot symlink and the ref.

// User input and the network reach this module: no unwrap/expect/panic/unchecked indexing
// outside tests.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use crate::config::registry;
use crate::error::{Error, Result};
use crate::units::human_bytes;

pub use crate::fsio::hub_cache_dir;

/// Files fetched beside config.json when the repo has them (their absence is fine).
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];
const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The repository `--model` names: a known name's repo (configs/), or a repo id `ORG/NAME`.
pub fn repo_of(name: &str) -> Result<String> {
    match registry::find(name) {
        Some(m) => Ok(m.repo.to_string()),
        None if name.contains('/') => {
            if valid_repo_id(name) {
                Ok(name.to_string())
            } else {
                Err(Error::Input(format!(
                    "--model {name:?} is neither a folder nor a Hugging Face repo id ORG/NAME \
                     (letters, digits, '-', '_', '.'; no '--' or '..')"
                )))
            }
        }
        None => {
            let known: Vec<&str> = registry::KNOWN_MODELS.iter().map(|m| m.name).collect();
            Err(Error::Input(format!(
                "unknown model {name:?}; known names: {} (or give a Hugging Face repo id ORG/NAME, or --weights DIR)",
                known.join(", ")
            )))
        }
    }
}

/// The Hub's rule for repo ids: `ORG/NAME`, each part of `[A-Za-z0-9_.-]`, not starting or ending
/// with `-` or `.`, no `--` or `..`, at most 96 characters.
pub fn valid_repo_id(id: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    let mut parts = id.split('/');
    matches!((parts.next(), parts.next(), parts.next()), (Some(o), Some(n), None) if part(o) && part(n))
        && id.len() <= 96
}

/// `--revision`: a branch, tag or commit, as git allows ref names (it becomes a file under
/// `refs/` in the cache, so nothing that could leave that folder).
pub fn parse_revision(s: &str) -> std::result::Result<String, String> {
    let bad = s.is_empty()
        || s.len() > 255
        || s.starts_with(['/', '-', '.'])
        || s.ends_with(['/', '.'])
        || s.ends_with(".lock")
        || s.contains("..")
        || s.contains("//")
        || s.contains("@{")
        || s.split('/').any(|c| c.starts_with('.'))
        || s.chars().any(|c| {
            c.is_control()
                || c.is_whitespace()
                || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
        });
    if bad {
        Err(format!(
            "{s:?} is not a branch, tag or commit name (e.g. main, v1.0, refs/pr/1 or a 40-hex commit)"
        ))
    } else {
        Ok(s.to_string())
    }
}

/// `HF_HUB_OFFLINE=1` (or true/yes/on): only the local cache, never the network.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn env_nonempty(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// `$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token` (where
/// `huggingface-cli login` writes it).
pub fn token_file() -> PathBuf {
    if let Some(p) = env_nonempty("HF_TOKEN_PATH") {
        return PathBuf::from(p);
    }
    match env_nonempty("HF_HOME") {
        Some(h) => PathBuf::from(h).join("token"),
        None => PathBuf::from(env_nonempty("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/huggingface/token"),
    }
}

/// `$HF_TOKEN`, else the token file's content.
fn token() -> Option<String> {
    env_nonempty("HF_TOKEN")
        .map(|t| t.trim().to_string())
        .or_else(|| {
            std::fs::read_to_string(token_file())
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        })
}

/// `$HF_ENDPOINT` (a mirror, or a local Hub in the tests), else huggingface.co.
fn endpoint() -> Result<String> {
    let e = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into());
    let e = e.trim().trim_end_matches('/').to_string();
    if e.starts_with("http://") || e.starts_with("https://") {
        Ok(e)
    } else {
        Err(Error::Input(format!(
            "HF_ENDPOINT={e:?} is not an http:// or https:// URL"
        )))
    }
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The cached snapshot of `revision` (default main): through `refs/<revision>`, or the snapshot
/// folder itself for a commit; without `--revision`, in a cache without refs, the newest
/// snapshot that has a config.json. Returns the folder and its commit.
pub fn cached_snapshot(repo_dir: &Path, revision: Option<&str>) -> Option<(PathBuf, String)> {
    let snaps = repo_dir.join("snapshots");
    let rev = revision.unwrap_or("main");
    let with_config = |commit: &str| {
        let dir = snaps.join(commit);
        dir.join("config.json")
            .exists()
            .then(|| (dir, commit.to_string()))
    };
    if let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join(rev)) {
        if let Some(found) = with_config(commit.trim()) {
            return Some(found);
        }
    }
    if is_commit(rev) {
        if let Some(found) = with_config(rev) {
            return Some(found);
        }
    }
    // The newest snapshot stands for main only in a cache without refs (copied by hand): where
    // other revisions have refs, it may be one of them.
    let has_refs = std::fs::read_dir(repo_dir.join("refs")).is_ok_and(|mut d| d.next().is_some());
    if revision.is_some() || has_refs {
        return None;
    }
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("config.json").exists())
        .map(|p| {
            (
                p.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                p,
            )
        })
        .collect();
    candidates.sort();
    let (_, dir) = candidates.pop()?;
    let commit = dir.file_name()?.to_string_lossy().to_string();
    Some((dir, commit))
}

/// [`cached_snapshot`] of `repo` in the cache [`hub_cache_dir`] names (nothing downloaded).
pub fn cached(repo: &str, revision: Option<&str>) -> Option<(PathBuf, String)> {
    cached_snapshot(&repo_dir(&hub_cache_dir(), repo), revision)
}

/// The shard names of a safetensors index, in first-seen order (`None`: unreadable).
fn index_shards(index: &Path) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index).ok()?).ok()?;
    let mut out: Vec<String> = Vec::new();
    for f in v.get("weight_map")?.as_object()?.values() {
        let f = f.as_str()?.to_string();
        if !out.contains(&f) {
            out.push(f);
        }
    }
    Some(out)
}

/// A snapshot holds its weights: every shard its index names, or model.safetensors. (A snapshot
/// an interrupted download left is completed by a new download.)
fn weights_complete(dir: &Path) -> bool {
    let index = dir.join(INDEX);
    if index.exists() {
        // An unreadable index is left to the loader to name.
        index_shards(&index).is_none_or(|s| s.iter().all(|f| dir.join(f).exists()))
    } else {
        dir.join(SINGLE).exists()
    }
}

/// Resolves `--model NAME` (a name from `configs/`, or a repo id `ORG/NAME`) at `revision`
/// (default main) to a snapshot folder with config.json and the safetensors files: the local
/// cache first, else a download (refused under `HF_HUB_OFFLINE`). Prints one line naming the
/// snapshot.
pub fn resolve_model(name: &str, revision: Option<&str>) -> Result<PathBuf> {
    let repo = repo_of(name)?;
    let rev = revision.unwrap_or("main");
    let cache = hub_cache_dir();
    let dir = repo_dir(&cache, &repo);
    if let Some((snap, commit)) = cached_snapshot(&dir, revision) {
        if weights_complete(&snap) {
            eprintln!(
                "snapshot: {repo} revision {rev} commit {commit} (local cache {})",
                snap.display()
            );
            return Ok(snap);
        }
    }
    if offline() {
        return Err(Error::ModelNotFound {
            name: name.to_string(),
            repo: repo.clone(),
            looked_in: dir,
            hint: format!(
                "HF_HUB_OFFLINE is set, so nothing is downloaded (revision {rev}): unset it to download {repo}, \
                 or pass --weights DIR with config.json, tokenizer.json and the safetensors files."
            ),
        });
    }
    download(&repo, rev, &cache)
}

/// What the Hub says of a repo at a revision (`/api/models/ORG/NAME/revision/REV?blobs=true`).
#[derive(Deserialize)]
struct Info {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
}

/// One download session: the repo, its revision and what errors need to say.
struct Fetch<'a> {
    repo: &'a str,
    rev: &'a str,
    endpoint: String,
    token_sent: bool,
    api: ApiRepo,
    info: Info,
    snapshot: PathBuf,
}

fn download(repo: &str, rev: &str, cache: &Path) -> Result<PathBuf> {
    let endpoint = endpoint()?;
    let tok = token();
    let token_sent = tok.is_some();
    let ctx = |file: Option<&'static str>| HubCtx {
        repo,
        rev,
        file,
        endpoint: &endpoint,
        token_sent,
    };
    let api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_endpoint(endpoint.clone())
        .with_token(tok)
        .with_progress(false)
        .with_retries(3)
        .with_user_agent("moe-run", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| ctx(None).error(e))?
        .repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            rev.to_string(),
        ));
    let info: Info = match api.info_request().query("blobs", "true").call() {
        Ok(resp) => {
            let text = resp
                .into_string()
                .map_err(|e| ctx(None).error(ApiError::IoError(e)))?;
            serde_json::from_str(&text).map_err(|e| {
                ctx(None).msg(format!(
                    "the Hub's model info is not what was expected: {e}"
                ))
            })?
        }
        Err(e) => return Err(ctx(None).error(ApiError::RequestError(Box::new(e)))),
    };
    if !is_commit(&info.sha) {
        return Err(ctx(None).msg(format!(
            "the Hub named commit {:?}, not a 40-hex sha",
            info.sha
        )));
    }
    let snapshot = repo_dir(cache, repo).join("snapshots").join(&info.sha);
    let f = Fetch {
        repo,
        rev,
        endpoint: endpoint.clone(),
        token_sent,
        api,
        info,
        snapshot,
    };
    f.run()
}

impl Fetch<'_> {
    fn ctx<'b>(&'b self, file: Option<&'b str>) -> HubCtx<'b> {
        HubCtx {
            repo: self.repo,
            rev: self.rev,
            file,
            endpoint: &self.endpoint,
            token_sent: self.token_sent,
        }
    }

    /// The repo's file names, for messages.
    fn file_list(&self) -> String {
        let names: Vec<&str> = self
            .info
            .siblings
            .iter()
            .map(|s| s.rfilename.as_str())
            .collect();
        names.join(", ")
    }

    fn sibling(&self, f: &str) -> Option<&Sibling> {
        self.info.siblings.iter().find(|s| s.rfilename == f)
    }

    fn run(&self) -> Result<PathBuf> {
        if self.sibling("config.json").is_none() {
            return Err(self.ctx(None).msg(format!(
                "the repo has no config.json, so it is not a transformers checkpoint (files: {})",
                self.file_list()
            )));
        }
        let mut first: Vec<String> = vec!["config.json".into()];
        first.extend(
            SIDE_FILES
                .iter()
                .filter(|f| self.sibling(f).is_some())
                .map(|f| f.to_string()),
        );
        let sharded = self.sibling(INDEX).is_some();
        if sharded {
            first.push(INDEX.into());
        } else if self.sibling(SINGLE).is_none() {
            return Err(self.ctx(None).msg(format!(
                "the repo has neither {SINGLE} nor {INDEX}; moe-run reads safetensors only (files: {})",
                self.file_list()
            )));
        }
        if !sharded {
            // One free-space check for all the files.
            first.push(SINGLE.into());
        }
        let t0 = Instant::now();
        let mut got = (0usize, 0u64);
        self.fetch_all(&first, &mut got)?;
        let weights = if sharded {
            let shards = index_shards(&self.snapshot.join(INDEX)).ok_or_else(|| {
                self.ctx(Some(INDEX))
                    .msg("no readable \"weight_map\" of shard file names".into())
            })?;
            for s in &shards {
                let plain = !s.is_empty() && !s.contains(['/', '\\']) && !s.starts_with('.');
                if !plain || self.sibling(s).is_none() {
                    return Err(self.ctx(Some(INDEX)).msg(format!(
                        "names shard {s:?}, which is not a file of the repo"
                    )));
                }
            }
            shards
        } else {
            Vec::new()
        };
        self.fetch_all(&weights, &mut got)?;
        if let Some(repo_dir) = self.snapshot.ancestors().nth(2) {
            let r = repo_dir.join("refs").join(self.rev);
            if self.rev == self.info.sha {
                // hf-hub writes a ref named by the commit itself; huggingface_hub writes none.
                let _ = std::fs::remove_file(r);
            } else if let Some(parent) = r.parent() {
                // hf-hub writes the ref with each file; when every file was already a blob, no
                // download wrote it.
                std::fs::create_dir_all(parent)
                    .and_then(|_| std::fs::write(&r, &self.info.sha))
                    .map_err(|e| Error::io(&r, e))?;
            }
        }
        eprintln!(
            "snapshot: {} revision {} commit {} (downloaded {} files, {} in {:.1}s, into {})",
            self.repo,
            self.rev,
            self.info.sha,
            got.0,
            human_bytes(got.1),
            t0.elapsed().as_secs_f64(),
            self.snapshot.display()
        );
        Ok(self.snapshot.clone())
    }

    /// Downloads the `files` the snapshot lacks, after checking the free space for them.
    fn fetch_all(&self, files: &[String], got: &mut (usize, u64)) -> Result<()> {
        let todo: Vec<&String> = files
            .iter()
            .filter(|f| !self.snapshot.join(f).exists() && !self.link_cached_blob(f))
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let total: u64 = todo
            .iter()
            .filter_map(|f| self.sibling(f).and_then(|s| s.size))
            .sum();
        let cache = self.snapshot.ancestors().nth(3).unwrap_or(&self.snapshot);
        if let Some(free) = free_space(cache) {
            // A margin of 1% + 64 MiB for what else writes to the disk meanwhile.
            let need = total + total / 100 + (64 << 20);
            if need > free {
                return Err(self.ctx(None).msg(format!(
                    "the files to download ({}) need {} but only {} is free on the disk of {}; \
                     free space there, or point HF_HUB_CACHE (or HF_HOME) at a larger disk",
                    todo.len(),
                    human_bytes(total),
                    human_bytes(free),
                    cache.display()
                )));
            }
        }
        let bars = Bars::new(total, todo.len());
        for f in todo {
            let size = self.sibling(f).and_then(|s| s.size).unwrap_or(0);
            let progress = bars.file(f, self.repo);
            let api = &self.api;
            // hf-hub unwraps a few things a misbehaving server controls (a redirect without a
            // Location): its panic becomes this file's error, without the panic message.
            let hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                api.download_with_progress(f, progress)
            }));
            std::panic::set_hook(hook);
            let pointer = match r {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => return Err(self.ctx(Some(f)).error(e)),
                Err(payload) => {
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown failure".into());
                    return Err(self.ctx(Some(f)).msg(format!(
                        "the hf-hub client failed on the server's answer ({why}); is {} a Hugging Face Hub?",
                        self.endpoint
                    )));
                }
            };
            self.verify(f, &pointer)?;
            bars.done(size);
            got.0 += 1;
            got.1 += size;
        }
        bars.finish();
        Ok(())
    }

    /// An LFS file whose blob another revision already brought (`blobs/<sha256>`): linked into
    /// this snapshot as huggingface_hub does, instead of downloaded again. False when it is not
    /// there (or the link cannot be made: the download then does it).
    fn link_cached_blob(&self, file: &str) -> bool {
        let Some(sha) = self
            .sibling(file)
            .and_then(|s| s.lfs.as_ref())
            .map(|l| &l.sha256)
        else {
            return false;
        };
        let Some(repo_dir) = self.snapshot.ancestors().nth(2) else {
            return false;
        };
        let plain = !file.contains(['/', '\\']) && !file.starts_with('.');
        if !plain || !repo_dir.join("blobs").join(sha).is_file() {
            eprintln!(
                "DEBUG no blob {}",
                repo_dir.join("blobs").join(sha).display()
            );
            return false;
        }
        #[cfg(unix)]
        {
            std::fs::create_dir_all(&self.snapshot).is_ok()
                && std::os::unix::fs::symlink(
                    Path::new("../../blobs").join(sha),
                    self.snapshot.join(file),
                )
                .is_ok()
        }
        #[cfg(not(unix))]
        {
            false
        }
    }

    /// Checks the blob behind `pointer` against its sha256: the repo's LFS sha256, else the blob's
    /// name (the ETag) when it is a sha256. A mismatch deletes the blob, the snapshot's link to it
    /// and hf-hub's lock file.
    fn verify(&self, file: &str, pointer: &Path) -> Result<()> {
        let blob = pointer.canonicalize().map_err(|e| Error::io(pointer, e))?;
        let etag = blob
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let is_sha256 = |s: &str| s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
        let expected = match self.sibling(file).and_then(|s| s.lfs.as_ref()) {
            Some(l) => Some(l.sha256.to_ascii_lowercase()),
            None if is_sha256(&etag) => Some(etag.to_ascii_lowercase()),
            None => None,
        };
        let Some(expected) = expected else {
            return Ok(());
        };
        let actual = sha256_file(&blob)?;
        if actual == expected && (!is_sha256(&etag) || etag.eq_ignore_ascii_case(&expected)) {
            return Ok(());
        }
        let _ = std::fs::remove_file(pointer);
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(blob.with_extension("lock"));
        Err(self.ctx(Some(file)).msg(format!(
            "the downloaded bytes have sha256 {actual}, not the {expected} the Hub announced (ETag): \
             the download is corrupt and was deleted ({}); run again to download it anew",
            blob.display()
        )))
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Free bytes for an unprivileged writer on the disk of `path` (or of its nearest existing
/// ancestor); `None` where it cannot be asked.
pub fn free_space(path: &Path) -> Option<u64> {
    let p = path.ancestors().find(|a| a.exists())?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated and `s` a valid place to write the answer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return None;
        }
        #[allow(clippy::useless_conversion)] // c_ulong/fsblkcnt_t are u64 here, not everywhere
        Some(u64::from(s.f_bavail).saturating_mul(u64::from(s.f_frsize)))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = p;
        None
    }
}

/// What a Hub error names: the repo, revision and file, and what explains a 401/403.
struct HubCtx<'a> {
    repo: &'a str,
    rev: &'a str,
    file: Option<&'a str>,
    endpoint: &'a str,
    token_sent: bool,
}

impl HubCtx<'_> {
    fn msg(&self, msg: String) -> Error {
        let what = match self.file {
            Some(f) => format!("{} (revision {}) file {f}", self.repo, self.rev),
            None => format!("{} (revision {})", self.repo, self.rev),
        };
        Error::Hub { what, msg }
    }

    fn error(&self, e: ApiError) -> Error {
        let text = match e {
            ApiError::RequestError(b) => match *b {
                ureq::Error::Status(code, resp) => {
                    let kind = resp.header("x-error-code").unwrap_or("").to_string();
                    let body = resp.into_string().unwrap_or_default();
                    let said = serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                        .unwrap_or_else(|| body.chars().take(200).collect());
                    self.status(code, &kind, said.trim())
                }
                ureq::Error::Transport(t) => format!(
                    "cannot reach {}: {t}. Without network, HF_HUB_OFFLINE=1 uses only the local cache; \
                     HF_ENDPOINT names a mirror",
                    self.endpoint
                ),
            },
            ApiError::MissingHeader(h) => format!(
                "the server's answer lacks the {h} header: is {} (HF_ENDPOINT) a Hugging Face Hub?",
                self.endpoint
            ),
            ApiError::InvalidResume => "a partial download of it (blobs/<etag>.part in the cache) \
                 is longer than the file: delete that .part file and run again"
                .to_string(),
            ApiError::LockAcquisition(p) => format!(
                "another download holds {} (waited 5 s); run again once it is done",
                p.display()
            ),
            other => other.to_string(),
        };
        self.msg(text)
    }

    fn status(&self, code: u16, kind: &str, said: &str) -> String {
        let said = if said.is_empty() {
            String::new()
        } else {
            format!(" ({said})")
        };
        let page = format!("{}/{}", self.endpoint, self.repo);
        match (code, kind) {
            (401 | 403, "GatedRepo") | (403, "") | (401, "") => {
                let who = if self.token_sent {
                    "the token sent (HF_TOKEN or the token file) has no access to it"
                } else {
                    "no Hugging Face token was sent"
                };
                format!(
                    "HTTP {code}: the repo is gated{said}: {who}. To get access: log in on {page} and accept \
                     the model's terms, create a read token at {}/settings/tokens, then set HF_TOKEN=hf_... \
                     or save it in {} (`huggingface-cli login` does)",
                    self.endpoint,
                    token_file().display()
                )
            }
            (_, "RepoNotFound") => format!(
                "HTTP {code}: no such repository at {}{said}; check the name (a private repo also needs HF_TOKEN)",
                self.endpoint
            ),
            (_, "RevisionNotFound") => format!(
                "HTTP {code}: the repo has no revision {:?} (branch, tag or commit){said}",
                self.rev
            ),
            (404, _) if self.file.is_none() => format!(
                "HTTP 404: no such repository or revision at {}{said}",
                self.endpoint
            ),
            (404, _) => format!("HTTP 404: the file is not in this revision{said}"),
            _ => format!("HTTP {code} from {}{said}", self.endpoint),
        }
    }
}

/// Download progress on stderr: on a terminal a bar per file and one overall; otherwise one line
/// when a file starts and one when it is done.
struct Bars {
    tty: bool,
    multi: MultiProgress,
    overall: ProgressBar,
    base: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Bars {
    fn new(total: u64, files: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        let overall = multi.add(ProgressBar::new(total));
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            overall.set_style(style.progress_chars("=> "));
        }
        overall.set_message(format!("total ({files} files)"));
        Self {
            tty,
            multi,
            overall,
            base: Default::default(),
        }
    }

    fn file(&self, name: &str, repo: &str) -> FileProgress {
        let bar = if self.tty {
            let b = self.multi.insert_before(&self.overall, ProgressBar::new(0));
            if let Ok(style) = ProgressStyle::with_template(
                "{msg:>30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        } else {
            ProgressBar::hidden()
        };
        FileProgress {
            tty: self.tty,
            bar,
            overall: self.overall.clone(),
            base: self.base.load(std::sync::atomic::Ordering::Relaxed),
            pos: 0,
            announced: false,
            label: format!("{repo} {name}"),
            start: Instant::now(),
            size: 0,
        }
    }

    fn done(&self, size: u64) {
        let b = self
            .base
            .fetch_add(size, std::sync::atomic::Ordering::Relaxed)
            + size;
        self.overall.set_position(b);
    }

    fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

/// hf-hub's progress callback for one file: it may call `init` twice (the second time on a
/// resumed download, followed by the bytes already there).
struct FileProgress {
    tty: bool,
    bar: ProgressBar,
    overall: ProgressBar,
    base: u64,
    pos: u64,
    announced: bool,
    label: String,
    start: Instant,
    size: u64,
}

impl Progress for FileProgress {
    fn init(&mut self, size: usize, filename: &str) {
        self.size = size as u64;
        self.pos = 0;
        self.bar.set_length(size as u64);
        self.bar.set_position(0);
        let short: String = filename
            .chars()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        self.bar.set_message(short);
        if !self.tty && !self.announced {
            eprintln!("download {} ({})", self.label, human_bytes(size as u64));
        }
        self.announced = true;
    }

    fn update(&mut self, size: usize) {
        self.pos += size as u64;
        self.bar.set_position(self.pos);
        self.overall.set_position(self.base + self.pos);
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
        if !self.tty {
            let s = self.start.elapsed().as_secs_f64();
            eprintln!(
                "download {} done: {} in {s:.1}s",
                self.label,
                human_bytes(self.pos)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_through_refs() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--m");
        let a = "a".repeat(40);
        std::fs::create_dir_all(repo.join("snapshots").join(&a)).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("snapshots").join(&a).join("config.json"), "{}").unwrap();
        std::fs::write(repo.join("snapshots/old/config.json"), "{}").unwrap();
        std::fs::write(repo.join("refs/main"), format!("{a}\n")).unwrap();
        std::fs::write(repo.join("refs/v1"), "old").unwrap();
        let snap = |r| cached_snapshot(&repo, r);
        assert_eq!(
            snap(None).unwrap(),
            (repo.join("snapshots").join(&a), a.clone())
        );
        assert_eq!(snap(Some("v1")).unwrap().1, "old");
        // A commit is its own snapshot folder; an unknown revision is not the newest snapshot.
        assert_eq!(snap(Some(a.as_str())).unwrap().1, a);
        assert!(snap(Some("v2")).is_none());
        // Without refs/main, another revision's snapshot is not main's; without any ref, the
        // newest snapshot is.
        std::fs::remove_file(repo.join("refs/main")).unwrap();
        assert!(snap(None).is_none());
        std::fs::remove_file(repo.join("refs/v1")).unwrap();
        assert!(snap(None).is_some());
        assert!(cached_snapshot(&tmp.path().join("models--none--x"), None).is_none());
    }

    #[test]
    fn repo_ids_and_revisions() {
        for ok in ["org/name", "mistralai/Mixtral-8x7B-v0.1", "a_b/c.d"] {
            assert!(valid_repo_id(ok), "{ok}");
        }
        for bad in [
            "org/", "/x", "a/b/c", "a--b/c", "a/..", "./x", "a/b c", "a/-x",
        ] {
            assert!(!valid_repo_id(bad), "{bad}");
        }
        for ok in ["main", "v1.0", "refs/pr/1", &"f".repeat(40)] {
            assert!(parse_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/../b",
            "a b",
            "/abs",
            "x.lock",
            "a//b",
            "-x",
            "a/.hidden",
            "x:y",
        ] {
            assert!(parse_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn complete_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert!(!weights_complete(d));
        std::fs::write(
            d.join(INDEX),
            r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors","c":"s1.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(
            index_shards(&d.join(INDEX)).unwrap(),
            ["s1.safetensors", "s2.safetensors"]
        );
        std::fs::write(d.join("s1.safetensors"), "").unwrap();
        assert!(!weights_complete(d));
        std::fs::write(d.join("s2.safetensors"), "").unwrap();
        assert!(weights_complete(d));
        assert!(free_space(&d.join("not/yet")).is_some_and(|f| f > 0));
    }
}
