//! The one resolver of `--model` / `--weights` / `--config`, for every command: [`ModelRef`]
//! says what the user named; `analyze` reads only its config ([`ModelRef::config`]: known
//! models' configs are compiled in, no download needed), the commands that run a model need its
//! weights ([`ModelRef::source_at`]: a directory given, a snapshot in the local Hugging Face
//! cache or downloaded into it, or the embedded model).

use std::path::{Path, PathBuf};

use super::embedded::{Embedded, TINY_KJV};
use super::{hub, ModelSource};
use crate::config::registry::{self, KnownModel};
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// What `--model` / `--weights` / `--config` named.
#[derive(Clone)]
pub enum ModelRef {
    /// `--model tiny-kjv` (also the default of the commands that run a model).
    Embedded(&'static Embedded),
    /// A name from `configs/` (`--model mixtral-8x7b`), or its repo id.
    Known(&'static KnownModel),
    /// Any other `--model`: a Hugging Face repo id `ORG/NAME`, from the local cache or downloaded.
    Repo(String),
    /// `--weights DIR`: config.json, safetensors, tokenizer.
    Dir(PathBuf),
    /// `--config FILE` (analyze only: no weights).
    ConfigFile(PathBuf),
}

impl ModelRef {
    /// `--config` wins, then `--weights`, then `--model`; `None` when none is given.
    pub fn resolve(
        model: Option<&str>,
        weights: Option<&Path>,
        config: Option<&Path>,
    ) -> Option<ModelRef> {
        if let Some(c) = config {
            return Some(ModelRef::ConfigFile(c.to_path_buf()));
        }
        if let Some(d) = weights {
            return Some(ModelRef::Dir(d.to_path_buf()));
        }
        let name = model?;
        // A local folder given to --model is read as --weights (as transformers'
        // from_pretrained does: an existing directory wins over a Hub name).
        if Path::new(name).is_dir() {
            return Some(ModelRef::Dir(PathBuf::from(name)));
        }
        Some(if name.eq_ignore_ascii_case(TINY_KJV.name) {
            ModelRef::Embedded(&TINY_KJV)
        } else if let Some(m) = registry::find(name) {
            ModelRef::Known(m)
        } else {
            ModelRef::Repo(name.to_string())
        })
    }

    /// A display name and the parsed config, with nothing downloaded: [`ModelRef::config_at`]
    /// the default revision.
    pub fn config(&self) -> Result<(String, ModelConfig)> {
        self.config_at(None)
    }

    /// A display name and the parsed config, with nothing downloaded. One rule for a known model
    /// by either spelling (`mixtral-8x7b`, `mistralai/Mixtral-8x7B-v0.1`): the config.json of its
    /// snapshot in the local Hugging Face cache (at `revision`, default main) when there is one
    /// (what `--model` would run), else the built-in copy from `configs/` (not with
    /// `--revision`, which names a snapshot). Any other repo id needs its snapshot in the cache.
    pub fn config_at(&self, revision: Option<&str>) -> Result<(String, ModelConfig)> {
        let cached = |repo: &str| hub::cached(repo, revision);
        match self {
            ModelRef::Embedded(e) => Ok((format!("{} (embedded)", e.name), e.config()?)),
            ModelRef::Known(m) => match cached(m.repo) {
                Some((dir, commit)) => Ok((
                    format!("{} ({}, cached snapshot {commit})", m.name, m.repo),
                    ModelConfig::from_file(&dir.join("config.json"))?,
                )),
                None if revision.is_some() => Err(not_cached(m.name, m.repo, revision)),
                None => Ok((
                    format!("{} ({}, built-in config)", m.name, m.repo),
                    ModelConfig::from_json_str(
                        m.config_json,
                        format!("configs ({})", m.name).as_ref(),
                    )?,
                )),
            },
            ModelRef::Repo(name) => {
                let repo = hub::repo_of(name)?;
                let (dir, commit) =
                    cached(&repo).ok_or_else(|| not_cached(name, &repo, revision))?;
                Ok((
                    format!("{name} (cached snapshot {commit})"),
                    ModelConfig::from_file(&dir.join("config.json"))?,
                ))
            }
            ModelRef::Dir(dir) => Ok((
                dir.display().to_string(),
                ModelConfig::from_file(&dir.join("config.json"))?,
            )),
            ModelRef::ConfigFile(path) => {
                Ok((path.display().to_string(), ModelConfig::from_file(path)?))
            }
        }
    }

    /// Where the weights are at the default revision ([`ModelRef::source_at`]).
    pub fn source(&self) -> Result<ModelSource> {
        self.source_at(None)
    }

    /// Where the weights are: the directory given, the snapshot of `revision` (default main) in
    /// the local Hugging Face cache or downloaded into it ([`hub::resolve_model`]), or the
    /// embedded model.
    pub fn source_at(&self, revision: Option<&str>) -> Result<ModelSource> {
        if let (Some(r), ModelRef::Embedded(_) | ModelRef::Dir(_) | ModelRef::ConfigFile(_)) =
            (revision, self)
        {
            return Err(Error::Input(format!(
                "--revision {r} names a snapshot of a Hugging Face repo; it does not apply to a local folder or the embedded model"
            )));
        }
        match self {
            ModelRef::Embedded(e) => Ok(ModelSource::Embedded(e)),
            ModelRef::Known(m) => Ok(ModelSource::Dir(hub::resolve_model(m.name, revision)?)),
            ModelRef::Repo(name) => Ok(ModelSource::Dir(hub::resolve_model(name, revision)?)),
            ModelRef::Dir(dir) => Ok(ModelSource::Dir(dir.clone())),
            ModelRef::ConfigFile(path) => Err(Error::Input(format!(
                "--config {} has no weights; give --weights DIR or --model NAME",
                path.display()
            ))),
        }
    }
}

/// A repo whose config is not in the local cache, for the commands that read only a config.
fn not_cached(name: &str, repo: &str, revision: Option<&str>) -> Error {
    let rev = revision.unwrap_or("main");
    Error::ModelNotFound {
        name: name.to_string(),
        repo: repo.to_string(),
        looked_in: hub::hub_cache_dir().join(format!("models--{}", repo.replace('/', "--"))),
        hint: format!(
            "Only reading a config, this command downloads nothing: `moe-run --model {repo} --revision {rev} --max-new-tokens 0 --ids 1` \
             downloads the model, or pass --config FILE."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_resolver_for_every_command() {
        let p = Path::new;
        let kind = |r: Option<ModelRef>| match r {
            None => "none",
            Some(ModelRef::Embedded(_)) => "embedded",
            Some(ModelRef::Known(_)) => "known",
            Some(ModelRef::Repo(_)) => "repo",
            Some(ModelRef::Dir(_)) => "dir",
            Some(ModelRef::ConfigFile(_)) => "config",
        };
        assert_eq!(kind(ModelRef::resolve(None, None, None)), "none");
        assert_eq!(
            kind(ModelRef::resolve(Some("TINY-KJV"), None, None)),
            "embedded"
        );
        assert_eq!(
            kind(ModelRef::resolve(Some("mixtral-8x7b"), None, None)),
            "known"
        );
        assert_eq!(kind(ModelRef::resolve(Some("org/x"), None, None)), "repo");
        // --config, then --weights, win over --model.
        let r = ModelRef::resolve(Some("dbrx"), Some(p("w")), Some(p("c.json")));
        assert_eq!(kind(r), "config");
        assert_eq!(
            kind(ModelRef::resolve(Some("dbrx"), Some(p("w")), None)),
            "dir"
        );
        // Known models' configs are compiled in: no cache needed to analyze them.
        let (name, cfg) = ModelRef::resolve(Some("mixtral-8x7b"), None, None)
            .unwrap()
            .config()
            .unwrap();
        assert!(name.contains("mistralai/Mixtral-8x7B-v0.1"), "{name}");
        assert_eq!(cfg.num_layers(), 32);
        // A config file has no weights to run.
        let e = ModelRef::ConfigFile("c.json".into())
            .source()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("--config c.json has no weights"), "{e}");
        // An unknown bare name is refused with the known names.
        let e = ModelRef::resolve(Some("nope"), None, None)
            .unwrap()
            .config()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("unknown model \"nope\"") && e.contains("mixtral-8x7b"),
            "{e}"
        );
    }
}
