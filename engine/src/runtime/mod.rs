//! What drives a model: the generation loop, sampling, routing statistics, the tokenizer.

pub mod chat;
pub mod generate;
pub mod stats;
pub mod tokenizer;
