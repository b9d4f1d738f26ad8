//! The one resolver of `--model` / `--weights` / `--config`, for every command: [`ModelRef`]
//! says what the user named; `analyze` reads only its config ([`ModelRef::config`]: known
//! models' configs are compiled in, no download needed), the commands that run a model need its
//! weights ([`ModelRef::source`]: a directory given or found in the local Hugging Face cache, or
//! the embedded model).

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
    /// A name from `configs/` (`--model mixtral-8x7b`).
    Known(&'static KnownModel),
    /// Any other `--model`: a Hugging Face repo id `ORG/NAME`, read from the local cache.
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
        Some(if name.eq_ignore_ascii_case(TINY_KJV.name) {
            ModelRef::Embedded(&TINY_KJV)
        } else if let Some(m) = registry::find(name) {
            ModelRef::Known(m)
        } else {
            ModelRef::Repo(name.to_string())
        })
    }

    /// A display name and the parsed config. Known models use their compiled-in config; a repo
    /// id reads config.json from the local Hugging Face cache (the error names the known models
    /// and how to download).
    pub fn config(&self) -> Result<(String, ModelConfig)> {
        match self {
            ModelRef::Embedded(e) => Ok((format!("{} (embedded)", e.name), e.config()?)),
            ModelRef::Known(m) => Ok((
                format!("{} ({})", m.name, m.repo),
                ModelConfig::from_json_str(
                    m.config_json,
                    format!("configs ({})", m.name).as_ref(),
                )?,
            )),
            ModelRef::Repo(name) => {
                let dir = hub::resolve_model(name)?;
                Ok((
                    name.clone(),
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

    /// Where the weights are: the directory given, the snapshot in the local Hugging Face cache
    /// (an error saying how to download it when absent), or the embedded model.
    pub fn source(&self) -> Result<ModelSource> {
        match self {
            ModelRef::Embedded(e) => Ok(ModelSource::Embedded(e)),
            ModelRef::Known(m) => Ok(ModelSource::Dir(hub::resolve_model(m.name)?)),
            ModelRef::Repo(name) => Ok(ModelSource::Dir(hub::resolve_model(name)?)),
            ModelRef::Dir(dir) => Ok(ModelSource::Dir(dir.clone())),
            ModelRef::ConfigFile(path) => Err(Error::Input(format!(
                "--config {} has no weights; give --weights DIR or --model NAME",
                path.display()
            ))),
        }
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
