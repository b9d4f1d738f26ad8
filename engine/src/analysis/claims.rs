//! Published parameter claims, each checked against a count computed from a config (the
//! models this build knows) or from the reported structure (claim-only models, with the
//! assumptions printed). The claimed values and their sources are data; every computed value
//! comes from [`super::counts`].

use serde::Serialize;

use super::bytes::INT4_GROUP;
use super::counts::{counts_of, param_counts, Component, ParamCounts, TensorGroup, TensorKind};
use super::gpus::find_gpu;
use crate::config::registry::KNOWN_MODELS;
use crate::config::{FfnKind, ModelConfig};

/// A discrepancy above this is flagged.
pub const FLAG_PCT: f64 = 3.0;

/// How a claim is checked.
pub enum Basis {
    /// A real config compiled into this build, found by Hugging Face repository id; the
    /// stated (experts, top-k, shared experts) is checked against it when given.
    Config {
        repos: &'static [&'static str],
        stated: Option<(usize, usize, usize)>,
    },
    /// Counted from a structure reported without a config.
    Structure(fn() -> Computed),
    /// Only totals are claimed: what per-expert and always-on sizes they imply.
    Implied {
        experts: u64,
        top_k: u64,
        why_top_k: &'static str,
    },
    /// Can a model of `params` run on `gpu`? (bits per weight, offload at int4)
    Fit {
        gpu: &'static str,
        params: f64,
    },
    NotComputable(&'static str),
}

pub struct Claim {
    pub model: &'static str,
    pub claimed_total: f64,
    pub claimed_active: Option<f64>,
    pub source: &'static str,
    pub basis: Basis,
}

/// A count from a stated structure, with what had to be assumed.
pub struct Computed {
    pub counts: ParamCounts,
    pub assumptions: Vec<String>,
}

const B: f64 = 1e9;

