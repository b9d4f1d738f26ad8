//! DeepSeek-V2 (`deepseek_v2`), DeepSeek-V3 (`deepseek_v3`) and dots.llm1 (`dots1`).
//! Shared: the first `first_k_dense_replace` layers are dense (width `intermediate_size`), the
//! rest MoE with `n_routed_experts` of width `moe_intermediate_size` plus `n_shared_experts`
//! folded into one shared MLP added unweighted; routers computed in f32.
//! - V2: MLA attention; softmax router, greedy or group-limited (group score = max), weights
//!   times `routed_scaling_factor`, never renormalised (HF ignores `norm_topk_prob` for V2).
//! - V3: MLA attention; sigmoid router with `e_score_correction_bias` (noaux_tc).
//! - dots1: GQA attention with per-head QK-norm before RoPE (rotate-half), the V3 router.
//! - GLM-4.5 (`glm4_moe`): dots1's layout with an explicit `head_dim`, q/k/v biases
//!   (`attention_bias`), the per-head QK-norm only with `use_qk_norm`, and RoPE (rotate-half)
//!   on the first `head_dim * partial_rotary_factor` dims of each head (transformers' default
//!   factor 0.5 when the config has none).
//!
//! MLA RoPE rotates adjacent pairs. V3's `rope_interleave = false` selects rotate-half; true
//! (its default, and the only V2 form) permutes the output back to halves, which leaves every
//! q.k product unchanged, so both are the interleaved rotation here.

use std::path::Path;

use serde_json::Value;

use super::{
    AttnConfig, ExpertAct, FfnKind, Fields, MlaConfig, ModelConfig, MoeConfig, NormKind, QkNorm,
    RouterKind, SharedExperts,
};
use crate::error::{Error, Result};

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Variant {
    V2,
    V3,
    Dots1,
    Glm4Moe,
}

