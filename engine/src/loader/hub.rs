//! Finding a model in the local Hugging Face cache without any network access. The layout is
//! `$HF_HUB_CACHE` (else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) /
//! `models--ORG--NAME/snapshots/REV/`, with `refs/main` naming the current REV.

use std::path::{Path, PathBuf};

use crate::config::registry;
use crate::error::{Error, Result};

pub use crate::fsio::hub_cache_dir;

/// Resolves `--model NAME` (a name from `configs/`, or a repository id `ORG/NAME`) to a
/// snapshot directory holding config.json and the safetensors files.
pub fn resolve_model(name: &str) -> Result<PathBuf> {
    let repo = match registry::find(name) {
        Some(m) => m.repo.to_string(),
        None if name.contains('/') => name.to_string(),
        None => {
            let known: Vec<&str> = registry::KNOWN_MODELS.iter().map(|m| m.name).collect();
            return Err(Error::Input(format!(
                "unknown model {name:?}; known names: {} (or give a Hugging Face repo id ORG/NAME, or --weights DIR)",
                known.join(", ")
            )));
        }
    };
    let cache = hub_cache_dir();
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    match snapshot_dir(&repo_dir) {
        Some(dir) => Ok(dir),
        None => Err(Error::ModelNotFound {
            name: name.to_string(),
            hint: format!(
                "Download it with `huggingface-cli download {repo} --include '*.json' '*.safetensors'` \
                 (it lands in {}), or pass --weights DIR with config.json, tokenizer.json and the safetensors files.",
                repo_dir.display()
            ),
            repo,
            looked_in: repo_dir,
        }),
    }
}

/// The snapshot `refs/main` points to, else the only (or newest) snapshot that has a config.json.
fn snapshot_dir(repo_dir: &Path) -> Option<PathBuf> {
    let snaps = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs/main")) {
        let dir = snaps.join(rev.trim());
        if dir.join("config.json").exists() {
            return Some(dir);
        }
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
    candidates.pop().map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_snapshot_through_refs_main() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("models--org--m");
        std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("snapshots/abc/config.json"), "{}").unwrap();
        std::fs::write(repo.join("snapshots/old/config.json"), "{}").unwrap();
        std::fs::write(repo.join("refs/main"), "abc\n").unwrap();
        assert_eq!(snapshot_dir(&repo).unwrap(), repo.join("snapshots/abc"));
        assert!(snapshot_dir(&tmp.path().join("models--none--x")).is_none());
    }
}
