//! Mixtral (`model_type: mixtral`): GQA attention with RoPE and an optional sliding window,
//! every layer a softmax top-k MoE of SwiGLU experts, renormalised over the chosen k.

use std::path::Path;

use serde_json::Value;

use super::{AttnConfig, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, RouterKind};
use crate::error::{Error, Result};

/// Field names and defaults follow transformers' `MixtralConfig`.
pub(super) fn parse(raw: &Value, path: &Path) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    if let Some(act) = f.opt_str("hidden_act")? {
        if act != "silu" {
            return Err(Error::config(
                path,
                format!("hidden_act {act:?} is not supported (Mixtral uses \"silu\")"),
            ));
        }
    }
    let hidden_size = f.usize("hidden_size")?;
    let num_heads = f.usize("num_attention_heads")?;
    let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) => d,
        None if num_heads > 0 && hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(Error::config(
                path,
                format!("hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads} and head_dim is not given"),
            ))
        }
    };
    let moe = MoeConfig {
        num_experts: f.usize("num_local_experts")?,
        top_k: f.usize("num_experts_per_tok")?,
        expert_ffn: f.usize("intermediate_size")?,
        router: RouterKind::Softmax { norm_p: Some(1.0) },
        router_f32: false,
        shared: None,
    };
    let num_layers = f.layers("num_hidden_layers")?;
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(4096 * 32);
    Ok(ModelConfig {
        model_type: "mixtral".into(),
        vocab_size: f.usize("vocab_size")?,
        hidden_size,
        num_heads,
        num_kv_heads,
        head_dim,
        max_position_embeddings: max_pos,
        norm: NormKind::Rms {
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-5),
        },
        attn: AttnConfig::default(),
        mla: None,
        rope: f.rope(1e6, head_dim, max_pos)?,
        sliding_window: f.opt_usize("sliding_window")?,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        layers: vec![FfnKind::Moe(moe); num_layers],
        bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}
