//! Mixtral's published naming (prefix `model.`):
//! `embed_tokens`, `layers.N.{input_layernorm, post_attention_layernorm}`,
//! `layers.N.self_attn.{q,k,v,o}_proj`, `layers.N.block_sparse_moe.gate [E, H]`,
//! `layers.N.block_sparse_moe.experts.e.{w1 [F,H] gate, w3 [F,H] up, w2 [H,F] down}`,
//! `norm`, and `lm_head` (absent when tied).

use super::{Checkpoint, LoadOptions};
use crate::config::{FfnKind, ModelConfig};
use crate::error::Result;
use crate::model::moe::MoeWeights;
use crate::model::{FfnWeights, LayerWeights, ModelWeights};

pub(super) fn weights(
    ck: &mut Checkpoint,
    cfg: &ModelConfig,
    o: &LoadOptions,
) -> Result<ModelWeights> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let (q_out, kv_out) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let take =
        |ck: &mut Checkpoint, name: &str, shape: &[usize]| ck.take(name, shape, o.dtype, &o.device);

    let embed = take(ck, "model.embed_tokens.weight", &[v, h])?;
    let mut layers = Vec::with_capacity(cfg.num_layers());
    for (i, kind) in cfg.layers.iter().enumerate() {
        let p = format!("model.layers.{i}.");
        let FfnKind::Moe(moe) = kind else {
            unreachable!("Mixtral config has only MoE layers")
        };
        let (ne, f) = (moe.num_experts, moe.expert_ffn);
        let ex = |e: usize, w: &str| format!("{p}block_sparse_moe.experts.{e}.{w}.weight");
        // gate_up [E, 2F, H] = for each expert, w1 rows then w3 rows.
        let gate_up_names: Vec<String> = (0..ne).flat_map(|e| [ex(e, "w1"), ex(e, "w3")]).collect();
        let down_names: Vec<String> = (0..ne).map(|e| ex(e, "w2")).collect();
        layers.push(LayerWeights {
            attn_norm: take(ck, &format!("{p}input_layernorm.weight"), &[h])?,
            q: take(ck, &format!("{p}self_attn.q_proj.weight"), &[q_out, h])?,
            k: take(ck, &format!("{p}self_attn.k_proj.weight"), &[kv_out, h])?,
            v: take(ck, &format!("{p}self_attn.v_proj.weight"), &[kv_out, h])?,
            o: take(ck, &format!("{p}self_attn.o_proj.weight"), &[h, q_out])?,
            ffn_norm: take(ck, &format!("{p}post_attention_layernorm.weight"), &[h])?,
            ffn: FfnWeights::Moe(MoeWeights {
                router: take(ck, &format!("{p}block_sparse_moe.gate.weight"), &[ne, h])?,
                gate_up: ck.take_concat(
                    &gate_up_names,
                    &[f, h],
                    &[ne, 2 * f, h],
                    o.dtype,
                    &o.device,
                )?,
                down: ck.take_concat(&down_names, &[h, f], &[ne, h, f], o.dtype, &o.device)?,
            }),
        });
    }
    let final_norm = take(ck, "model.norm.weight", &[h])?;
    let lm_head = if cfg.tie_word_embeddings {
        if ck.contains("lm_head.weight") {
            // Some exporters write the tied copy too; it must still have the right shape.
            take(ck, "lm_head.weight", &[v, h])?;
        }
        embed.clone()
    } else {
        take(ck, "lm_head.weight", &[v, h])?
    };
    Ok(ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}
