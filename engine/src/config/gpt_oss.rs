//! gpt-oss (`gpt_oss`): every layer MoE with `num_local_experts` experts of width
//! `intermediate_size`; the router is a linear with bias whose top-k logits are softmaxed (the
//! same weights as Mixtral's renormalised softmax); experts carry biases and apply the clamped
//! SwiGLU `(clamp(u, ±limit) + 1) * g' * sigmoid(alpha * g')`, `g' = min(g, limit)`
//! (`swiglu_limit` 7, `swiglu_alpha` 1.702). Attention: q/k/v/o biases (`attention_bias`), a
//! learned sink logit per head, explicit `head_dim`, `layer_types` alternating sliding
//! (`sliding_window` 128) and full attention (default: even layers slide), YaRN RoPE
//! (rotate-half; transformers' defaults when the config gives none). The published checkpoints
//! store the experts in MXFP4 (`quantization_config.quant_method` "mxfp4").

use std::path::Path;

use serde_json::Value;

use super::{
    AttnConfig, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, RopeConfig,
    RopeScaling, RouterKind,
};
use crate::error::{Error, Result};

pub(super) fn parse(raw: &Value, path: &Path) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    f.require_silu("hidden_act")?;
    let d = f.llama_dims()?;
    let limit = f.opt_f64("swiglu_limit")?.unwrap_or(7.0);
    let alpha = f.opt_f64("swiglu_alpha")?.unwrap_or(1.702);
    if !(limit > 0.0 && limit.is_finite() && alpha.is_finite()) {
        return Err(Error::config(
            path,
            format!(
                "swiglu_limit must be positive and swiglu_alpha finite (found {limit}, {alpha})"
            ),
        ));
    }
    let moe = MoeConfig {
        num_experts: f.usize("num_local_experts")?,
        top_k: match f.opt_usize("num_experts_per_tok")? {
            Some(k) => k,
            None => f.usize("experts_per_token")?,
        },
        expert_ffn: f.usize("intermediate_size")?,
        // softmax over the top-k logits == the top-k of the full softmax renormalised.
        router: RouterKind::Softmax { norm_p: Some(1.0) },
        router_f32: false,
        shared: None,
        scale_input: false,
        correction_bias: false,
        act: ExpertAct::ClampedSwiGlu { alpha, limit },
        biases: true,
    };
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(131072);
    let rope = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (None, None) => RopeConfig {
            theta: f.opt_f64("rope_theta")?.unwrap_or(150_000.0),
            // transformers' default for gpt_oss.
            scaling: RopeScaling::Yarn {
                factor: 32.0,
                original_max_position: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: false,
            },
            interleaved: false,
            rotary_dim: None,
        },
        _ => f.rope(150_000.0, d.head_dim, max_pos)?,
    };
    let window = f.opt_usize("sliding_window")?;
    let sliding = f.sliding_layers(d.layers, |i| i % 2 == 0)?;
    let any = window.is_some() && sliding.iter().any(|&s| s);
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
        attn: {
            let bias = f.opt_bool("attention_bias")?.unwrap_or(true);
            AttnConfig {
                qkv_bias: bias,
                o_bias: bias,
                sinks: true,
                ..Default::default()
            }
        },
        mla: None,
        rope,
        sliding_window: window.filter(|_| any),
        window_layers: any.then_some(sliding),
        chunked_window: false,
        nope: None,
        experts_mxfp4: match f.get("quantization_config").filter(|q| !q.is_null()) {
            None => false,
            Some(q) => match q.get("quant_method").and_then(Value::as_str) {
                Some("mxfp4") => true,
                // moe-run's own quantized copy: its experts are still the published MXFP4 when
                // it says so.
                Some("moe-run") => {
                    q.get("published_experts").and_then(Value::as_str) == Some("mxfp4")
                }
                other => {
                    return Err(Error::config(
                        path,
                        format!("gpt-oss stored quantized as {other:?}: only its published MXFP4 experts (quant_method \"mxfp4\"), moe-run's own quantized copies or a 16/32-bit export load"),
                    ))
                }
            },
        },
        tie_word_embeddings: d.tie,
        layers: (0..d.layers).map(|_| FfnKind::Moe(moe.clone())).collect(),
        bos_token_id: d.bos,
        eos_token_ids: d.eos,
    })
}
