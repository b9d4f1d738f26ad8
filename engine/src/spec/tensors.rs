//! THE description of a model's tensors: [`tensors`] lists, from the config alone, every canonical
//! tensor the engine holds (role, layer, shape, class), in one fixed order. Everything else is
//! derived from it, so a new family or a new tensor is described here once:
//! - the cost model's inventory and parameter counts ([`super::counts::tensor_inventory`], via
//!   [`TensorSpec::group`]) and its bytes ([`TensorSpec::storage`], the one quantization rule);
//! - the loader (`loader/naming.rs`), which reads each tensor under the family's names;
//! - random weights (`bench/random.rs`), which draw each tensor by its class;
//! - both build `model::ModelWeights` through `model::assemble`, which checks every shape.
//!
//! Legend: V vocab, H hidden, nh query heads, nkv KV heads, hd head dim, E experts, k top-k,
//! F expert (or dense / shared) FFN width. Linear weights are `[out, in]`.
//!
//! Canonical layout, per layer (GQA): input norm `[H]`; q/k/v fused `[nh*hd + 2*nkv*hd, H]`
//! (q rows, then k, then v; + one fused bias); QK-norm weights (`[hd]` each per head, or
//! `[nh*hd]` and `[nkv*hd]` for OLMoE's whole-projection norm); o `[H, nh*hd]`; post-attention
//! norm `[H]`; FFN: dense SwiGLU gate_up `[2F, H]` (gate rows, then up) + down `[H, F]`, or
//! router `[E, H]` + experts stacked gate_up `[E, 2F, H]` and down `[E, H, F]` + a shared SwiGLU
//! MLP (+ a `[1, H]` sigmoid gate for Qwen2-MoE) + the `[E]` selection bias of sigmoid routers.
//! MLA (DeepSeek): q_a_proj `[qr, H]` + q_a_layernorm `[qr]` + q_b_proj `[nh*(dn+dr), qr]` (or
//! q_proj `[nh*(dn+dr), H]` without q_lora_rank); kv_a_proj_with_mqa `[kvr+dr, H]`;
//! kv_a_layernorm `[kvr]`; kv_b_proj `[nh*(dn+dv), kvr]`; o_proj `[H, nh*dv]`.
//! Model: embedding `[V, H]` first, final norm `[H]` and lm_head `[V, H]` last (tied: the
//! embedding itself, not stored).

use serde::Serialize;

use crate::config::{FfnKind, ModelConfig, MoeConfig, QkNorm};

/// The inventory name of MLA's kv_b_proj (kept 16-bit by [`super::bytes::storage`]).
pub const MLA_KV_B: &str = "self_attn.kv_b_proj";

/// What a tensor belongs to. Decides its line in the breakdown and its storage under
/// quantization ([`super::bytes::storage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The input embedding table: a lookup (one row per token), not a matmul.
    Embedding,
    /// q/k/v/o (or the MLA projections), their biases and QK / latent norms.
    Attention,
    /// The per-layer RMSNorm / LayerNorm weights and the final norm.
    Norms,
    /// The expert-choosing gate `[E, H]` (and Qwen2-MoE's `[1, H]` shared-expert gate).
    Router,
    /// The E routed experts; k of them run per token.
    RoutedExperts,
    /// Always-on shared experts.
    SharedExperts,
    /// Dense FFN layers (DeepSeek's first layers, Qwen's `mlp_only_layers`).
    DenseFfn,
    LmHead,
}

impl Component {
    pub const ALL: [Component; 8] = [
        Component::Embedding,
        Component::Attention,
        Component::Norms,
        Component::Router,
        Component::RoutedExperts,
        Component::SharedExperts,
        Component::DenseFfn,
        Component::LmHead,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Component::Embedding => "embedding (lookup)",
            Component::Attention => "attention",
            Component::Norms => "norms",
            Component::Router => "router",
            Component::RoutedExperts => "routed experts",
            Component::SharedExperts => "shared experts",
            Component::DenseFfn => "dense FFN",
            Component::LmHead => "lm_head",
        }
    }
}

