//! Exact parameter counts from [`ModelConfig`] alone, through one tensor inventory that the byte,
//! FLOP and roofline code read too.
//!
//! Legend: V vocab, H hidden, L layers, nh query heads, nkv KV heads, hd head dim, E experts,
//! k top-k, F expert (or dense / shared) FFN width. Linear weights are `[out, in]`.
//!
//! Per layer (GQA): q `[nh*hd, H]`, k and v `[nkv*hd, H]`, o `[H, nh*hd]` (+ q/k/v biases),
//! QK-norm weights (`[hd]` x 2 per head-wise norm, `[nh*hd]` + `[nkv*hd]` for OLMoE's whole
//! norm), two `[H]` norms; FFN: dense SwiGLU 3 x F x H, or router `[E, H]` + E experts of
//! 3 x F x H + a shared SwiGLU MLP (+ a `[1, H]` sigmoid gate for Qwen2-MoE).
//! MLA (DeepSeek): q_a_proj `[qr, H]` + q_a_layernorm `[qr]` + q_b_proj `[nh*(dn+dr), qr]` (or
//! q_proj `[nh*(dn+dr), H]` without q_lora_rank); kv_a_proj_with_mqa `[kvr+dr, H]`;
//! kv_a_layernorm `[kvr]`; kv_b_proj `[nh*(dn+dv), kvr]`; o_proj `[H, nh*dv]`.
//! Model: embedding `[V, H]`, final norm `[H]`, lm_head `[V, H]` unless tied (then it is the
//! embedding tensor, counted once, as transformers' `model.parameters()` does).

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

/// The shape of one tensor and what a token does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// A linear weight `[out, inp]`: y = x W^T, 2 x out x inp FLOPs per token.
    Linear { out: usize, inp: usize },
    /// The embedding table `[rows, cols]`: a token reads one row.
    Lookup { rows: usize, cols: usize },
    /// A norm weight or a bias: elementwise, no matmul.
    Vector { len: usize },
}

impl TensorKind {
    pub fn numel(self) -> u64 {
        match self {
            TensorKind::Linear { out, inp } => out as u64 * inp as u64,
            TensorKind::Lookup { rows, cols } => rows as u64 * cols as u64,
            TensorKind::Vector { len } => len as u64,
        }
    }
}

/// A set of identical tensors, e.g. "w1 of every expert of every layer".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorGroup {
    /// Checkpoint-style name without the layer / expert index, e.g. `mlp.experts.gate_proj`.
    pub name: &'static str,
    pub component: Component,
    pub kind: TensorKind,
    /// How many of these tensors the model stores. 0 for a tied lm_head: it multiplies with
    /// the embedding tensor, which is stored (and counted) once.
    pub stored: u64,
    /// How many of them one token uses (k of E experts per MoE layer; 1 lm_head even if tied).
    pub active: u64,
    /// Kept in f32 whatever the model dtype (`MoeConfig::router_f32`, HunYuan's `wg`).
    pub f32: bool,
}

impl TensorGroup {
    pub fn stored_params(&self) -> u64 {
        self.kind.numel() * self.stored
    }

    /// Parameters of this group a token touches, counting stored tensors only (so a tied
    /// lm_head adds nothing: its matrix is the embedding, already counted).
    pub fn active_params(&self) -> u64 {
        if self.stored == 0 {
            0
        } else {
            self.kind.numel() * self.active
        }
    }

    /// Parameters this group multiplies with per token (tied lm_head included, the lookup
    /// and the elementwise vectors not): the matmul FLOPs per token are twice this.
    pub fn matmul_params(&self) -> u64 {
        match self.kind {
            TensorKind::Linear { .. } => self.kind.numel() * self.active,
            _ => 0,
        }
    }
}