/// The claims table. Sources: ../shared/reference-configs/SOURCES.md where it has them.
pub static CLAIMS: &[Claim] = &[
    Claim {
        model: "Mixtral-8x7B",
        claimed_total: 46.7 * B,
        claimed_active: Some(12.9 * B),
        source: "Mistral AI, \"Mixtral of experts\" (blog); paper arXiv 2401.04088 rounds to 47B/13B",
        basis: Basis::Config {
            repos: &["mistralai/Mixtral-8x7B-v0.1"],
            stated: Some((8, 2, 0)),
        },
    },
    Claim {
        model: "Mixtral-8x22B",
        claimed_total: 141.0 * B,
        claimed_active: Some(39.0 * B),
        source: "Mistral AI, \"Cheaper, Better, Faster, Stronger\" (blog)",
        basis: Basis::Config {
            repos: &["mistralai/Mixtral-8x22B-v0.1"],
            stated: Some((8, 2, 0)),
        },
    },
    Claim {
        model: "DBRX",
        claimed_total: 132.0 * B,
        claimed_active: Some(36.0 * B),
        source: "databricks/dbrx README and MODEL_CARD_dbrx_base.md (16 experts, top-4)",
        basis: Basis::Config {
            repos: &["databricks/dbrx-base", "databricks/dbrx-instruct"],
            stated: Some((16, 4, 0)),
        },
    },
    Claim {
        model: "DeepSeek-V3",
        claimed_total: 671.0 * B,
        claimed_active: Some(37.0 * B),
        source: "DeepSeek-V3 paper / README (main model; the MTP module adds 11.5B, 685B on disk)",
        basis: Basis::Config {
            repos: &["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-Base"],
            stated: Some((256, 8, 1)),
        },
    },
    Claim {
        model: "dots.llm1",
        claimed_total: 142.0 * B,
        claimed_active: Some(14.0 * B),
        source: "transformers docs model_doc/dots1.md; arXiv 2506.05767 (128 experts, top-6, 2 shared)",
        basis: Basis::Config {
            repos: &["rednote-hilab/dots.llm1.inst", "rednote-hilab/dots.llm1.base"],
            stated: Some((128, 6, 2)),
        },
    },
    Claim {
        model: "gpt-oss-20b",
        claimed_total: 21.0 * B,
        claimed_active: Some(3.6 * B),
        source: "OpenAI gpt-oss model card (\"21B total, 3.6B active\"; 20.9B), via SOURCES.md",
        basis: Basis::Config {
            repos: &["openai/gpt-oss-20b"],
            stated: Some((32, 4, 0)),
        },
    },
    Claim {
        model: "Llama-4 Scout",
        claimed_total: 109.0 * B,
        claimed_active: Some(17.0 * B),
        source: "Meta Llama-4 model card (\"17B active, 109B total\"), via SOURCES.md (from memory there, unverified)",
        basis: Basis::Config {
            repos: &["meta-llama/Llama-4-Scout-17B-16E-Instruct"],
            stated: Some((16, 1, 1)),
        },
    },
    Claim {
        model: "Llama-4 Maverick",
        claimed_total: 400.0 * B,
        claimed_active: Some(17.0 * B),
        source: "Meta Llama-4 model card (\"17B active, 400B total\"), via SOURCES.md (from memory there, unverified)",
        basis: Basis::Config {
            repos: &["meta-llama/Llama-4-Maverick-17B-128E-Instruct"],
            stated: Some((128, 1, 1)),
        },
    },
    Claim {
        model: "Qwen3-30B-A3B",
        claimed_total: 30.5 * B,
        claimed_active: Some(3.3 * B),
        source: "Qwen3-30B-A3B model card (\"30.5B in total and 3.3B activated\")",
        basis: Basis::Config {
            repos: &["Qwen/Qwen3-30B-A3B"],
            stated: Some((128, 8, 0)),
        },
    },
    Claim {
        model: "OLMoE-1B-7B",
        claimed_total: 6.9 * B,
        claimed_active: Some(1.3 * B),
        source: "allenai/OLMoE README",
        basis: Basis::Config {
            repos: &["allenai/OLMoE-1B-7B-0924"],
            stated: Some((64, 8, 0)),
        },
    },
    Claim {
        model: "Hunyuan-A13B",
        claimed_total: 80.0 * B,
        claimed_active: Some(13.0 * B),
        source: "Tencent-Hunyuan/Hunyuan-A13B README",
        basis: Basis::Config {
            repos: &["tencent/Hunyuan-A13B-Instruct"],
            stated: Some((64, 8, 1)),
        },
    },
    Claim {
        model: "GPT-4 (as reported)",
        claimed_total: 1.8e12,
        claimed_active: Some(277.0 * B),
        source: "SemiAnalysis, \"GPT-4 Architecture, Infrastructure...\" (July 2023), as widely reported; never confirmed by OpenAI; not in SOURCES.md",
        basis: Basis::Structure(gpt4),
    },
    Claim {
        model: "Grok-1",
        claimed_total: 314.0 * B,
        claimed_active: None,
        source: "xai-org/grok-1 README (314B, 8 experts, 2 per token); structure: reference-configs/grok-1.HYPERPARAMS.json (run.py, model.py)",
        basis: Basis::Structure(grok1),
    },
    Claim {
        model: "Llama-4 Behemoth",
        claimed_total: 2.0e12,
        claimed_active: Some(288.0 * B),
        source: "Meta, \"The Llama 4 herd\" (April 2025): 288B active, 16 experts, ~2T total; not in SOURCES.md",
        basis: Basis::Implied {
            experts: 16,
            top_k: 1,
            why_top_k: "one routed expert + one shared expert per token, as in the Llama-4 Scout/Maverick configs (num_experts_per_tok 1)",
        },
    },
    Claim {
        model: "MiniMax-Text-01",
        claimed_total: 456.0 * B,
        claimed_active: Some(45.9 * B),
        source: "MiniMax-01 model card (MiniMax-AI/MiniMax-01, MiniMax-Text-01-Model-Card.md), via SOURCES.md",
        basis: Basis::Structure(minimax_text_01),
    },
    Claim {
        model: "ERNIE-4.5",
        claimed_total: 424.0 * B,
        claimed_active: Some(47.0 * B),
        source: "Baidu ERNIE 4.5 release; 424B/47B is ERNIE-4.5-VL-424B-A47B, the text flagship is 300B-A47B (SOURCES.md)",
        basis: Basis::NotComputable(
            "no verified structure: SOURCES.md has only unverified third-party guesses",
        ),
    },
    Claim {
        model: "\"a 136B MoE runs on an RTX 4090\"",
        claimed_total: 136.0 * B,
        claimed_active: None,
        source: "seed article (no model or source named)",
        basis: Basis::Fit {
            gpu: "rtx4090",
            params: 136.0 * B,
        },
    },
];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClaimRow {
    pub model: String,
    pub source: String,
    pub claimed_total_params: f64,
    pub claimed_active_params: Option<f64>,
    pub computed_total_params: Option<u64>,
    pub computed_active_params: Option<u64>,
    /// (computed - claimed) / claimed x 100.
    pub total_discrepancy_pct: Option<f64>,
    pub active_discrepancy_pct: Option<f64>,
    /// A discrepancy above [`FLAG_PCT`], or a claim the numbers contradict.
    pub flagged: bool,
    /// "config <file>", "stated structure", "implied", "fit", "not computable", or
    /// "config not parsed by this build".
    pub basis: String,
    pub notes: Vec<String>,
}

