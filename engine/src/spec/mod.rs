//! What a model is made of, from its [`ModelConfig`](crate::config::ModelConfig) alone: its
//! canonical tensors ([`tensors`]: role, shape, class; what the loader reads and random weights
//! draw), the inventory of them (shape, component, how many are stored and how many a token uses)
//! and the storage rule of each precision, hence its exact parameter counts, weight and KV
//! bytes, and FLOPs per token. The loader's fit check, the cost model (`analysis`) and bench's
//! predictions all read it, so it sits below them (it uses only `config` and `quant`). Also the
//! hybrid placement planner ([`placement`]): which routed experts fit the device, from the bytes.

pub mod bytes;
pub mod counts;
pub mod placement;
pub mod tensors;
