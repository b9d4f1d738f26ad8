//! What drives a model: the generation loop, sampling, continuous batching, routing statistics,
//! the tokenizer.

pub mod batch;
pub mod chat;
pub mod generate;
pub mod graph;
pub mod stats;
pub mod tokenizer;
