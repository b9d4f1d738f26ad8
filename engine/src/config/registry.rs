//! Models known by name (`--model mixtral-8x7b`): their Hugging Face repository and their real
//! published config.json, compiled in from `configs/`.

pub struct KnownModel {
    pub name: &'static str,
    /// Hugging Face repository id, `ORG/NAME`.
    pub repo: &'static str,
    pub config_json: &'static str,
}

pub static KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "mixtral-8x7b",
        repo: "mistralai/Mixtral-8x7B-v0.1",
        config_json: include_str!("../../../configs/mixtral-8x7b.json"),
    },
    KnownModel {
        name: "mixtral-8x22b",
        repo: "mistralai/Mixtral-8x22B-v0.1",
        config_json: include_str!("../../../configs/mixtral-8x22b.json"),
    },
    KnownModel {
        name: "dbrx",
        repo: "databricks/dbrx-base",
        config_json: include_str!("../../../configs/dbrx.json"),
    },
    KnownModel {
        name: "qwen3-30b-a3b",
        repo: "Qwen/Qwen3-30B-A3B",
        config_json: include_str!("../../../configs/qwen3-30b-a3b.json"),
    },
    KnownModel {
        name: "olmoe-1b-7b",
        repo: "allenai/OLMoE-1B-7B-0924",
        config_json: include_str!("../../../configs/olmoe-1b-7b.PARTIAL.json"),
    },
    KnownModel {
        name: "hunyuan-a13b",
        repo: "tencent/Hunyuan-A13B-Instruct",
        config_json: include_str!("../../../configs/hunyuan-a13b.json"),
    },
    KnownModel {
        name: "deepseek-v2-lite",
        repo: "deepseek-ai/DeepSeek-V2-Lite",
        config_json: include_str!("../../../configs/deepseek-v2-lite.json"),
    },
    KnownModel {
        name: "deepseek-v3",
        repo: "deepseek-ai/DeepSeek-V3",
        config_json: include_str!("../../../configs/deepseek-v3.json"),
    },
    KnownModel {
        name: "gpt-oss-20b",
        repo: "openai/gpt-oss-20b",
        config_json: include_str!("../../../configs/gpt-oss-20b.json"),
    },
    KnownModel {
        name: "llama-4-scout",
        repo: "meta-llama/Llama-4-Scout-17B-16E-Instruct",
        config_json: include_str!("../../../configs/llama-4-scout.TRIMMED.json"),
    },
    KnownModel {
        name: "llama-4-maverick",
        repo: "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
        config_json: include_str!("../../../configs/llama-4-maverick.TRIMMED.json"),
    },
    KnownModel {
        name: "dots-llm1",
        repo: "rednote-hilab/dots.llm1.inst",
        config_json: include_str!("../../../configs/dots-llm1.PARTIAL.json"),
    },
];

