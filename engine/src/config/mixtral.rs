//! Mixtral (`model_type: mixtral`): GQA attention with RoPE and an optional sliding window,
//! every layer a softmax top-k MoE of SwiGLU experts, renormalised over the chosen k.

use std::path::Path;

use serde_json::Value;

use super::{AttnConfig, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, RouterKind};
use crate::error::Result;

/// Field names and defaults follow transformers' `MixtralConfig`.
pub(super) fn parse(raw: &Value, path: &Path) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    f.require_silu("hidden_act")?;
    let d = f.llama_dims()?;
    let moe = MoeConfig {
        num_experts: f.usize("num_local_experts")?,
        top_k: f.usize("num_experts_per_tok")?,
        expert_ffn: f.usize("intermediate_size")?,
        router: RouterKind::Softmax { norm_p: Some(1.0) },
        router_f32: false,
        scale_input: false,
        correction_bias: false,
        act: ExpertAct::SwiGlu,
        biases: false,
        shared: None,
    };
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(4096 * 32);
    Ok(ModelConfig {
        model_type: String::new(), // set from the family table (`ModelConfig::from_json_str`)
        vocab_size: d.vocab,
        hidden_size: d.hidden,
        num_heads: d.heads,
        num_kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        max_position_embeddings: max_pos,
        norm: NormKind::Rms {
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5),
        },
        attn: AttnConfig::default(),
        mla: None,
        rope: f.rope(1e6, d.head_dim, max_pos)?,
        sliding_window: f.opt_usize("sliding_window")?,
        window_layers: None,
        chunked_window: false,
        experts_mxfp4: false,
        nope: None,
        tie_word_embeddings: d.tie,
        layers: vec![FfnKind::Moe(moe); d.layers],
        bos_token_id: d.bos,
        eos_token_ids: d.eos,
    })
}