/// Which canonical tensor: one field of `model::ModelWeights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Embed,
    AttnNorm,
    /// GQA: fused q/k/v, its fused bias, the QK-norm weights.
    Qkv,
    QkvBias,
    QNorm,
    KNorm,
    /// The attention output projection (GQA or MLA).
    O,
    /// MLA: plain q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj.
    MlaQ,
    MlaQA,
    MlaQANorm,
    MlaQB,
    MlaKvA,
    MlaKvANorm,
    MlaKvB,
    FfnNorm,
    DenseGateUp,
    DenseDown,
    Router,
    ExpertsGateUp,
    ExpertsDown,
    SharedGate,
    SharedGateUp,
    SharedDown,
    /// Sigmoid routers' selection bias `[E]` (`e_score_correction_bias`).
    ScoreBias,
    /// gpt-oss: the output projection's bias `[H]`, the per-head sink logits `[heads]`, the
    /// router's bias `[E]` and the experts' biases `[E, 2F]` (gate rows, then up) and `[E, H]`.
    OBias,
    Sinks,
    RouterBias,
    ExpertsGateUpBias,
    ExpertsDownBias,
    FinalNorm,
    LmHead,
}

impl Role {
    /// Checkpoint-style name without the layer index (the inventory's group name).
    pub fn name(self) -> &'static str {
        match self {
            Role::Embed => "embed_tokens",
            Role::AttnNorm => "input_layernorm",
            Role::Qkv => "self_attn.qkv_proj",
            Role::QkvBias => "self_attn.qkv_proj.bias",
            Role::QNorm => "self_attn.q_norm",
            Role::KNorm => "self_attn.k_norm",
            Role::O => "self_attn.o_proj",
            Role::MlaQ => "self_attn.q_proj",
            Role::MlaQA => "self_attn.q_a_proj",
            Role::MlaQANorm => "self_attn.q_a_layernorm",
            Role::MlaQB => "self_attn.q_b_proj",
            Role::MlaKvA => "self_attn.kv_a_proj_with_mqa",
            Role::MlaKvANorm => "self_attn.kv_a_layernorm",
            Role::MlaKvB => MLA_KV_B,
            Role::FfnNorm => "post_attention_layernorm",
            Role::DenseGateUp => "mlp.gate_up_proj",
            Role::DenseDown => "mlp.down_proj",
            Role::Router => "mlp.gate",
            Role::ExpertsGateUp => "mlp.experts.gate_up_proj",
            Role::ExpertsDown => "mlp.experts.down_proj",
            Role::SharedGate => "mlp.shared_expert_gate",
            Role::OBias => "self_attn.o_proj.bias",
            Role::Sinks => "self_attn.sinks",
            Role::RouterBias => "mlp.router.bias",
            Role::ExpertsGateUpBias => "mlp.experts.gate_up_proj_bias",
            Role::ExpertsDownBias => "mlp.experts.down_proj_bias",
            Role::SharedGateUp => "mlp.shared_experts.gate_up_proj",
            Role::SharedDown => "mlp.shared_experts.down_proj",
            Role::ScoreBias => "mlp.gate.e_score_correction_bias",
            Role::FinalNorm => "norm",
            Role::LmHead => "lm_head",
        }
    }

    pub fn component(self) -> Component {
        match self {
            Role::Embed => Component::Embedding,
            Role::AttnNorm | Role::FfnNorm | Role::FinalNorm => Component::Norms,
            Role::Qkv
            | Role::QkvBias
            | Role::QNorm
            | Role::KNorm
            | Role::O
            | Role::MlaQ
            | Role::MlaQA
            | Role::MlaQANorm
            | Role::MlaQB
            | Role::MlaKvA
            | Role::MlaKvANorm
            | Role::MlaKvB
            | Role::OBias
            | Role::Sinks => Component::Attention,
            Role::DenseGateUp | Role::DenseDown => Component::DenseFfn,
            Role::Router | Role::SharedGate | Role::ScoreBias | Role::RouterBias => {
                Component::Router
            }
            Role::ExpertsGateUp
            | Role::ExpertsDown
            | Role::ExpertsGateUpBias
            | Role::ExpertsDownBias => Component::RoutedExperts,
            Role::SharedGateUp | Role::SharedDown => Component::SharedExperts,
            Role::LmHead => Component::LmHead,
        }
    }
}

