//! Qwen3-MoE (`qwen3_moe`) and Qwen2-MoE (`qwen2_moe`). Shared: softmax router renormalised
//! only with `norm_topk_prob`, expert width `moe_intermediate_size`, dense layers (width
//! `intermediate_size`) chosen by `mlp_only_layers` / `decoder_sparse_step`, a window only when
//! `use_sliding_window` (Qwen3: every layer; Qwen2: the layers `layer_types` names). Qwen3 adds
//! per-head QK-norm before RoPE and an explicit `head_dim`; Qwen2 adds q/k/v biases and a
//! sigmoid-gated shared expert.

use std::path::Path;

use serde_json::Value;

use super::{
    sparse_layer, AttnConfig, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, QkNorm,
    RouterKind, SharedExperts,
};
use crate::error::{Error, Result};

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Variant {
    Qwen2,
    Qwen3,
}

pub(super) fn parse(raw: &Value, path: &Path, variant: Variant) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    f.require_silu("hidden_act")?;
    let d = f.llama_dims()?;
    // Published configs say `num_experts`; transformers 5 writes `num_local_experts`.
    let num_experts = match f.opt_usize("num_experts")? {
        Some(n) => n,
        None => f.usize("num_local_experts")?,
    };
    let shared = match variant {
        Variant::Qwen2 => match f.opt_usize("shared_expert_intermediate_size")? {
            Some(0) | None => None,
            Some(ffn) => Some(SharedExperts {
                ffn,
                sigmoid_gate: true,
            }),
        },
        Variant::Qwen3 => None,
    };
    let moe = MoeConfig {
        num_experts,
        top_k: f.usize("num_experts_per_tok")?,
        expert_ffn: f.usize("moe_intermediate_size")?,
        router: RouterKind::Softmax {
            norm_p: f
                .opt_bool("norm_topk_prob")?
                .unwrap_or(false)
                .then_some(1.0),
        },
        router_f32: false,
        scale_input: false,
        correction_bias: false,
        act: ExpertAct::SwiGlu,
        biases: false,
        shared,
    };
    let mlp_only = f.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
    let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1);
    let dense = f.opt_usize("intermediate_size")?;
    let layers = (0..d.layers)
        .map(|i| {
            if sparse_layer(i, &mlp_only, step, num_experts) {
                Ok(FfnKind::Moe(moe.clone()))
            } else {
                let intermediate = dense.ok_or_else(|| {
                    Error::config(
                        path,
                        format!("layer {i} is dense but intermediate_size is missing"),
                    )
                })?;
                Ok(FfnKind::Dense { intermediate })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    // A window only with `use_sliding_window` (transformers drops it otherwise). Qwen3-MoE
    // windows every layer; Qwen2-MoE the layers `layer_types` names, by default the even ones
    // below `max_window_layers` (28).
    let use_window = f.opt_bool("use_sliding_window")?.unwrap_or(false);
    let sliding_window = match use_window {
        false => None,
        true => Some(f.usize("sliding_window")?),
    };
    let window_layers = match (use_window, variant) {
        (true, Variant::Qwen2) => {
            let below = f.opt_usize("max_window_layers")?.unwrap_or(28);
            Some(f.sliding_layers(layers.len(), |i| i % 2 == 0 && i < below)?)
        }
        _ => None,
    };
    let (default_theta, attn) = match variant {
        Variant::Qwen3 => (
            10_000.0,
            AttnConfig {
                qk_norm: QkNorm::PerHeadBeforeRope,
                ..Default::default()
            },
        ),
        Variant::Qwen2 => (
            10_000.0,
            AttnConfig {
                qkv_bias: f.opt_bool("qkv_bias")?.unwrap_or(true),
                ..Default::default()
            },
        ),
    };
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(32768);
    Ok(ModelConfig {
        model_type: String::new(), // set from the family table (`ModelConfig::from_json_str`)
        vocab_size: d.vocab,
        hidden_size: d.hidden,
        num_heads: d.heads,
        num_kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        max_position_embeddings: max_pos,
        norm: NormKind::Rms {
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        },
        attn,
        mla: None,
        rope: f.rope(default_theta, d.head_dim, max_pos)?,
        sliding_window,
        window_layers,
        chunked_window: false,
        experts_mxfp4: false,
        nope: None,
        tie_word_embeddings: d.tie,
        layers,
        bos_token_id: d.bos,
        eos_token_ids: d.eos,
    })
}