/// A known model by its name or by its repo id (both case-insensitive: `mixtral-8x7b` and
/// `mistralai/Mixtral-8x7B-v0.1` are one model).
pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name) || m.repo.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn every_known_config_parses() {
        for m in KNOWN_MODELS {
            let cfg = ModelConfig::from_json_str(m.config_json, m.name.as_ref()).unwrap();
            assert!(cfg.num_layers() > 0, "{}", m.name);
        }
        let cfg =
            ModelConfig::from_json_str(find("mixtral-8x7b").unwrap().config_json, "x".as_ref())
                .unwrap();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.num_layers(),
                cfg.num_kv_heads,
                cfg.head_dim
            ),
            (4096, 32, 8, 128)
        );
        assert_eq!(cfg.rope.theta, 1e6);
    }

    #[test]
    fn real_deepseek_configs() {
        use crate::config::{FfnKind, RopeScaling, RouterKind};
        let get =
            |n: &str| ModelConfig::from_json_str(find(n).unwrap().config_json, n.as_ref()).unwrap();
        let v3 = get("deepseek-v3");
        let m = v3.mla.unwrap();
        assert_eq!(
            (
                m.q_lora_rank,
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim
            ),
            (Some(1536), 512, 128, 64, 128)
        );
        assert_eq!(v3.num_layers(), 61);
        assert!(matches!(
            v3.layers[2],
            FfnKind::Dense {
                intermediate: 18432
            }
        ));
        let FfnKind::Moe(moe) = &v3.layers[3] else {
            panic!()
        };
        assert_eq!(
            (
                moe.num_experts,
                moe.top_k,
                moe.expert_ffn,
                moe.shared.unwrap().ffn
            ),
            (256, 8, 2048, 2048)
        );
        assert_eq!(
            moe.router,
            RouterKind::SigmoidBiasGrouped {
                n_group: 8,
                topk_group: 4,
                renormalize: true,
                scaling: 2.5
            }
        );
        assert!(
            v3.rope.interleaved
                && matches!(v3.rope.scaling, RopeScaling::Yarn { factor: 40.0, .. })
        );

        let lite = get("deepseek-v2-lite");
        assert_eq!(lite.mla.unwrap().q_lora_rank, None);
        let FfnKind::Moe(moe) = &lite.layers[1] else {
            panic!()
        };
        assert_eq!(
            (moe.num_experts, moe.top_k, moe.shared.unwrap().ffn),
            (64, 6, 2 * 1408)
        );
        assert!(matches!(
            moe.router,
            RouterKind::SoftmaxGroupLimited { n_group: 1, .. }
        ));

        let dots = get("dots-llm1");
        assert!(dots.mla.is_none());
        let FfnKind::Moe(moe) = &dots.layers[1] else {
            panic!()
        };
        assert_eq!(
            (moe.num_experts, moe.top_k, moe.shared.unwrap().ffn),
            (128, 6, 2 * 1408)
        );
    }

    #[test]
    fn real_configs_of_other_families() {
        use crate::config::{FfnKind, NormKind, QkNorm, RouterKind};
        let get =
            |n: &str| ModelConfig::from_json_str(find(n).unwrap().config_json, n.as_ref()).unwrap();
        let moe = |c: &ModelConfig, i: usize| match &c.layers[i] {
            FfnKind::Moe(m) => m.clone(),
            FfnKind::Dense { .. } => panic!("layer {i} is dense"),
        };

        let dbrx = get("dbrx");
        assert_eq!(
            (
                dbrx.hidden_size,
                dbrx.num_layers(),
                dbrx.num_kv_heads,
                dbrx.head_dim
            ),
            (6144, 40, 8, 128)
        );
        assert_eq!(dbrx.norm, NormKind::LayerNorm { eps: 1e-5 });
        assert_eq!((dbrx.attn.clip_qkv, dbrx.rope.theta), (Some(8.0), 500000.0));
        let m = moe(&dbrx, 0);
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn), (16, 4, 10752));
        assert_eq!(m.router, RouterKind::Softmax { norm_p: Some(1.0) });

        let q = get("qwen3-30b-a3b");
        assert_eq!(
            (q.head_dim, q.attn.qk_norm),
            (128, QkNorm::PerHeadBeforeRope)
        );
        let m = moe(&q, 47);
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn), (128, 8, 768));
        assert_eq!(m.router, RouterKind::Softmax { norm_p: Some(1.0) });

        let o = get("olmoe-1b-7b");
        assert_eq!((o.attn.qk_norm, o.attn.clip_qkv), (QkNorm::Whole, None));
        assert_eq!(moe(&o, 0).router, RouterKind::Softmax { norm_p: None });

        let h = get("hunyuan-a13b");
        assert_eq!(
            (h.head_dim, h.attn.qk_norm, h.tie_word_embeddings),
            (128, QkNorm::PerHeadAfterRope, true)
        );
        let m = moe(&h, 31);
        assert_eq!(
            (m.num_experts, m.top_k, m.expert_ffn, m.shared.unwrap().ffn),
            (64, 8, 3072, 3072)
        );
        // NTK alpha 1000 on base 1e4 with head_dim 128: 1e4 * 1000^(128/126).
        assert!((h.rope.theta / (1e4 * 1000f64.powf(128.0 / 126.0)) - 1.0).abs() < 1e-12);
    }
}
