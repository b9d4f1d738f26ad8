//! Text <-> ids with a Hugging Face `tokenizer.json`, plus the special tokens that
//! `tokenizer_config.json` / `generation_config.json` / `config.json` define.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

thread_local! {
    /// Set while this thread is inside a call into the tokenizers crate (see [`guarded`]).
    static IN_TOKENIZER: Cell<bool> = const { Cell::new(false) };
}

/// Runs a call into the tokenizers crate, turning a panic inside it into an error: the crate
/// does not validate everything it loads (a malformed `tokenizer.json`, e.g. a post-processor
/// template naming a special token it does not define, panics at encode time).
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    IN_TOKENIZER.with(|c| c.set(true));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_TOKENIZER.with(|c| c.set(false));
    r.unwrap_or_else(|payload| {
        let why = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("malformed tokenizer: the tokenizers library failed while {what} ({why})"),
        })
    })
}

/// Installs a panic hook that stays silent for panics [`guarded`] turns into errors (so the
/// user sees one `error:` line, not a panic message first) and reports every other panic as
/// the default hook does. Called once by the command line.
pub fn quiet_guarded_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_TOKENIZER.with(|c| c.get()) {
            default(info)
        }
    }));
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos: Option<u32>,
    /// Prepend BOS when the tokenizer's post-processor does not.
    pub add_bos: bool,
    /// Generation stops at any of these.
    pub eos: Vec<u32>,
}

/// The side files a tokenizer comes with, as text (absent ones are `None`).
#[derive(Default)]
pub struct TokenizerFiles {
    pub tokenizer_config: Option<String>,
    pub generation_config: Option<String>,
}

impl TextTokenizer {
    /// `DIR/tokenizer.json` (required) and the optional side files.
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let read_opt = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let files = TokenizerFiles {
            tokenizer_config: read_opt("tokenizer_config.json"),
            generation_config: read_opt("generation_config.json"),
        };
        Self::from_bytes(&bytes, &files, cfg, path)
    }

    pub fn from_bytes(
        tokenizer_json: &[u8],
        files: &TokenizerFiles,
        cfg: &ModelConfig,
        path: PathBuf,
    ) -> Result<Self> {
        let inner = guarded(&path, "reading it", || {
            tokenizers::Tokenizer::from_bytes(tokenizer_json).map_err(|e| Error::Tokenizer {
                path: path.clone(),
                msg: e.to_string(),
            })
        })?;
        let parse = |text: &Option<String>, name: &str| -> Result<Value> {
            match text {
                None => Ok(Value::Null),
                Some(t) => serde_json::from_str(t).map_err(|source| Error::Json {
                    path: path.with_file_name(name),
                    source,
                }),
            }
        };
        let tok_cfg = parse(&files.tokenizer_config, "tokenizer_config.json")?;
        let gen_cfg = parse(&files.generation_config, "generation_config.json")?;
        // A token in tokenizer_config is a string or an AddedToken object {"content": ...}.
        let named = |key: &str| -> Option<u32> {
            let v = tok_cfg.get(key)?;
            let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(s)
        };
        let ids = |v: Option<&Value>| -> Vec<u32> {
            match v {
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().map(|n| n as u32))
                    .collect(),
                Some(x) => x.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
                None => vec![],
            }
        };
        let bos = ids(gen_cfg.get("bos_token_id"))
            .first()
            .copied()
            .or(cfg.bos_token_id)
            .or_else(|| named("bos_token"));
        let mut eos = ids(gen_cfg.get("eos_token_id"));
        if eos.is_empty() {
            eos = cfg.eos_token_ids.clone();
        }
        if eos.is_empty() {
            eos.extend(named("eos_token"));
        }
        let add_bos = tok_cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let tok = TextTokenizer {
            inner,
            path,
            bos,
            add_bos,
            eos,
        };
        // Encode and decode once, so a tokenizer that cannot work fails here, naming its file.
        let probe = tok.encode("probe")?;
        tok.decode(&probe)?;
        Ok(tok)
    }

    /// The tokenizer of a model source, or `None` for a directory without `tokenizer.json`.
    pub fn of_source(src: &crate::loader::ModelSource, cfg: &ModelConfig) -> Result<Option<Self>> {
        use crate::loader::ModelSource;
        match src {
            ModelSource::Dir(dir) if !dir.join("tokenizer.json").exists() => Ok(None),
            ModelSource::Dir(dir) => Self::from_dir(dir, cfg).map(Some),
            ModelSource::Embedded(e) => Self::embedded(e, cfg).map(Some),
        }
    }

    /// The tokenizer compiled into the binary with an embedded model.
    pub fn embedded(e: &crate::loader::embedded::Embedded, cfg: &ModelConfig) -> Result<Self> {
        let files = TokenizerFiles {
            tokenizer_config: Some(e.tokenizer_config.to_string()),
            generation_config: Some(e.generation_config.to_string()),
        };
        Self::from_bytes(e.tokenizer_json, &files, cfg, e.path("tokenizer.json"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes with the tokenizer's special-token template, making sure BOS leads when the
    /// tokenizer config asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(&self.path, "encoding", || {
            self.inner.encode(text, true).map_err(|e| self.err(e))
        })?;
        let mut ids = enc.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Encodes without adding any special token: for text that already carries them, such as a
    /// rendered chat template (as transformers' `apply_chat_template` tokenizes).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = guarded(&self.path, "encoding", || {
            self.inner.encode(text, false).map_err(|e| self.err(e))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded(&self.path, "decoding", || {
            self.inner.decode(ids, true).map_err(|e| self.err(e))
        })
    }

    fn err(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}

/// Incremental detokenisation for streaming: decodes the whole generated sequence each step and
/// emits only the new, complete text (a trailing U+FFFD means a multi-byte character is still
/// being spelled out by byte tokens, so it waits).
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(None);
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(Some(new))
    }
}