/// Every tensor of the model, grouped, in checkpoint order (embedding, layers, norm, lm_head).
/// Groups of different layers with the same name and shape are merged.
pub fn tensor_inventory(cfg: &ModelConfig) -> Vec<TensorGroup> {
    let h = cfg.hidden_size;
    let (v, l) = (cfg.vocab_size, cfg.num_layers() as u64);
    let mut out: Vec<TensorGroup> = Vec::new();
    let embedding = TensorKind::Lookup { rows: v, cols: h };
    push_group(
        &mut out,
        "embed_tokens",
        Component::Embedding,
        embedding,
        1,
        1,
        false,
    );

    // Attention and the two norms: the same in every layer.
    for (name, kind) in attention_tensors(cfg) {
        push_group(&mut out, name, Component::Attention, kind, l, l, false);
    }
    for name in ["input_layernorm", "post_attention_layernorm"] {
        push_group(
            &mut out,
            name,
            Component::Norms,
            TensorKind::Vector { len: h },
            l,
            l,
            false,
        );
    }

    // FFN: per layer (dense, or MoE whose E / k / F may differ by layer).
    for ffn in &cfg.layers {
        match ffn {
            FfnKind::Dense { intermediate } => {
                let names = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"];
                for (name, kind) in swiglu(names, h, *intermediate) {
                    push_group(&mut out, name, Component::DenseFfn, kind, 1, 1, false);
                }
            }
            FfnKind::Moe(m) => moe_tensors(&mut out, m, h),
        }
    }

    push_group(
        &mut out,
        "norm",
        Component::Norms,
        TensorKind::Vector { len: h },
        1,
        1,
        false,
    );
    // A tied lm_head is used (a matmul) but not stored: stored 0, active 1.
    let lm_stored = u64::from(!cfg.tie_word_embeddings);
    let lm_head = TensorKind::Linear { out: v, inp: h };
    push_group(
        &mut out,
        "lm_head",
        Component::LmHead,
        lm_head,
        lm_stored,
        1,
        false,
    );
    out
}

fn push_group(
    out: &mut Vec<TensorGroup>,
    name: &'static str,
    component: Component,
    kind: TensorKind,
    stored: u64,
    active: u64,
    f32: bool,
) {
    match out
        .iter_mut()
        .find(|g| g.name == name && g.kind == kind && g.component == component && g.f32 == f32)
    {
        Some(g) => {
            g.stored += stored;
            g.active += active;
        }
        None => out.push(TensorGroup {
            name,
            component,
            kind,
            stored,
            active,
            f32,
        }),
    }
}

/// gate `[F, H]`, up `[F, H]`, down `[H, F]`.
fn swiglu(names: [&'static str; 3], h: usize, f: usize) -> [(&'static str, TensorKind); 3] {
    [
        (names[0], TensorKind::Linear { out: f, inp: h }),
        (names[1], TensorKind::Linear { out: f, inp: h }),
        (names[2], TensorKind::Linear { out: h, inp: f }),
    ]
}

/// One MoE layer: router, E experts (k active), shared experts and their gate.
fn moe_tensors(out: &mut Vec<TensorGroup>, m: &MoeConfig, h: usize) {
    let (e, k) = (m.num_experts as u64, m.top_k as u64);
    push_group(
        out,
        "mlp.gate",
        Component::Router,
        TensorKind::Linear {
            out: m.num_experts,
            inp: h,
        },
        1,
        1,
        m.router_f32,
    );
    let names = [
        "mlp.experts.gate_proj",
        "mlp.experts.up_proj",
        "mlp.experts.down_proj",
    ];
    for (name, kind) in swiglu(names, h, m.expert_ffn) {
        push_group(out, name, Component::RoutedExperts, kind, e, k, false);
    }
    if let Some(s) = m.shared {
        let names = [
            "mlp.shared_experts.gate_proj",
            "mlp.shared_experts.up_proj",
            "mlp.shared_experts.down_proj",
        ];
        for (name, kind) in swiglu(names, h, s.ffn) {
            push_group(out, name, Component::SharedExperts, kind, 1, 1, false);
        }
        if s.sigmoid_gate {
            // Qwen2-MoE: sigmoid(x g^T) scales the shared expert; g is `[1, H]`.
            push_group(
                out,
                "mlp.shared_expert_gate",
                Component::Router,
                TensorKind::Linear { out: 1, inp: h },
                1,
                1,
                false,
            );
        }
    }
}

