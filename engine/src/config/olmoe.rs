//! OLMoE (`olmoe`): RMSNorm over the whole q and k projections before the head split, then
//! q/k/v clamped to ±clip_qkv; every layer a softmax top-k MoE of width `intermediate_size`,
//! renormalised only with `norm_topk_prob` (false in the release).

use std::path::Path;

use serde_json::Value;

use super::{
    AttnConfig, ExpertAct, FfnKind, Fields, ModelConfig, MoeConfig, NormKind, QkNorm, RouterKind,
};
use crate::error::Result;

pub(super) fn parse(raw: &Value, path: &Path) -> Result<ModelConfig> {
    let f = Fields::new(raw, path)?;
    f.require_silu("hidden_act")?;
    let d = f.llama_dims()?;
    let moe = MoeConfig {
        num_experts: f.usize("num_experts")?,
        top_k: f.usize("num_experts_per_tok")?,
        expert_ffn: f.usize("intermediate_size")?,
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
        shared: None,
    };
    let max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
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
            qk_norm: QkNorm::Whole,
            clip_qkv: f.opt_f64("clip_qkv")?,
            qkv_bias: false,
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
        layers: vec![FfnKind::Moe(moe); d.layers],
        bos_token_id: d.bos,
        eos_token_ids: d.eos,
    })
}