pub(super) fn parse(raw: &Value, path: &Path, variant: Variant) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    f.require_silu("hidden_act")?;
    let hidden = f.usize("hidden_size")?;
    let heads = f.usize("num_attention_heads")?;
    let layers_n = f.layers("num_hidden_layers")?;
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
    let bad = |msg: String| Err(Error::config(path, msg));

    let gqa = matches!(variant, Variant::Dots1 | Variant::Glm4Moe);
    let mla = match variant {
        Variant::Dots1 | Variant::Glm4Moe => None,
        Variant::V2 | Variant::V3 => Some(MlaConfig {
            q_lora_rank: f.opt_usize("q_lora_rank")?,
            kv_lora_rank: f.usize("kv_lora_rank")?,
            qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize("qk_rope_head_dim")?,
            v_head_dim: f.usize("v_head_dim")?,
        }),
    };
    // GQA head dim for dots1 (hidden / heads, as transformers computes it); for MLA the
    // q/k head dim (nope + rope).
    let head_dim = match mla {
        Some(m) => m.qk_nope_head_dim + m.qk_rope_head_dim,
        None if variant == Variant::Glm4Moe && f.opt_usize("head_dim")?.is_some() => {
            f.usize("head_dim")?
        }
        None if hidden.is_multiple_of(heads.max(1)) => hidden / heads.max(1),
        None => {
            return bad(format!(
                "hidden_size {hidden} is not divisible by {heads} heads"
            ))
        }
    };
    let rope_dim = mla.map_or(head_dim, |m| m.qk_rope_head_dim);
    let mut rope = f.rope(10_000.0, rope_dim, max_pos)?;
    rope.interleaved = match variant {
        Variant::V2 => true,
        Variant::V3 => f.opt_bool("rope_interleave")?.unwrap_or(true),
        Variant::Dots1 | Variant::Glm4Moe => false,
    };
    if variant == Variant::Glm4Moe
        && f.opt_f64("partial_rotary_factor")?.is_none()
        && raw
            .get("rope_parameters")
            .or_else(|| raw.get("rope_scaling"))
            .is_none_or(|r| r.get("partial_rotary_factor").is_none())
    {
        rope.rotary_dim = Some(head_dim / 2);
    }

    let num_experts = f.opt_usize("n_routed_experts")?.unwrap_or(0);
    let n_group = f.opt_usize("n_group")?.unwrap_or(1);
    let topk_group = f.opt_usize("topk_group")?.unwrap_or(1);
    let scaling = f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0);
    let router = match variant {
        Variant::V2 => match f.opt_str("topk_method")?.unwrap_or("greedy") {
            "greedy" => RouterKind::SoftmaxGroupLimited {
                n_group: 1,
                topk_group: 1,
                scaling,
            },
            "group_limited_greedy" => RouterKind::SoftmaxGroupLimited {
                n_group,
                topk_group,
                scaling,
            },
            other => {
                return bad(format!(
                "deepseek_v2 topk_method {other:?} is not supported (greedy, group_limited_greedy)"
            ))
            }
        },
        Variant::V3 | Variant::Dots1 | Variant::Glm4Moe => {
            if let Some(m) = f.opt_str("topk_method")?.filter(|m| *m != "noaux_tc") {
                return bad(format!(
                    "{variant_name} topk_method {m:?} is not supported (noaux_tc)",
                    variant_name = match variant {
                        Variant::V3 => "deepseek_v3",
                        Variant::Glm4Moe => "glm4_moe",
                        _ => "dots1",
                    }
                ));
            }
            if let Some(s) = f.opt_str("scoring_func")?.filter(|s| *s != "sigmoid") {
                return bad(format!(
                    "scoring_func {s:?} is not supported here (sigmoid)"
                ));
            }
            RouterKind::SigmoidBiasGrouped {
                n_group,
                topk_group,
                renormalize: f.opt_bool("norm_topk_prob")?.unwrap_or(true),
                scaling,
            }
        }
    };
    let shared = match f.opt_usize("n_shared_experts")? {
        None | Some(0) => None,
        Some(n) => Some(SharedExperts {
            ffn: n * f.usize("moe_intermediate_size")?,
            sigmoid_gate: false,
        }),
    };
    let first_dense = f.opt_usize("first_k_dense_replace")?.unwrap_or(0);
    let freq = f.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1);
    let layers = (0..layers_n)
        .map(|i| {
            // DeepSeek's rule (transformers drops the `% moe_layer_freq`, equal for freq 1).
            if num_experts > 0 && i >= first_dense && i % freq == 0 {
                Ok(FfnKind::Moe(MoeConfig {
                    num_experts,
                    top_k: f.usize("num_experts_per_tok")?,
                    expert_ffn: f.usize("moe_intermediate_size")?,
                    router,
                    router_f32: true,
                    scale_input: false,
                    correction_bias: matches!(router, RouterKind::SigmoidBiasGrouped { .. }),
                    act: ExpertAct::SwiGlu,
                    biases: false,
                    shared,
                }))
            } else {
                Ok(FfnKind::Dense {
                    intermediate: f.usize("intermediate_size")?,
                })
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let qkv_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    if qkv_bias && variant != Variant::Glm4Moe {
        return bad("attention_bias = true is not supported".into());
    }
    if variant == Variant::Dots1 && f.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return bad("use_sliding_window = true is not supported yet".into());
    }
    // dots1: layer i slides iff `layer_types[i]` says so, or (without the list) `sliding_window`
    // is set and i >= `max_window_layers` (default 62, the release's layer count, so no layer of
    // the release slides).
    let (sliding_window, window_layers) = match variant {
        Variant::Dots1 => {
            let window = f.opt_usize("sliding_window")?;
            let from = f.opt_usize("max_window_layers")?.unwrap_or(62);
            let on = f.sliding_layers(layers_n, |i| window.is_some() && i >= from)?;
            match (window, on.iter().any(|&b| b)) {
                (Some(w), true) => (Some(w), Some(on)),
                _ => (None, None),
            }
        }
        _ => (None, None),
    };
    Ok(ModelConfig {
        model_type: String::new(), // set from the family table (`ModelConfig::from_json_str`)
        vocab_size: f.usize("vocab_size")?,
        hidden_size: hidden,
        num_heads: heads,
        // MLA has no KV heads (one shared latent); dots1 is GQA.
        num_kv_heads: if !gqa {
            heads
        } else {
            f.opt_usize("num_key_value_heads")?.unwrap_or(heads)
        },
        head_dim,
        max_position_embeddings: max_pos,
        norm: NormKind::Rms {
            eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        },
        attn: AttnConfig {
            qk_norm: match variant {
                Variant::Dots1 => QkNorm::PerHeadBeforeRope,
                Variant::Glm4Moe if f.opt_bool("use_qk_norm")?.unwrap_or(false) => {
                    QkNorm::PerHeadBeforeRope
                }
                _ => QkNorm::None,
            },
            qkv_bias,
            ..Default::default()
        },
        mla,
        rope,
        sliding_window,
        window_layers,
        chunked_window: false,
        experts_mxfp4: false,
        nope: None,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        layers,
        bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}