/// What kind of tensor it is: with its [`Component`], decides how it is counted and costed
/// ([`TensorSpec::group`]), stored under quantization ([`TensorSpec::storage`]) and drawn as
/// random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The embedding table `[V, H]`: a token reads one row.
    Lookup,
    /// A linear weight `[out, in]`.
    Linear,
    /// E stacked linear weights `[E, out, in]` (the routed experts), `top_k` of which a token uses.
    Experts { top_k: usize },
    /// A tied lm_head `[V, H]`: the embedding matrix, multiplied per token but not stored again.
    Tied,
    /// A norm weight `[len]` (ones when drawn at random).
    Norm,
    /// A bias `[len]` (zeros when drawn at random).
    Bias,
    /// E stacked biases `[E, len]` of the routed experts, `top_k` of which a token uses.
    ExpertBias { top_k: usize },
    /// A buffer, not a parameter in transformers' count (so not in the cost model's inventory):
    /// the sigmoid routers' selection bias `[E]` (zeros when drawn at random).
    Buffer,
}

/// One canonical tensor of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub role: Role,
    /// The decoder layer, or `None` for the embedding, the final norm and the lm_head.
    pub layer: Option<usize>,
    /// Canonical shape: `[out, in]`, `[E, out, in]` for stacked experts, `[len]` for vectors.
    pub shape: Vec<usize>,
    pub class: Class,
    /// Rows (along `out`, per expert when stacked) of each tensor it is fused from, in order:
    /// q, k, v for the fused attention projection and bias; gate, up for a gate_up; one entry
    /// otherwise.
    pub parts: Vec<usize>,
    /// Kept in f32 whatever the compute dtype (`MoeConfig::router_f32`, the selection bias).
    pub f32: bool,
    /// Stored in MXFP4 as the checkpoint publishes it (`ModelConfig::experts_mxfp4`).
    pub mxfp4: bool,
}

impl TensorSpec {
    fn new(role: Role, layer: Option<usize>, shape: Vec<usize>, class: Class) -> Self {
        // One part: the out rows (the length of a vector).
        let rows = shape.iter().rev().nth(1).or(shape.first()).copied();
        TensorSpec {
            role,
            layer,
            parts: rows.into_iter().collect(),
            shape,
            class,
            f32: false,
            mxfp4: false,
        }
    }

    fn fused(self, parts: Vec<usize>) -> Self {
        TensorSpec { parts, ..self }
    }

    fn in_f32(self, f32: bool) -> Self {
        TensorSpec { f32, ..self }
    }

    /// Dimension `i` of the shape (0 past its end).
    pub fn dim(&self, i: usize) -> usize {
        self.shape.get(i).copied().unwrap_or(0)
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub fn component(&self) -> Component {
        self.role.component()
    }
}

/// Every canonical tensor of `cfg`, in the order the loader reads them and random weights draw
/// them: the embedding, each layer's ([`layer_tensors`]), the final norm, the lm_head.
pub fn tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![TensorSpec::new(
        Role::Embed,
        None,
        vec![v, h],
        Class::Lookup,
    )];
    for i in 0..cfg.num_layers() {
        out.extend(layer_tensors(cfg, i));
    }
    out.push(TensorSpec::new(Role::FinalNorm, None, vec![h], Class::Norm));
    let lm_head = if cfg.tie_word_embeddings {
        Class::Tied
    } else {
        Class::Linear
    };
    out.push(TensorSpec::new(Role::LmHead, None, vec![v, h], lm_head));
    out
}

/// The tensors of decoder layer `i` (none past the last layer): input norm, attention,
/// post-attention norm, FFN.
pub fn layer_tensors(cfg: &ModelConfig, i: usize) -> Vec<TensorSpec> {
    let Some(ffn) = cfg.layers.get(i) else {
        return Vec::new();
    };
    let h = cfg.hidden_size;
    let t = |role, shape, class| TensorSpec::new(role, Some(i), shape, class);
    let mut out = vec![t(Role::AttnNorm, vec![h], Class::Norm)];
    attention(cfg, &mut out, &t);
    out.push(t(Role::FfnNorm, vec![h], Class::Norm));
    match ffn {
        FfnKind::Dense { intermediate } => swiglu(
            &mut out,
            &t,
            [Role::DenseGateUp, Role::DenseDown],
            h,
            *intermediate,
        ),
        FfnKind::Moe(m) => moe(&mut out, &t, m, h),
    }
    for t in out.iter_mut() {
        t.mxfp4 = cfg.experts_mxfp4 && matches!(t.class, Class::Experts { .. });
    }
    out
}

