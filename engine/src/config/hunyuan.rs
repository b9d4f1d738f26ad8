//! HunYuan-MoE (`hunyuan_v1_moe`): per-head QK-norm after RoPE, a softmax router kept in f32
//! and always renormalised, `moe_topk` (and `num_experts`) as one int or a per-layer list, a
//! shared MLP of width `intermediate_size` added unweighted, and RoPE "dynamic" + `alpha`
//! meaning a fixed NTK base change. The release-time remote-code config (`model_type:
//! hunyuan`, e.g. Hunyuan-A13B) spells a few fields differently (`attention_head_dim`, per-layer
//! `moe_intermediate_size` and `num_shared_expert`) and is read here too.

use std::path::Path;

use serde_json::Value;

use super::{
    AttnConfig, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, QkNorm, RouterKind,
    SharedExperts,
};
use crate::error::{Error, Result};

pub(super) fn parse(raw: &Value, path: &Path) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    f.require_silu("hidden_act")?;
    let mut d = f.llama_dims()?;
    if let Some(hd) = f.opt_usize("attention_head_dim")? {
        d.head_dim = hd;
    }
    for (flag, what) in [
        ("use_mla", "MLA attention"),
        ("use_cla", "cross-layer attention (CLA)"),
    ] {
        if f.opt_bool(flag)?.unwrap_or(false) {
            return Err(Error::config(
                path,
                format!("{flag} = true ({what}) is not supported"),
            ));
        }
    }
    let ffn = f.usize("intermediate_size")?;
    let per_layer = |key: &str| {
        f.per_layer_usize(key, d.layers)?
            .ok_or_else(|| Error::config(path, format!("missing required field {key:?}")))
    };
    let experts = per_layer("num_experts")?;
    let top_k = per_layer("moe_topk")?;
    // Expert width: per-layer `moe_intermediate_size` in the remote-code config, else the
    // native config's `intermediate_size`. Shared MLP: `num_shared_expert` x intermediate_size.
    let expert_ffn = f
        .per_layer_usize("moe_intermediate_size", d.layers)?
        .unwrap_or(vec![ffn; d.layers]);
    let shared = f
        .per_layer_usize("num_shared_expert", d.layers)?
        .unwrap_or(vec![1; d.layers]);
    let layers = (0..d.layers)
        .zip(
            experts
                .iter()
                .zip(&top_k)
                .zip(expert_ffn.iter().zip(&shared)),
        )
        .map(|(_, ((&num_experts, &top_k), (&expert_ffn, &shared)))| {
            FfnKind::Moe(MoeConfig {
                num_experts,
                top_k,
                expert_ffn,
                router: RouterKind::Softmax { norm_p: Some(1.0) },
                router_f32: true,
                scale_input: false,
                correction_bias: false,
                act: ExpertAct::SwiGlu,
                biases: false,
                shared: (shared > 0).then_some(SharedExperts {
                    ffn: ffn.saturating_mul(shared),
                    sigmoid_gate: false,
                }),
            })
        })
        .collect();
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(2048);
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
        attn: AttnConfig {
            qk_norm: if f.opt_bool("use_qk_norm")?.unwrap_or(true) {
                QkNorm::PerHeadAfterRope
            } else {
                QkNorm::None
            },
            clip_qkv: None,
            qkv_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
            ..Default::default()
        },
        mla: None,
        rope: f.rope(10_000.0, d.head_dim, max_pos)?,
        sliding_window: None,
        window_layers: None,
        chunked_window: false,
        experts_mxfp4: false,
        nope: None,
        tie_word_embeddings: d.tie,
        layers,
        bos_token_id: d.bos,
        eos_token_ids: d.eos,
    })
}
