//! The model compiled into the binary: `tiny-kjv`, a small Mixtral-architecture MoE trained by
//! the project on the King James Bible (`tests/train_tiny_kjv.py`, details in
//! `engine/assets/tiny-kjv/TRAINING.md`). It loads through the same validating loader as any
//! checkpoint on disk; only the bytes come from the binary instead of a file.

use std::path::PathBuf;

use super::{load_checkpoint, Checkpoint, LoadOptions};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::Model;

pub struct Embedded {
    pub name: &'static str,
    pub config_json: &'static str,
    pub safetensors: &'static [u8],
    pub tokenizer_json: &'static [u8],
    pub tokenizer_config: &'static str,
    pub generation_config: &'static str,
}

pub static TINY_KJV: Embedded = Embedded {
    name: "tiny-kjv",
    config_json: include_str!("../../assets/tiny-kjv/config.json"),
    safetensors: include_bytes!("../../assets/tiny-kjv/model.safetensors"),
    tokenizer_json: include_bytes!("../../assets/tiny-kjv/tokenizer.json"),
    tokenizer_config: include_str!("../../assets/tiny-kjv/tokenizer_config.json"),
    generation_config: include_str!("../../assets/tiny-kjv/generation_config.json"),
};

impl Embedded {
    /// Shown in error messages in place of a path.
    pub fn path(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("<embedded {}>/{file}", self.name))
    }

    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_json_str(self.config_json, &self.path("config.json"))
    }

    pub fn load(&self, opts: &LoadOptions) -> Result<Model> {
        let ck = Checkpoint::from_static(
            &self.path("model.safetensors").display().to_string(),
            self.safetensors,
        )?;
        load_checkpoint(self.config()?, ck, opts)
    }
}