type Make<'a> = dyn Fn(Role, Vec<usize>, Class) -> TensorSpec + 'a;

/// A SwiGLU MLP: gate_up `[2F, H]` (gate rows, then up), down `[H, F]`.
fn swiglu(out: &mut Vec<TensorSpec>, t: &Make, roles: [Role; 2], h: usize, f: usize) {
    let [gate_up, down] = roles;
    out.push(t(gate_up, vec![2 * f, h], Class::Linear).fused(vec![f, f]));
    out.push(t(down, vec![h, f], Class::Linear));
}

/// One MoE layer: router, E stacked experts (k active), shared experts and their gate, and the
/// sigmoid routers' selection bias.
fn moe(out: &mut Vec<TensorSpec>, t: &Make, m: &MoeConfig, h: usize) {
    let (e, f) = (m.num_experts, m.expert_ffn);
    out.push(t(Role::Router, vec![e, h], Class::Linear).in_f32(m.router_f32));
    let experts = Class::Experts { top_k: m.top_k };
    out.push(t(Role::ExpertsGateUp, vec![e, 2 * f, h], experts).fused(vec![f, f]));
    out.push(t(Role::ExpertsDown, vec![e, h, f], experts));
    if m.biases {
        let b = Class::ExpertBias { top_k: m.top_k };
        out.push(t(Role::RouterBias, vec![e], Class::Bias));
        out.push(t(Role::ExpertsGateUpBias, vec![e, 2 * f], b).fused(vec![f, f]));
        out.push(t(Role::ExpertsDownBias, vec![e, h], b).fused(vec![h]));
    }
    if let Some(s) = m.shared {
        if s.sigmoid_gate {
            // Qwen2-MoE: sigmoid(x g^T) scales the shared expert; g is `[1, H]`.
            out.push(t(Role::SharedGate, vec![1, h], Class::Linear));
        }
        swiglu(out, t, [Role::SharedGateUp, Role::SharedDown], h, s.ffn);
    }
    if m.correction_bias {
        out.push(t(Role::ScoreBias, vec![e], Class::Buffer).in_f32(true));
    }
}

/// The attention tensors of one layer.
fn attention(cfg: &ModelConfig, out: &mut Vec<TensorSpec>, t: &Make) {
    let h = cfg.hidden_size;
    let lin = |role, o, i| t(role, vec![o, i], Class::Linear);
    let norm = |role, len| t(role, vec![len], Class::Norm);
    if let Some(m) = cfg.mla {
        let nh = cfg.num_heads;
        let (dn, dr, dv, kvr) = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        match m.q_lora_rank {
            Some(qr) => out.extend([
                lin(Role::MlaQA, qr, h),
                norm(Role::MlaQANorm, qr),
                lin(Role::MlaQB, nh * (dn + dr), qr),
            ]),
            None => out.push(lin(Role::MlaQ, nh * (dn + dr), h)),
        }
        out.extend([
            lin(Role::MlaKvA, kvr + dr, h),
            norm(Role::MlaKvANorm, kvr),
            lin(Role::MlaKvB, nh * (dn + dv), kvr),
            lin(Role::O, h, nh * dv),
        ]);
        return;
    }
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    out.push(lin(Role::Qkv, q + 2 * kv, h).fused(vec![q, kv, kv]));
    if cfg.attn.qkv_bias {
        out.push(t(Role::QkvBias, vec![q + 2 * kv], Class::Bias).fused(vec![q, kv, kv]));
    }
    let qk_norm = match cfg.attn.qk_norm {
        QkNorm::None | QkNorm::UnitAfterRope => None,
        QkNorm::Whole => Some((q, kv)),
        QkNorm::PerHeadBeforeRope | QkNorm::PerHeadAfterRope => Some((cfg.head_dim, cfg.head_dim)),
    };
    if let Some((qn, kn)) = qk_norm {
        out.extend([norm(Role::QNorm, qn), norm(Role::KNorm, kn)]);
    }
    out.push(lin(Role::O, h, q));
    if cfg.attn.o_bias {
        out.push(t(Role::OBias, vec![h], Class::Bias));
    }
    if cfg.attn.sinks {
        // Kept in f32: they enter an f32 softmax.
        out.push(t(Role::Sinks, vec![cfg.num_heads], Class::Bias).in_f32(true));
    }
}

