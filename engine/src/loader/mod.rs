//! Checkpoint loading: config.json + safetensors -> canonical [`ModelWeights`] -> [`Model`].
//! Each family has a naming map here that turns its published tensor names into the canonical
//! layout (stacked `[E, N, K]` experts); nothing downstream knows a checkpoint's naming.

pub mod checkpoint;
pub mod hub;
mod naming;

use std::io::IsTerminal;
use std::path::Path;

use candle_core::{DType, Device};

pub use checkpoint::Checkpoint;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Model, ModelWeights};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; weights stored as f32/f16/bf16 are converted to it.
    pub dtype: DType,
    pub device: Device,
    /// Show a progress bar (only ever drawn when stderr is a terminal).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            progress: false,
        }
    }
}

/// Loads `DIR/config.json` and its safetensors checkpoint.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights directory not found"),
        ));
    }
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ck = Checkpoint::open_dir(dir)?;
    load_checkpoint(cfg, ck, opts)
}

/// Validates every tensor of `ck` against `cfg` (names, shapes, dtypes, nothing missing or extra)
/// and builds the model.
pub fn load_checkpoint(cfg: ModelConfig, mut ck: Checkpoint, opts: &LoadOptions) -> Result<Model> {
    if opts.progress && std::io::stderr().is_terminal() {
        ck.show_progress();
    }
    let Some(names) = naming::naming(&cfg.model_type) else {
        return Err(Error::UnsupportedModelType {
            path: "config.json".into(),
            model_type: cfg.model_type.clone(),
            supported: crate::config::SUPPORTED_MODEL_TYPES.to_vec(),
        });
    };
    let weights: ModelWeights = naming::weights(&mut ck, &cfg, names, opts)?;
    ck.finish(&cfg.model_type, ignorable)?;
    Ok(Model::new(cfg, weights, opts.dtype, &opts.device)?)
}

/// Tensors some exporters write that carry no weights (recomputed RoPE tables).
fn ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// Parses `f32|bf16|f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::Input(format!(
            "unknown dtype {s:?}; use f32, bf16 or f16"
        ))),
    }
}
