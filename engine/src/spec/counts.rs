//! Exact parameter counts from [`ModelConfig`] alone: the inventory groups the canonical tensors
//! of [`super::tensors::tensors`] (the one description of a model's tensors, shapes in its module
//! doc) and the byte, FLOP and roofline code read it too.
//!
//! Parameters are transformers' (`model.parameters()`): a tied lm_head is the embedding tensor,
//! counted once; the sigmoid routers' selection bias is a buffer, not counted.

use serde::Serialize;

use super::tensors::{tensors, Class, TensorSpec};
pub use super::tensors::{Component, MLA_KV_B};
use crate::config::{ModelConfig, MoeConfig};

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
    /// Stored in MXFP4 as the checkpoint publishes it, whatever the precision.
    pub mxfp4: bool,
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

/// Every tensor of the model, grouped, in the spec's order (embedding, layers, norm, lm_head).
/// Groups of different layers with the same name and shape are merged.
pub fn tensor_inventory(cfg: &ModelConfig) -> Vec<TensorGroup> {
    let mut out: Vec<TensorGroup> = Vec::new();
    for t in tensors(cfg).iter().filter(|t| t.class != Class::Buffer) {
        push_group(&mut out, t.group());
    }
    out
}

impl TensorSpec {
    /// This tensor as an inventory entry: what it is per token and how many of it are stored.
    pub fn group(&self) -> TensorGroup {
        let (d0, d1, d2) = (self.dim(0), self.dim(1), self.dim(2));
        let (kind, stored, active) = match self.class {
            Class::Lookup => (TensorKind::Lookup { rows: d0, cols: d1 }, 1, 1),
            Class::Linear => (TensorKind::Linear { out: d0, inp: d1 }, 1, 1),
            // E matrices stored, k used per token.
            Class::Experts { top_k } => (
                TensorKind::Linear { out: d1, inp: d2 },
                d0 as u64,
                top_k as u64,
            ),
            // A tied lm_head is used (a matmul) but not stored: stored 0, active 1.
            Class::Tied => (TensorKind::Linear { out: d0, inp: d1 }, 0, 1),
            Class::Norm | Class::Bias | Class::Buffer => (TensorKind::Vector { len: d0 }, 1, 1),
            // E bias vectors stored, k used per token.
            Class::ExpertBias { top_k } => {
                (TensorKind::Vector { len: d1 }, d0 as u64, top_k as u64)
            }
        };
        TensorGroup {
            name: self.role.name(),
            component: self.component(),
            kind,
            stored,
            active,
            f32: self.f32,
            mxfp4: self.mxfp4,
        }
    }
}

/// Adds `t` to the group of the same name, shape, component and storage, or as a new group.
fn push_group(out: &mut Vec<TensorGroup>, t: TensorGroup) {
    match out.iter_mut().find(|g| {
        g.name == t.name
            && g.kind == t.kind
            && g.component == t.component
            && g.f32 == t.f32
            && g.mxfp4 == t.mxfp4
    }) {
        Some(g) => {
            g.stored += t.stored;
            g.active += t.active;
        }
        None => out.push(t),
    }
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
    let biases = if m.biases {
        2 * m.expert_ffn + hidden
    } else {
        0
    };
    3 * m.expert_ffn as u64 * hidden as u64 + biases as u64
}