fn pct(computed: f64, claimed: f64) -> f64 {
    (computed - claimed) / claimed * 100.0
}

/// Every claim, checked.
pub fn claims_table() -> Vec<ClaimRow> {
    CLAIMS.iter().map(check).collect()
}

fn check(c: &Claim) -> ClaimRow {
    let mut row = ClaimRow {
        model: c.model.to_string(),
        source: c.source.to_string(),
        claimed_total_params: c.claimed_total,
        claimed_active_params: c.claimed_active,
        computed_total_params: None,
        computed_active_params: None,
        total_discrepancy_pct: None,
        active_discrepancy_pct: None,
        flagged: false,
        basis: String::new(),
        notes: vec![],
    };
    let with_counts = |row: &mut ClaimRow, k: &ParamCounts| {
        row.computed_total_params = Some(k.total);
        row.computed_active_params = Some(k.active);
        row.total_discrepancy_pct = Some(pct(k.total as f64, c.claimed_total));
        row.active_discrepancy_pct = c.claimed_active.map(|a| pct(k.active as f64, a));
        row.flagged = [row.total_discrepancy_pct, row.active_discrepancy_pct]
            .iter()
            .flatten()
            .any(|d| d.abs() > FLAG_PCT);
        // Claims often quote active without embedding and lm_head (Qwen's "non-embedding").
        let non_emb = non_embedding_active(k);
        // OpenAI's gpt-oss counts drop the input embedding but keep the unembedding.
        let no_input = k.active - component_active(k, Component::Embedding);
        if let Some(a) = c.claimed_active {
            if (pct(non_emb as f64, a)).abs() <= FLAG_PCT && row.flagged {
                row.notes.push(format!(
                    "the claimed active matches active without embedding and lm_head: {} ({:+.1}%)",
                    fmt_b(non_emb as f64),
                    pct(non_emb as f64, a)
                ));
            } else if (pct(no_input as f64, a)).abs() <= FLAG_PCT && row.flagged {
                row.notes.push(format!(
                    "the claimed active matches active without the input embedding (the lm_head counted): {} ({:+.1}%)",
                    fmt_b(no_input as f64),
                    pct(no_input as f64, a)
                ));
            }
        }
    };
    match &c.basis {
        Basis::Config { repos, stated } => {
            let found = KNOWN_MODELS
                .iter()
                .find(|m| repos.iter().any(|r| r.eq_ignore_ascii_case(m.repo)));
            let Some(m) = found else {
                row.basis = "config not parsed by this build".into();
                row.notes.push(format!(
                    "no config for {} in this build's configs/",
                    repos.join(" or ")
                ));
                return row;
            };
            let cfg = match ModelConfig::from_json_str(m.config_json, m.name.as_ref()) {
                Ok(cfg) => cfg,
                Err(e) => {
                    row.basis = "config not parsed by this build".into();
                    row.notes.push(e.to_string());
                    return row;
                }
            };
            row.basis = format!("config --model {}", m.name);
            with_counts(&mut row, &param_counts(&cfg));
            if let Some((e, k, shared)) = stated {
                row.notes.extend(check_structure(&cfg, *e, *k, *shared));
            }
        }
        Basis::Structure(f) => {
            let comp = f();
            row.basis = "stated structure".into();
            with_counts(&mut row, &comp.counts);
            row.notes.extend(comp.assumptions);
        }
        Basis::Implied {
            experts,
            top_k,
            why_top_k,
        } => {
            row.basis = "implied".into();
            if let Some(active) = c.claimed_active {
                // total = S + E x e and active = S + k x e, so e = (total - active) / (E - k).
                let e = (c.claimed_total - active) / (experts - top_k) as f64;
                let s = active - *top_k as f64 * e;
                row.notes.push(format!(
                    "{experts} experts, top-{top_k} ({why_top_k}): each routed expert (summed over its MoE layers) = (total - active) / (E - k) = {}; always-on part (attention, shared expert, embeddings, dense layers) = active - k x expert = {}",
                    fmt_b(e),
                    fmt_b(s)
                ));
            }
        }
        Basis::Fit { gpu, params } => {
            row.basis = "fit".into();
            row.notes.extend(fit_notes(gpu, *params));
            row.flagged = true;
        }
        Basis::NotComputable(why) => {
            row.basis = "not computable".into();
            row.notes.push((*why).into());
        }
    }
    row
}

