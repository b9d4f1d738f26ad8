//! Every file moe-run writes goes through here, so that no write can lose data:
//! - a file is written under a temporary name in its destination folder and renamed into place
//!   only when complete ([`write_atomic`]); a folder of several files is built in a temporary
//!   folder and renamed (or its files renamed) into place at the end ([`StagedDir`]). An error or
//!   a crash leaves the old file or nothing, never a truncated one;
//! - before anything is written, [`check_output`] refuses an output that is, contains, lies in,
//!   or resolves through symlinks to an input, that lies in a Hugging Face cache, or that exists
//!   already (without `--force`);
//! - files get the usual `0o666 & !umask` permissions (a plain temporary file would be 0600).
//!
//! Errors print paths as the user gave them; the canonical forms are only compared.

// User input reaches this module: no unwrap/expect/panic/unchecked indexing outside tests
// (checked by `cargo clippy`; a proven-safe exception carries its own `allow` and reason).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `text` to stdout. A failed write is an `Error::Io` on the path "stdout" (a closed pipe,
/// as in `moe-run ... | head`, ends the program quietly in [`crate::cli::main`]).
pub fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("stdout", e))
}

/// The Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = env("HF_HOME") {
        return p.join("hub");
    }
    env("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/huggingface/hub")
}

/// `path` with every symlink resolved, also when its last components do not exist yet (the
/// deepest existing ancestor is canonicalized and the rest appended, `..` applied lexically).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut base = abs.as_path();
    let mut rest: Vec<Component> = Vec::new();
    loop {
        if let Ok(c) = base.canonicalize() {
            let mut out = c;
            for comp in rest.iter().rev() {
                match comp {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c.as_os_str()),
                }
            }
            return out;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                base = parent;
            }
            _ => return abs,
        }
    }
}

/// The Hugging Face cache `path` lies in, if any: under [`hub_cache_dir`], or under any folder
/// laid out as a cache repository (`models--ORG--NAME` holding `snapshots/` or `blobs/`).
pub fn hf_cache_containing(path: &Path) -> Option<PathBuf> {
    let p = resolve(path);
    let cache = resolve(&hub_cache_dir());
    if p.starts_with(&cache) {
        return Some(cache);
    }
    p.ancestors()
        .find(|a| {
            let name = a.file_name().and_then(|n| n.to_str()).unwrap_or("");
            ["models--", "datasets--", "spaces--"]
                .iter()
                .any(|pre| name.starts_with(pre))
                && (a.join("snapshots").is_dir() || a.join("blobs").is_dir())
        })
        .map(Path::to_path_buf)
}

/// What an output may not touch: input files and folders, each also through its symlinks.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    paths: Vec<PathBuf>,
}

impl Inputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A file, or a folder together with every file in it (each resolved on its own, so that a
    /// Hugging Face snapshot's symlinks into `blobs/` are covered).
    pub fn with(mut self, path: &Path) -> Self {
        self.paths.push(path.to_path_buf());
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                self.paths.extend(entries.flatten().map(|e| e.path()));
            }
        }
        self
    }
}

/// Refuses, before anything is written, an output `out` (a file or a folder) that
/// - is an input, lies inside an input folder, contains an input, or resolves to one of these
///   through symlinks;
/// - lies in a Hugging Face cache (only the hub download may write there);
/// - already exists (a folder: is not empty) and `force` is not given.
///
/// `flag` is the option that named `out`, for the message.
pub fn check_output(out: &Path, flag: &str, inputs: &Inputs, force: bool) -> Result<()> {
    let refuse = |why: String| Err(Error::Input(format!("{flag} {}: {why}", out.display())));
    if let Some(cache) = hf_cache_containing(out) {
        return refuse(format!(
            "this is inside the Hugging Face cache {}, which moe-run never writes to; choose a folder outside it",
            cache.display()
        ));
    }
    let o = resolve(out);
    for input in &inputs.paths {
        let i = resolve(input);
        let why = if o == i {
            "is an input"
        } else if o.starts_with(&i) {
            "lies inside the input folder"
        } else if i.starts_with(&o) {
            "contains the input"
        } else {
            continue;
        };
        return refuse(format!(
            "{why} {}; write the output somewhere else",
            input.display()
        ));
    }
    let exists = match std::fs::symlink_metadata(out) {
        Ok(m) if m.is_dir() => std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some(),
        Ok(_) => true,
        Err(_) => false,
    };
    if exists && !force {
        return refuse("already exists; pass --force to replace it".into());
    }
    Ok(())
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary-file builder whose files (0o666) and folders (0o777) get the umask applied by the
/// kernel at creation, like any other file (tempfile's default is 0o600 / 0o700).
fn builder<'a>(prefix: &'a str, dir: bool) -> tempfile::Builder<'a, 'a> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(if dir {
            0o777
        } else {
            0o666
        }));
    }
    #[cfg(not(unix))]
    let _ = dir;
    b
}

/// The mode of a new plain file in folder `dir` (created 0o777 & !umask): 0o666 & !umask.
fn file_mode_in(dir: &Path) -> std::io::Result<std::fs::Permissions> {
    #[allow(unused_mut)]
    let mut p = std::fs::metadata(dir)?.permissions();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        p.set_mode(p.mode() & 0o666);
    }
    Ok(p)
}

