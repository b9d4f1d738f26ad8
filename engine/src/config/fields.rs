//! Typed access to a `config.json` object: every read names the file and the field in its
//! error, bounds integers ([`MAX_FIELD`], [`MAX_LAYERS`]) before anything is sized from them, and
//! the helpers every Llama-style family shares (dims, activation, RoPE, token ids).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

pub(crate) struct LlamaDims {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub tie: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

/// The largest integer a config field may hold (no real dimension, id or length comes near).
pub const MAX_FIELD: u64 = 1 << 32;
/// The most decoder layers a config may declare (real models have at most a few hundred).
pub const MAX_LAYERS: u64 = 4096;
/// The most parameters a config may describe (100x the largest published model): keeps every
/// count, byte and FLOP figure of the cost model far inside 64 bits.
pub const MAX_PARAMS: f64 = 1e14;

/// Typed access to a config.json object with errors that name the file and the field.
pub(crate) struct Fields<'a> {
    pub obj: &'a serde_json::Map<String, Value>,
    pub path: PathBuf,
}

impl<'a> Fields<'a> {
    pub fn new(raw: &'a Value, path: &Path) -> Result<Self> {
        match raw {
            Value::Object(obj) => Ok(Fields {
                obj,
                path: path.to_path_buf(),
            }),
            _ => Err(Error::config(path, "config.json is not a JSON object")),
        }
    }