/// Active parameters of one component.
fn component_active(k: &ParamCounts, c: Component) -> u64 {
    k.by_component
        .iter()
        .find(|x| x.component == c)
        .map_or(0, |x| x.active)
}

/// Active parameters without the input embedding and a separate lm_head.
fn non_embedding_active(k: &ParamCounts) -> u64 {
    k.active - component_active(k, Component::Embedding) - component_active(k, Component::LmHead)
}

fn check_structure(cfg: &ModelConfig, e: usize, k: usize, shared: usize) -> Vec<String> {
    let Some(m) = cfg.layers.iter().find_map(|f| match f {
        FfnKind::Moe(m) => Some(m),
        FfnKind::Dense { .. } => None,
    }) else {
        return vec!["the config has no MoE layer".into()];
    };
    let cfg_shared = m.shared.map_or(0, |s| s.ffn / m.expert_ffn);
    if (m.num_experts, m.top_k, cfg_shared) == (e, k, shared) {
        vec![]
    } else {
        vec![format!(
            "stated {e} experts top-{k} ({shared} shared); the config says {} top-{} ({cfg_shared} shared)",
            m.num_experts, m.top_k
        )]
    }
}

/// `12.88B`, `1.83T`, `266.24K`, `1.05M`.
pub fn fmt_b(params: f64) -> String {
    match params {
        p if p >= 1e12 => format!("{:.2}T", p / 1e12),
        p if p >= 1e9 => format!("{:.2}B", p / 1e9),
        p if p >= 1e6 => format!("{:.2}M", p / 1e6),
        p => format!("{:.2}K", p / 1e3),
    }
}

/// One linear `[out, inp]` stored `n` times, `act` of them active.
fn lin(name: &'static str, c: Component, out: usize, inp: usize, n: u64, act: u64) -> TensorGroup {
    TensorGroup {
        name,
        component: c,
        kind: TensorKind::Linear { out, inp },
        stored: n,
        active: act,
        f32: false,
        mxfp4: false,
    }
}

fn vector(name: &'static str, c: Component, len: usize, n: u64) -> TensorGroup {
    TensorGroup {
        name,
        component: c,
        kind: TensorKind::Vector { len },
        stored: n,
        active: n,
        f32: false,
        mxfp4: false,
    }
}

/// GPT-4 as reported: 16 experts of ~111B (summed over layers), 2 per token, ~55B shared
/// (attention, embeddings). total = 16 x 111B + 55B; active = 2 x 111B + 55B.
fn gpt4() -> Computed {
    let (e, k, expert, shared) = (16u64, 2u64, 111.0 * B, 55.0 * B);
    let total = (e as f64 * expert + shared) as u64;
    let active = (k as f64 * expert + shared) as u64;
    Computed {
        counts: ParamCounts {
            total,
            active,
            active_excluding_embedding: active,
            matmul_active: active,
            tied_embeddings: false,
            by_component: vec![],
        },
        assumptions: vec![
            "16 experts x ~111B + ~55B shared attention/embedding; top-2: total = 16 x 111B + 55B, active = 2 x 111B + 55B".into(),
            "the report's rounding: its 1.8T and 277B come from these same round figures".into(),
        ],
    }
}

/// Grok-1 from its hyperparameters, through the same Mixtral-form parser and counter as a
/// real config: 64 layers, d 6144, 48 q / 8 kv heads x 128, 8 experts (ffn 32768) top-2,
/// vocab 131072, tied in/out embedding (`InOutEmbed.decode` multiplies by the embedding^T).
fn grok1() -> Computed {
    let json = r#"{"model_type": "mixtral", "vocab_size": 131072, "hidden_size": 6144,
        "intermediate_size": 32768, "num_hidden_layers": 64, "num_attention_heads": 48,
        "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
        "num_experts_per_tok": 2, "tie_word_embeddings": true, "max_position_embeddings": 8192}"#;
    let cfg = ModelConfig::from_json_str(json, "grok-1.HYPERPARAMS.json".as_ref())
        .expect("the Grok-1 structure is a valid Mixtral-form config");
    let mut inv = super::counts::tensor_inventory(&cfg);
    // Grok-1 normalises before and after both attention and MoE: 4 RMSNorms per layer, not 2.
    inv.push(vector("post_block_norms", Component::Norms, 6144, 2 * 64));
    Computed {
        counts: counts_of(&inv, true),
        assumptions: vec![
            "structure from grok-1.HYPERPARAMS.json, counted as a Mixtral-form config (gated GELU has the same 3 matrices per expert as SwiGLU)".into(),
            "4 RMSNorms per layer (pre/post attention and MoE), tied embedding".into(),
            "active is not claimed in the repo (xAI's post: ~25% of weights active per token)".into(),
        ],
    }
}