/// Writes `path` atomically: `write` fills a temporary file (given by its path) in the same
/// folder, which is synced and renamed over `path` only if `write` succeeded. On error the
/// temporary file is removed and `path` is as it was.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = folder_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.");
    let tmp = builder(&prefix, false)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, e))?;
    let mode = tmp
        .as_file()
        .metadata()
        .map_err(|e| Error::io(path, e))?
        .permissions();
    write(tmp.path())?;
    // The writer may have replaced the file (safetensors writes its own 0600 temporary file and
    // renames it): give what is at the path now the mode ours was created with, and sync it.
    std::fs::set_permissions(tmp.path(), mode)
        .and_then(|_| std::fs::File::open(tmp.path()))
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// [`write_atomic`] of a byte string.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(path, e))
    })
}

/// An output folder built in a temporary folder and put in place by [`StagedDir::commit`]:
/// renamed to the destination when that does not exist, else each file renamed into it
/// (replacing files of the same name: the caller checked `--force`). Dropped without a commit,
/// the temporary folder and everything in it are removed.
pub struct StagedDir {
    tmp: tempfile::TempDir,
    out: PathBuf,
    into_existing: bool,
}

impl StagedDir {
    /// Stages `out`, whose parent folder must exist.
    pub fn new(out: &Path) -> Result<Self> {
        let into_existing = out.is_dir();
        let parent = if into_existing { out } else { folder_of(out) };
        if !parent.is_dir() {
            return Err(Error::io(
                parent,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the output's parent folder does not exist",
                ),
            ));
        }
        let tmp = builder(".moe-run-staging.", true)
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?;
        Ok(StagedDir {
            tmp,
            out: out.to_path_buf(),
            into_existing,
        })
    }

    /// Where to write file `name` now.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// The final path of file `name`, for messages.
    pub fn final_path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// Syncs every staged file and moves them into place.
    pub fn commit(self) -> Result<()> {
        let staged = self.tmp.path().to_path_buf();
        let files: Vec<PathBuf> = std::fs::read_dir(&staged)
            .map_err(|e| Error::io(&self.out, e))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(&self.out, e))?;
        // Files get the staging folder's umask-derived mode less the execute bits (whatever
        // their writer chose: safetensors writes 0600, a copy keeps its source's mode).
        let mode = file_mode_in(&staged).map_err(|e| Error::io(&self.out, e))?;
        for f in &files {
            std::fs::set_permissions(f, mode.clone())
                .and_then(|_| std::fs::File::open(f))
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&self.out, e))?;
        }
        if self.into_existing {
            for f in &files {
                let dst = self.out.join(f.file_name().unwrap_or_default());
                std::fs::rename(f, &dst).map_err(|e| Error::io(&dst, e))?;
            }
            // `self.tmp` is removed (now empty) when dropped.
            Ok(())
        } else {
            let tmp = self.tmp.keep();
            std::fs::rename(&tmp, &self.out).map_err(|e| {
                let _ = std::fs::remove_dir_all(&tmp);
                Error::io(&self.out, e)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_write_replaces_whole_or_not_at_all() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.json");
        write_bytes(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        // A failing writer leaves the old content and no temporary file.
        let e = write_atomic(&p, |tmp| {
            std::fs::write(tmp, b"partial").unwrap();
            Err(Error::Input("boom".into()))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "temporary file left behind");
        #[cfg(unix)]
        assert_eq!(mode(&p), 0o666 & !umask(), "umask, not 0600");
    }

    #[cfg(unix)]
    fn umask() -> u32 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0o022)
    }

    #[test]
    fn staged_dir_appears_only_on_commit() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("q");
        let s = StagedDir::new(&out).unwrap();
        std::fs::write(s.path("x"), b"1").unwrap();
        assert!(!out.exists());
        drop(s);
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);

        let s = StagedDir::new(&out).unwrap();
        std::fs::write(s.path("x"), b"1").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(out.join("x")).unwrap(), b"1");
        #[cfg(unix)]
        assert_eq!(mode(&out), 0o777 & !umask());
        // Into an existing folder: files replaced, others kept, no staging folder left.
        std::fs::write(out.join("keep"), b"k").unwrap();
        let s = StagedDir::new(&out).unwrap();
        std::fs::write(s.path("x"), b"2").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(out.join("x")).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);
    }

    #[test]
    fn outputs_that_touch_inputs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("model");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        let inputs = Inputs::new().with(&d);
        let msg = |out: &Path, force| {
            check_output(out, "--out", &inputs, force)
                .unwrap_err()
                .to_string()
        };
        assert!(msg(&d, true).contains("is an input"));
        assert!(msg(&d.join("sub"), true).contains("inside the input folder"));
        assert!(msg(t.path(), true).contains("contains the input"));
        assert!(msg(&d.join("x/../config.json"), true).contains("--out"));
        // Through a symlink.
        #[cfg(unix)]
        {
            let link = t.path().join("link");
            std::os::unix::fs::symlink(&d, &link).unwrap();
            assert!(msg(&link, true).contains("is an input"));
        }
        // Existing output: only with --force.
        let other = t.path().join("other");
        assert!(check_output(&other, "--out", &inputs, false).is_ok());
        std::fs::create_dir(&other).unwrap();
        assert!(
            check_output(&other, "--out", &inputs, false).is_ok(),
            "empty"
        );
        std::fs::write(other.join("f"), "x").unwrap();
        assert!(msg(&other, false).contains("--force"));
        assert!(check_output(&other, "--out", &inputs, true).is_ok());
    }

    #[test]
    fn hugging_face_cache_is_recognised_by_layout() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        assert!(hf_cache_containing(&repo.join("snapshots/abc")).is_some());
        assert!(hf_cache_containing(&repo.join("snapshots/abc/new")).is_some());
        assert!(hf_cache_containing(&repo.join("blobs")).is_some());
        assert!(hf_cache_containing(t.path()).is_none());
        let e = check_output(&repo.join("snapshots/abc"), "--out", &Inputs::new(), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Hugging Face cache"), "{e}");
    }
}
