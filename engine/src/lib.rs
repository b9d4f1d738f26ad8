//! moe-run: a sparse Mixture-of-Experts transformer inference engine.
//!
//! config (HF config.json -> [`config::ModelConfig`]) -> loader (safetensors -> canonical
//! weights) -> model (one generic decoder; MoE as route / dispatch / experts / combine) ->
//! runtime (KV cache, generation, continuous batching, tokenizer) -> serve (the OpenAI API).

pub mod analysis;
pub mod bench;
pub mod cli;
pub mod config;
pub mod error;
pub mod fsio;
pub mod loader;
pub mod memory;
pub mod model;
pub mod quant;
pub mod runtime;
pub mod selftest;
pub mod serve;
pub mod spec;
pub mod units;

pub use error::{Error, Result};