/// MiniMax-Text-01 from its model card: 80 layers, hidden 6144, 64 heads x 128, 32 experts
/// (ffn 9216) top-2, vocab 200064; one softmax-attention layer after every 7 lightning
/// (linear) attention layers.
fn minimax_text_01() -> Computed {
    let (l, h, heads, hd, e, k, f, v) = (80u64, 6144, 64, 128, 32u64, 2u64, 9216, 200_064);
    let q = heads * hd;
    let kv_heads = 8;
    let softmax_layers = l / 8;
    let lightning_layers = l - softmax_layers;
    let a = Component::Attention;
    let inv = vec![
        TensorGroup {
            name: "embed_tokens",
            component: Component::Embedding,
            kind: TensorKind::Lookup { rows: v, cols: h },
            stored: 1,
            active: 1,
            f32: false,
            mxfp4: false,
        },
        // Lightning attention: fused qkv, a sigmoid output gate, out_proj, a norm over q.
        lin(
            "lightning.qkv_proj",
            a,
            3 * q,
            h,
            lightning_layers,
            lightning_layers,
        ),
        lin(
            "lightning.output_gate",
            a,
            q,
            h,
            lightning_layers,
            lightning_layers,
        ),
        lin(
            "lightning.out_proj",
            a,
            h,
            q,
            lightning_layers,
            lightning_layers,
        ),
        vector("lightning.norm", a, q, lightning_layers),
        // Softmax attention (GQA, 8 KV heads).
        lin("q_proj", a, q, h, softmax_layers, softmax_layers),
        lin(
            "k_proj",
            a,
            kv_heads * hd,
            h,
            softmax_layers,
            softmax_layers,
        ),
        lin(
            "v_proj",
            a,
            kv_heads * hd,
            h,
            softmax_layers,
            softmax_layers,
        ),
        lin("o_proj", a, h, q, softmax_layers, softmax_layers),
        vector("layer_norms", Component::Norms, h, 2 * l + 1),
        lin("gate", Component::Router, e as usize, h, l, l),
        lin("w1", Component::RoutedExperts, f, h, e * l, k * l),
        lin("w3", Component::RoutedExperts, f, h, e * l, k * l),
        lin("w2", Component::RoutedExperts, h, f, e * l, k * l),
        lin("lm_head", Component::LmHead, v, h, 1, 1),
    ];
    Computed {
        counts: counts_of(&inv, false),
        assumptions: vec![
            "structure from the model card; 10 softmax-attention layers (every 8th) with 8 KV heads (third-party, unverified), 70 lightning-attention layers with fused qkv, output gate, out_proj and a norm".into(),
            "untied lm_head; 2 RMSNorms per layer + final".into(),
        ],
    }
}

/// What running `params` on `gpu` needs: bits per weight to hold the weights alone, and at
/// int4 (group 128 with 16-bit scale + zero: 4 + 32/128 bits per weight) how much offload.
fn fit_notes(gpu: &str, params: f64) -> Vec<String> {
    let Some(g) = find_gpu(gpu) else {
        return vec![format!("unknown GPU {gpu}")];
    };
    let mem = g.memory_bytes();
    let bits = mem * 8.0 / params;
    let int4_bits = 4.0 + 32.0 / INT4_GROUP as f64;
    let int4 = params * int4_bits / 8.0;
    let gib = (1u64 << 30) as f64;
    vec![
        format!(
            "{} holds {:.0} GiB: the weights alone fit only at <= {bits:.2} bits/weight (no KV cache, no activations)",
            g.name, g.memory_gib
        ),
        format!(
            "at int4 (group {INT4_GROUP}, {int4_bits:.2} bits/weight) the weights are {:.1} GiB: >= {:.1} GiB ({:.0}%) must be offloaded to CPU memory, and decode then streams the routed experts over PCIe",
            int4 / gib,
            (int4 - mem) / gib,
            (int4 - mem) / int4 * 100.0
        ),
    ]
}