/// Every config the tests know: the built-in models (`configs/`), the parity fixtures
/// (`tests/fixtures`) and, when present beside the repository, `../shared/reference-configs`
/// (those that parse).
#[cfg(test)]
pub(crate) fn every_config() -> Vec<(String, ModelConfig)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<(String, ModelConfig)> = crate::config::registry::KNOWN_MODELS
        .iter()
        .map(|m| {
            let cfg = ModelConfig::from_json_str(m.config_json, m.name.as_ref());
            (m.name.to_string(), cfg.expect("a known config parses"))
        })
        .collect();
    for dir in ["tests/fixtures", "../shared/reference-configs"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let file = if p.is_dir() { p.join("config.json") } else { p };
            if file.extension().is_some_and(|x| x == "json") {
                if let Ok(cfg) = ModelConfig::from_file(&file) {
                    out.push((file.display().to_string(), cfg));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::bytes::{weight_bytes, Precision, Storage};
    use crate::spec::counts::{param_counts, tensor_inventory};

    fn known(name: &str) -> ModelConfig {
        let m = crate::config::registry::find(name).unwrap();
        ModelConfig::from_json_str(m.config_json, name.as_ref()).unwrap()
    }

    #[test]
    fn the_spec_is_well_formed_for_every_config() {
        let all = every_config();
        assert!(all.len() >= 9 + 16, "only {} configs", all.len());
        for (name, cfg) in &all {
            let spec = tensors(cfg);
            let first = spec.first().unwrap();
            let last = spec.last().unwrap();
            assert_eq!(
                (first.role, last.role),
                (Role::Embed, Role::LmHead),
                "{name}"
            );
            assert_eq!(last.class == Class::Tied, cfg.tie_word_embeddings, "{name}");
            for i in 0..cfg.num_layers() {
                let layer: Vec<_> = spec.iter().filter(|t| t.layer == Some(i)).collect();
                assert_eq!(layer.first().unwrap().role, Role::AttnNorm, "{name} {i}");
                assert_eq!(layer_tensors(cfg, i).len(), layer.len(), "{name} {i}");
                for t in &layer {
                    let same = layer.iter().filter(|u| u.role == t.role).count();
                    assert_eq!(same, 1, "{name} layer {i}: {:?} twice", t.role);
                }
            }
            assert!(layer_tensors(cfg, cfg.num_layers()).is_empty());
            for t in &spec {
                // The parts fill the rows (per expert when stacked), and the shape fits the class.
                let (rows, rank) = match t.class {
                    Class::Experts { top_k } => {
                        assert!(top_k <= t.dim(0), "{name} {t:?}");
                        (t.dim(1), 3)
                    }
                    Class::Norm | Class::Bias | Class::Buffer => (t.dim(0), 1),
                    Class::ExpertBias { .. } => (t.dim(1), 2),
                    _ => (t.dim(0), 2),
                };
                assert_eq!(t.shape.len(), rank, "{name} {t:?}");
                assert_eq!(t.parts.iter().sum::<usize>(), rows, "{name} {t:?}");
                assert_eq!(t.f32, t.storage() == Storage::KeepF32, "{name} {t:?}");
            }
            // The inventory is the spec's tensors (the buffer aside), nothing else: every stored
            // tensor's elements are its parameters, and fp32 bytes are 4 per element (published
            // MXFP4 experts 17 bytes per 32 weights whatever the precision).
            let stored = |mxfp4: bool| -> u64 {
                spec.iter()
                    .filter(|t| !matches!(t.class, Class::Tied | Class::Buffer))
                    .filter(|t| t.mxfp4 == mxfp4)
                    .map(TensorSpec::numel)
                    .sum()
            };
            let counts = param_counts(cfg);
            assert_eq!(counts.total, stored(false) + stored(true), "{name}");
            let inv = tensor_inventory(cfg);
            assert_eq!(
                weight_bytes(&inv, Precision::Fp32),
                4 * stored(false) + stored(true) * 17 / 32,
                "{name}"
            );
        }
    }

    #[test]
    fn totals_of_known_models_are_unchanged() {
        // transformers' counts (tests/fixtures/param_counts.json).
        for (name, total, active) in [
            ("deepseek-v3", 671_026_404_352, 37_552_282_624),
            ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
            ("mixtral-8x22b", 140_620_634_112, 39_152_031_744),
            ("dbrx", 131_596_523_520, 36_469_708_800),
            ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),
            ("hunyuan-a13b", 80_393_183_232, 12_747_448_320),
            ("deepseek-v2-lite", 15_706_484_224, 2_661_150_208),
        ] {
            let c = param_counts(&known(name));
            assert_eq!((c.total, c.active), (total, active), "{name}");
        }
    }

    #[test]
    fn a_small_mixtral_by_hand() {
        let cfg = ModelConfig::from_json_str(
            r#"{"model_type": "mixtral", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2}"#,
            "tiny".as_ref(),
        )
        .unwrap();
        let got: Vec<_> = tensors(&cfg)
            .into_iter()
            .map(|t| (t.role, t.layer, t.shape, t.class, t.parts))
            .collect();
        let l = Some(0);
        let e = Class::Experts { top_k: 2 };
        assert_eq!(
            got,
            vec![
                (Role::Embed, None, vec![100, 64], Class::Lookup, vec![100]),
                (Role::AttnNorm, l, vec![64], Class::Norm, vec![64]),
                // q 4 x 16 rows, k and v 2 x 16.
                (Role::Qkv, l, vec![128, 64], Class::Linear, vec![64, 32, 32]),
                (Role::O, l, vec![64, 64], Class::Linear, vec![64]),
                (Role::FfnNorm, l, vec![64], Class::Norm, vec![64]),
                (Role::Router, l, vec![8, 64], Class::Linear, vec![8]),
                (Role::ExpertsGateUp, l, vec![8, 192, 64], e, vec![96, 96]),
                (Role::ExpertsDown, l, vec![8, 64, 96], e, vec![64]),
                (Role::FinalNorm, None, vec![64], Class::Norm, vec![64]),
                (Role::LmHead, None, vec![100, 64], Class::Linear, vec![100]),
            ]
        );
        let storage: Vec<_> = tensors(&cfg).iter().map(TensorSpec::storage).collect();
        use Storage::{Keep16, Quantized};
        assert_eq!(
            storage,
            [
                Keep16, Keep16, Quantized, Quantized, Keep16, Keep16, Quantized, Quantized, Keep16,
                Keep16
            ]
        );
    }

    #[test]
    fn classes_follow_the_config() {
        let v3 = known("deepseek-v3");
        let spec = tensors(&v3);
        let layer = |i: usize| -> Vec<Role> {
            spec.iter()
                .filter(|t| t.layer == Some(i))
                .map(|t| t.role)
                .collect()
        };
        // Dense first layers, then MoE with a shared expert and the sigmoid router's buffer.
        assert!(layer(0).contains(&Role::DenseGateUp) && !layer(0).contains(&Role::Router));
        assert_eq!(
            layer(3),
            [
                Role::AttnNorm,
                Role::MlaQA,
                Role::MlaQANorm,
                Role::MlaQB,
                Role::MlaKvA,
                Role::MlaKvANorm,
                Role::MlaKvB,
                Role::O,
                Role::FfnNorm,
                Role::Router,
                Role::ExpertsGateUp,
                Role::ExpertsDown,
                Role::SharedGateUp,
                Role::SharedDown,
                Role::ScoreBias,
            ]
        );
        let bias = spec.iter().find(|t| t.role == Role::ScoreBias).unwrap();
        assert_eq!(
            (bias.class, bias.f32, bias.shape.clone()),
            (Class::Buffer, true, vec![256])
        );
        let kv_b = spec.iter().find(|t| t.role == Role::MlaKvB).unwrap();
        assert_eq!(kv_b.storage(), Storage::Keep16);
        // HunYuan: f32 router, tied lm_head, per-head QK-norms.
        let h = tensors(&known("hunyuan-a13b"));
        let router = h.iter().find(|t| t.role == Role::Router).unwrap();
        assert!(router.f32 && router.storage() == Storage::KeepF32);
        assert_eq!(h.last().unwrap().class, Class::Tied);
        assert_eq!(
            h.iter().find(|t| t.role == Role::QNorm).unwrap().shape,
            [128]
        );
    }
}
