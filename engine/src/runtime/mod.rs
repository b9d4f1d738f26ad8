//! Everything around the model at run time: KV cache, tokenizer, the generation loop, memory.

pub mod generate;
pub mod host;
pub mod kv_cache;
pub mod memory;
pub mod stats;
pub mod tokenizer;