/// The attention tensors of one layer.
fn attention_tensors(cfg: &ModelConfig) -> Vec<(&'static str, TensorKind)> {
    let h = cfg.hidden_size;
    let lin = |out, inp| TensorKind::Linear { out, inp };
    let vec = |len| TensorKind::Vector { len };
    if let Some(m) = cfg.mla {
        let nh = cfg.num_heads;
        let (dn, dr, dv, kvr) = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        let mut t = match m.q_lora_rank {
            Some(qr) => vec![
                ("self_attn.q_a_proj", lin(qr, h)),
                ("self_attn.q_a_layernorm", vec(qr)),
                ("self_attn.q_b_proj", lin(nh * (dn + dr), qr)),
            ],
            None => vec![("self_attn.q_proj", lin(nh * (dn + dr), h))],
        };
        t.extend([
            ("self_attn.kv_a_proj_with_mqa", lin(kvr + dr, h)),
            ("self_attn.kv_a_layernorm", vec(kvr)),
            (MLA_KV_B, lin(nh * (dn + dv), kvr)),
            ("self_attn.o_proj", lin(h, nh * dv)),
        ]);
        return t;
    }
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let mut t = vec![
        ("self_attn.q_proj", lin(q, h)),
        ("self_attn.k_proj", lin(kv, h)),
        ("self_attn.v_proj", lin(kv, h)),
        ("self_attn.o_proj", lin(h, q)),
    ];
    if cfg.attn.qkv_bias {
        t.extend([
            ("self_attn.q_proj.bias", vec(q)),
            ("self_attn.k_proj.bias", vec(kv)),
            ("self_attn.v_proj.bias", vec(kv)),
        ]);
    }
    match cfg.attn.qk_norm {
        QkNorm::None => {}
        QkNorm::Whole => t.extend([("self_attn.q_norm", vec(q)), ("self_attn.k_norm", vec(kv))]),
        QkNorm::PerHeadBeforeRope | QkNorm::PerHeadAfterRope => t.extend([
            ("self_attn.q_norm", vec(cfg.head_dim)),
            ("self_attn.k_norm", vec(cfg.head_dim)),
        ]),
    }
    t
}

/// Parameters of one component: all of them, and those one token uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ComponentCount {
    pub component: Component,
    pub total: u64,
    pub active: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Every stored parameter, tied embeddings once (= transformers' `model.parameters()`).
    pub total: u64,
    /// Per token: total minus the (E - k) unused experts of every MoE layer. Includes the
    /// whole embedding table (the usual convention, and transformers' count).
    pub active: u64,
    /// `active` without the input embedding, which is a lookup, not a matmul. With tied
    /// embeddings the same matrix is the lm_head and stays: then this equals `active`.
    pub active_excluding_embedding: u64,
    /// Parameters multiplied per token: every active linear weight, a tied lm_head included;
    /// no lookup, norm or bias. FLOPs per token = 2 x this + attention over the context.
    pub matmul_active: u64,
    pub tied_embeddings: bool,
    /// In [`Component::ALL`] order.
    pub by_component: Vec<ComponentCount>,
}

pub fn param_counts(cfg: &ModelConfig) -> ParamCounts {
    counts_of(&tensor_inventory(cfg), cfg.tie_word_embeddings)
}

/// The sums over an inventory (exposed so a hand-built inventory can be counted the same way).
pub fn counts_of(inv: &[TensorGroup], tied_embeddings: bool) -> ParamCounts {
    let by_component: Vec<ComponentCount> = Component::ALL
        .iter()
        .map(|&c| {
            let groups = inv.iter().filter(|g| g.component == c);
            ComponentCount {
                component: c,
                total: groups.clone().map(TensorGroup::stored_params).sum(),
                active: groups.map(TensorGroup::active_params).sum(),
            }
        })
        .collect();
    let total = inv.iter().map(TensorGroup::stored_params).sum();
    let active: u64 = inv.iter().map(TensorGroup::active_params).sum();
    let embedding: u64 = inv
        .iter()
        .filter(|g| matches!(g.kind, TensorKind::Lookup { .. }))
        .map(TensorGroup::active_params)
        .sum();
    let active_excluding_embedding = if tied_embeddings {
        active
    } else {
        active - embedding
    };
    ParamCounts {
        total,
        active,
        active_excluding_embedding,
        matmul_active: inv.iter().map(TensorGroup::matmul_params).sum(),
        tied_embeddings,
        by_component,
    }
}

/// Parameters of one routed expert of an MoE layer: 3 x F x H (gate, up, down).
pub fn expert_params(m: &MoeConfig, hidden: usize) -> u64 {
    3 * m.expert_ffn as u64 * hidden as u64
}