    /// A field that is absent or JSON null reads as `None`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub fn err(&self, key: &str, want: &str, v: &Value) -> Error {
        Error::config(
            &self.path,
            format!("field {key:?} should be {want}, found {v}"),
        )
    }

    /// Which of `n` layers slide: `layer_types` ("sliding_attention" / "full_attention", as
    /// transformers writes it) when the config has it, else `default(i)`.
    pub fn sliding_layers(&self, n: usize, default: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
        let Some(v) = self.get("layer_types") else {
            return Ok((0..n).map(default).collect());
        };
        let want = "a list of \"sliding_attention\" / \"full_attention\"";
        let types = v
            .as_array()
            .ok_or_else(|| self.err("layer_types", want, v))?;
        types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(self.err("layer_types", want, t)),
            })
            .collect()
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.err(key, "a non-negative integer", v))
                .and_then(|n| self.bounded(key, n, MAX_FIELD))
                .map(Some),
        }
    }

    /// `n` as a usize, refused above `limit` (a lying or corrupt config, caught before anything
    /// is sized from it).
    fn bounded(&self, key: &str, n: u64, limit: u64) -> Result<usize> {
        if n > limit {
            return Err(Error::config(
                &self.path,
                format!("{key} = {n} is larger than any model's (limit {limit})"),
            ));
        }
        Ok(n as usize)
    }

    /// The number of decoder layers in field `key` (at most [`MAX_LAYERS`]).
    pub fn layers(&self, key: &str) -> Result<usize> {
        let n = self.usize(key)?;
        self.bounded(key, n as u64, MAX_LAYERS)
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| Error::config(&self.path, format!("missing required field {key:?}")))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, "a number", v)),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, "true or false", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(key, "a string", v)),
        }
    }

    pub fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .ok_or_else(|| self.err(key, "a list of integers", v))
                        .and_then(|n| self.bounded(key, n, MAX_FIELD))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.err(key, "a list of integers", v)),
        }
    }

    /// A field that may be one integer for every layer or a per-layer list.
    pub fn per_layer_usize(&self, key: &str, layers: usize) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(_)) => {
                let list = self.opt_usize_list(key)?.unwrap_or_default();
                if list.len() != layers {
                    return Err(Error::config(
                        &self.path,
                        format!("{key} lists {} values for {layers} layers", list.len()),
                    ));
                }
                Ok(Some(list))
            }
            Some(_) => Ok(self.opt_usize(key)?.map(|n| vec![n; layers])),
        }
    }

    /// A nested object such as DBRX's `attn_config`.
    pub fn sub(&self, key: &str) -> Result<Fields<'a>> {
        match self.get(key) {
            Some(Value::Object(obj)) => Ok(Fields {
                obj,
                path: self.path.clone(),
            }),
            Some(v) => Err(self.err(key, "an object", v)),
            None => Err(Error::config(
                &self.path,
                format!("missing required object {key:?}"),
            )),
        }
    }

    /// `hidden_act` must be SiLU (every supported family's experts are SwiGLU).
    pub fn require_silu(&self, key: &str) -> Result<()> {
        match self.opt_str(key)? {
            None | Some("silu") | Some("swish") => Ok(()),
            Some(act) => Err(Error::config(
                &self.path,
                format!("{key} {act:?} is not supported (only \"silu\")"),
            )),
        }
    }

    /// `head_dim` if given (and not null), else hidden / heads.
    pub fn head_dim(&self, hidden: usize, heads: usize) -> Result<usize> {
        match self.opt_usize("head_dim")? {
            Some(d) => Ok(d),
            None if heads > 0 && hidden.is_multiple_of(heads) => Ok(hidden / heads),
            None => Err(Error::config(
                &self.path,
                format!("hidden size {hidden} is not divisible by {heads} heads and head_dim is not given"),
            )),
        }
    }

    /// The fields every Llama-style config spells the same way.
    pub fn llama_dims(&self) -> Result<LlamaDims> {
        let hidden = self.usize("hidden_size")?;
        let heads = self.usize("num_attention_heads")?;
        Ok(LlamaDims {
            vocab: self.usize("vocab_size")?,
            hidden,
            heads,
            kv_heads: self.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim: self.head_dim(hidden, heads)?,
            layers: self.layers("num_hidden_layers")?,
            tie: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            bos: self.token_ids("bos_token_id")?.first().copied(),
            eos: self.token_ids("eos_token_id")?,
        })
    }

    /// `eos_token_id` may be an int or a list of ints.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| self.err(key, "an int or a list of ints", v))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.err(key, "an int or a list of ints", v)),
        }
    }

    /// RoPE parameters in either published form: top-level `rope_theta` + `rope_scaling`
    /// (transformers 4.x) or `rope_parameters: {rope_type, rope_theta, ...}` (transformers 5).
    /// `head_dim` is the rotated dimension; `max_pos` the model's context (YaRN defaults).
    pub fn rope(&self, default_theta: f64, head_dim: usize, max_pos: usize) -> Result<RopeConfig> {
        let nested = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"));
        let nested = match nested {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => return Err(self.err("rope_parameters", "an object or null", v)),
        };
        let theta_in = |m: Option<&serde_json::Map<String, Value>>| -> Result<Option<f64>> {
            match m.and_then(|m| m.get("rope_theta")).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.err("rope_parameters.rope_theta", "a number", v)),
            }
        };
        let theta = match theta_in(nested)? {
            Some(t) => t,
            None => self.opt_f64("rope_theta")?.unwrap_or(default_theta),
        };
        if theta <= 0.0 || !theta.is_finite() {
            return Err(Error::config(
                &self.path,
                format!("rope_theta must be positive, found {theta}"),
            ));
        }
        let kind = nested
            .and_then(|m| m.get("rope_type").or_else(|| m.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| nested.and_then(|m| m.get(k)).and_then(Value::as_f64);
        let mut theta = theta;
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => {
                let factor = num("factor")
                    .ok_or_else(|| Error::config(&self.path, "linear rope scaling needs a numeric \"factor\""))?;
                RopeScaling::Linear { factor }
            }
            "llama3" => {
                let need = |k: &str| {
                    num(k).ok_or_else(|| {
                        Error::config(&self.path, format!("llama3 rope scaling needs a numeric {k:?}"))
                    })
                };
                let (factor, low, high) = (need("factor")?, need("low_freq_factor")?, need("high_freq_factor")?);
                let original = need("original_max_position_embeddings")?;
                if factor <= 0.0 || low <= 0.0 || high < low || original < 1.0 {
                    return Err(Error::config(
                        &self.path,
                        format!("llama3 rope scaling needs factor > 0 and 0 < low_freq_factor <= high_freq_factor (found {factor}, {low}, {high})"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position: original as usize,
                }
            }
            // HunYuan labels a fixed NTK-alpha base change "dynamic": base * alpha^(d/(d-2)),
            // independent of the sequence length.
            "dynamic" | "ntk_alpha" if num("alpha").is_some() => {
                let alpha = num("alpha").unwrap_or(1.0);
                let d = head_dim as f64;
                theta *= alpha.powf(d / (d - 2.0));
                RopeScaling::None
            }
            "yarn" => {
                let original_max_position = num("original_max_position_embeddings")
                    .map(|n| n as usize)
                    .unwrap_or(max_pos);
                // No factor: the ratio of the context to the pretraining context (DeepSeek-V3).
                let factor = num("factor").unwrap_or(max_pos as f64 / original_max_position as f64);
                let nonzero = |k: &str| num(k).filter(|v| *v != 0.0);
                RopeScaling::Yarn {
                    factor,
                    original_max_position,
                    beta_fast: nonzero("beta_fast").unwrap_or(32.0),
                    beta_slow: nonzero("beta_slow").unwrap_or(1.0),
                    mscale: num("mscale"),
                    mscale_all_dim: num("mscale_all_dim"),
                    attention_factor: num("attention_factor"),
                    truncate: nested.and_then(|m| m.get("truncate")).and_then(Value::as_bool).unwrap_or(true),
                }
            }
            other => {
                return Err(Error::config(
                    &self.path,
                    format!("rope type {other:?} is not supported for this model yet (supported: default, linear, llama3, yarn, NTK alpha)"),
                ))
            }
        };
        let partial = match num("partial_rotary_factor") {
            Some(f) => Some(f),
            None => self.opt_f64("partial_rotary_factor")?,
        };
        let rotary_dim = match partial {
            None => None,
            Some(1.0) => None,
            Some(f) => {
                // transformers: int(head_dim * partial_rotary_factor) dims rotate.
                let d = (head_dim as f64 * f) as usize;
                if !(f > 0.0 && f < 1.0) || d == 0 || d % 2 == 1 {
                    return Err(Error::config(
                        &self.path,
                        format!("partial_rotary_factor {f} of head_dim {head_dim} does not give an even number of rotated dims in 2..{head_dim}"),
                    ));
                }
                if scaling != RopeScaling::None {
                    return Err(Error::config(
                        &self.path,
                        "partial_rotary_factor with rope scaling is not supported yet",
                    ));
                }
                Some(d)
            }
        };
        Ok(RopeConfig {
            theta,
            scaling,
            interleaved: false,
            rotary_dim,
        })
    }
}
