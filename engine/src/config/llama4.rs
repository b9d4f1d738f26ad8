//! Llama-4 (`llama4_text`, and the language model of a multimodal `llama4` checkpoint, read from
//! its `text_config`; the vision tower is not supported and its tensors are left unread).
//!
//! - MoE layers (`moe_layers`, else every `interleave_moe_layer_step`-th layer from
//!   `step - 1`): `num_local_experts` experts of width `intermediate_size`, top-k
//!   (`num_experts_per_tok`, 1 in every release) chosen on the router logits, score =
//!   sigmoid(logit) multiplying the expert's *input*; plus an always-on shared expert of width
//!   `intermediate_size`. Other layers are dense of width `intermediate_size_mlp`.
//! - Attention: RoPE on the layers `no_rope_layers` flags with 1 (default: all but every
//!   `no_rope_layer_interval`-th), rotating adjacent pairs (transformers' complex view) with
//!   llama3 frequency scaling; those layers attend within chunks of `attention_chunk_size`
//!   (`layer_types` "chunked_attention") and, with `use_qk_norm`, L2-normalise q and k per head
//!   after RoPE without weights. The other (NoPE) layers attend globally and, with
//!   `attn_temperature_tuning`, scale queries by `ln(1 + floor((p + 1) / floor_scale)) *
//!   attn_scale + 1`.

use std::path::Path;

use serde_json::Value;

use super::{
    AttnConfig, AttnTemperature, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NoRope,
    NormKind, QkNorm, RouterKind, SharedExperts,
};
use crate::error::{Error, Result};

/// `llama4_text`: the config itself; `llama4`: its `text_config`.
pub(super) fn parse(raw: &Value, path: &Path, multimodal: bool) -> Result<ModelConfig> {
    let top = Fields::new(raw, path)?;
    let f = if multimodal {
        top.sub("text_config")?
    } else {
        top
    };
    f.require_silu("hidden_act")?;
    let d = f.llama_dims()?;
    if f.opt_bool("attention_bias")?.unwrap_or(false) {
        return Err(Error::config(
            path,
            "attention_bias true (biases on q/k/v/o) is not supported for llama4 yet; no published Llama-4 has them",
        ));
    }
    let n = d.layers;
    let expert_ffn = f.usize("intermediate_size")?;
    let moe = MoeConfig {
        num_experts: f.usize("num_local_experts")?,
        top_k: f.opt_usize("num_experts_per_tok")?.unwrap_or(1),
        expert_ffn,
        // sigmoid of the chosen logits, never renormalised: the V3 router with one group, no
        // bias and a scale of 1.
        router: RouterKind::SigmoidBiasGrouped {
            n_group: 1,
            topk_group: 1,
            renormalize: false,
            scaling: 1.0,
        },
        router_f32: false,
        shared: Some(SharedExperts {
            ffn: expert_ffn,
            sigmoid_gate: false,
        }),
        scale_input: true,
        correction_bias: false,
        act: ExpertAct::SwiGlu,
        biases: false,
    };
    let moe_layers = match f.opt_usize_list("moe_layers")? {
        Some(v) => v,
        None => {
            let step = f.opt_usize("interleave_moe_layer_step")?.unwrap_or(1);
            if step == 0 {
                return Err(Error::config(
                    path,
                    "interleave_moe_layer_step must be positive",
                ));
            }
            (step - 1..n).step_by(step).collect()
        }
    };
    let dense = f.opt_usize("intermediate_size_mlp")?;
    let layers = (0..n)
        .map(|i| match moe_layers.contains(&i) {
            true => Ok(FfnKind::Moe(moe.clone())),
            false => dense
                .map(|intermediate| FfnKind::Dense { intermediate })
                .ok_or_else(|| {
                    Error::config(
                        path,
                        format!("layer {i} is dense but intermediate_size_mlp is missing"),
                    )
                }),
        })
        .collect::<Result<Vec<_>>>()?;
    // `no_rope_layers[i]` is 1 where layer i USES RoPE (transformers' name, inverted meaning).
    let rope_layers: Vec<bool> = match f.opt_usize_list("no_rope_layers")? {
        Some(v) if !v.is_empty() => v.iter().map(|&x| x != 0).collect(),
        _ => {
            let every = f.opt_usize("no_rope_layer_interval")?.unwrap_or(4);
            if every == 0 {
                return Err(Error::config(
                    path,
                    "no_rope_layer_interval must be positive",
                ));
            }
            (0..n).map(|i| !(i + 1).is_multiple_of(every)).collect()
        }
    };
    let chunk = match f.get("attention_chunk_size") {
        None => Some(8192),
        Some(_) => f.opt_usize("attention_chunk_size")?,
    };
    let chunked = chunked_layers(&f, &rope_layers, chunk.is_some())?;
    let temperature = match f.opt_bool("attn_temperature_tuning")?.unwrap_or(true) {
        false => None,
        true => {
            let floor_scale = f.opt_f64("floor_scale")?.unwrap_or(8192.0);
            if floor_scale <= 0.0 {
                return Err(Error::config(path, "floor_scale must be positive"));
            }
            Some(AttnTemperature {
                floor_scale,
                attn_scale: f.opt_f64("attn_scale")?.unwrap_or(0.1),
            })
        }
    };
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(131072);
    let mut rope = f.rope(500_000.0, d.head_dim, max_pos)?;
    rope.interleaved = true;
    let qk_norm = match f.opt_bool("use_qk_norm")?.unwrap_or(true) {
        true => QkNorm::UnitAfterRope,
        false => QkNorm::None,
    };
    let any_chunked = chunked.iter().any(|&c| c);
    Ok(ModelConfig {
        model_type: String::new(), // set from the family table
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
            qk_norm,
            ..Default::default()
        },
        mla: None,
        rope,
        sliding_window: chunk.filter(|_| any_chunked),
        window_layers: any_chunked.then_some(chunked),
        chunked_window: true,
        experts_mxfp4: false,
        nope: Some(NoRope {
            layers: rope_layers.iter().map(|&r| !r).collect(),
            temperature,
        }),
        // A multimodal config keeps it at the top level.
        tie_word_embeddings: match multimodal {
            true => Fields::new(raw, path)?
                .opt_bool("tie_word_embeddings")?
                .unwrap_or(false),
            false => d.tie,
        },
        layers,
        bos_token_id: d.bos,
        eos_token_ids: d.eos,
    })
}

/// Which layers attend in chunks: `layer_types` ("chunked_attention" / "full_attention") when
/// the config has it, else the RoPE layers when there is a chunk size (transformers' default).
fn chunked_layers(f: &Fields, rope_layers: &[bool], has_chunk: bool) -> Result<Vec<bool>> {
    let Some(v) = f.get("layer_types") else {
        return Ok(rope_layers.iter().map(|&r| r && has_chunk).collect());
    };
    let want = "a list of \"chunked_attention\" / \"full_attention\"";
    let types = v.as_array().ok_or_else(|| f.err("layer_types", want, v))?;
    types
        .iter()
        .map(|t| match t.as_str() {
            Some("chunked_attention") if has_chunk => Ok(true),
            Some("full_attention") => Ok(false),
            _ => Err(f.err("layer_types", want, t)),
        })
        .collect()
}
