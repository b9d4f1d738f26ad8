//! DBRX (`dbrx`): nested `attn_config` / `ffn_config`, fused Wqkv clamped to ±clip_qkv,
//! LayerNorm without bias (eps 1e-5, not configurable), softmax router divided by the p-norm
//! of the top-k (`moe_normalize_expert_weights`; null = no normalisation).
//!
//! RoPE theta: the model was trained with `attn_config.rope_theta` (5e5 in the release).
//! transformers 5.23 reads only `rope_parameters`/top-level `rope_theta` and so runs a
//! published DBRX config at 1e4; we follow the checkpoint's own field.

use std::path::Path;

use serde_json::Value;

use super::{
    AttnConfig, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, RopeConfig,
    RopeScaling, RouterKind,
};
use crate::error::{Error, Result};

pub(super) fn parse(raw: &Value, path: &Path) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    let attn = f.sub("attn_config")?;
    let ffn = f.sub("ffn_config")?;
    if let Some(act) = ffn
        .get("ffn_act_fn")
        .and_then(|a| a.get("name"))
        .and_then(Value::as_str)
    {
        if act != "silu" {
            return Err(Error::config(
                path,
                format!("ffn_act_fn {act:?} is not supported (only \"silu\")"),
            ));
        }
    }
    let hidden = f.usize("d_model")?;
    let heads = f.usize("n_heads")?;
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(Error::config(
            path,
            format!("d_model {hidden} is not divisible by n_heads {heads}"),
        ));
    }
    let head_dim = hidden / heads;
    let max_pos = f.opt_usize("max_seq_len")?.unwrap_or(2048);
    let theta = match attn.opt_f64("rope_theta")? {
        Some(t) => RopeConfig {
            theta: t,
            scaling: RopeScaling::None,
            interleaved: false,
            rotary_dim: None,
        },
        None => f.rope(10_000.0, head_dim, max_pos)?,
    };
    let moe = MoeConfig {
        num_experts: ffn.usize("moe_num_experts")?,
        top_k: ffn.usize("moe_top_k")?,
        expert_ffn: ffn.usize("ffn_hidden_size")?,
        router: RouterKind::Softmax {
            // Absent means transformers' default 1.0; an explicit null means no normalisation.
            norm_p: match ffn.obj.get("moe_normalize_expert_weights") {
                None => Some(1.0),
                Some(_) => ffn.opt_f64("moe_normalize_expert_weights")?,
            },
        },
        router_f32: false,
        scale_input: false,
        correction_bias: false,
        act: ExpertAct::SwiGlu,
        biases: false,
        shared: None,
    };
    let d_bos = f.token_ids("bos_token_id")?;
    Ok(ModelConfig {
        model_type: String::new(), // set from the family table (`ModelConfig::from_json_str`)
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        num_heads: heads,
        num_kv_heads: attn.opt_usize("kv_n_heads")?.unwrap_or(heads),
        head_dim,
        max_position_embeddings: max_pos,
        norm: NormKind::LayerNorm { eps: 1e-5 },
        attn: AttnConfig {
            clip_qkv: attn.opt_f64("clip_qkv")?,
            ..Default::default()
        },
        mla: None,
        rope: theta,
        sliding_window: None,
        window_layers: None,
        chunked_window: false,
        experts_mxfp4: false,
        nope: None,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        layers: vec![FfnKind::Moe(moe); f.layers("n_layers")?],
        bos_token_id: d_bos.first().copied(),
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}
