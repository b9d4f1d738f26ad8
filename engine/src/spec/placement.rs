//! Hybrid placement of a model bigger than its GPU: what stays on the GPU and which routed experts
//! stay in host memory and run on the CPU kernels, decided before anything is loaded (the speed
//! it predicts is `analysis::placement::predict`). Pure functions of the config, the precision,
//! the budget and (optionally) a measured routing profile.
//!
//! What goes on the GPU first, always: embeddings, attention, norms, routers, shared experts,
//! dense layers, lm_head, the KV cache of `batch` sequences at `context` tokens and an activation
//! workspace ([`workspace_bytes`]). Then routed experts, one at a time:
//! - with a profile ([`RoutingProfile`]): hottest first over all layers (the share of a layer's
//!   routed tokens an expert served), so the GPU serves as many routed tokens as fit;
//! - with `--n-cpu-moe N`: the routed experts of the first N MoE layers on the CPU, every other
//!   one on the GPU (llama.cpp's flag); refused when the rest does not fit;
//! - otherwise whole layers from the last (the first MoE layers stay on the CPU), as many as fit:
//!   `--n-cpu-moe` with the smallest N that fits.
//!
//! The plan is refused, naming the bytes, when the fixed part alone exceeds the budget.

use serde::{Deserialize, Serialize};

use super::bytes::{expert_bytes, kv_bytes_per_sequence, weight_bytes, Precision};
use super::counts::tensor_inventory;
use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};

/// Bytes the budget leaves for the CUDA context, cuBLAS workspace and allocator slack when it
/// comes from a GPU's nominal memory (`--gpu`) or the driver's free memory.
pub const SAFETY_MARGIN_BYTES: u64 = 768 << 20;

/// Prompt tokens one prefill forward is sized for in [`workspace_bytes`].
pub const WORKSPACE_TOKENS: u64 = 512;

/// How many tokens chose each routed expert, per MoE layer: what `moe-run profile` writes and
/// `--profile` reads. `layers[i]` is decoder layer i (empty for a dense layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingProfile {
    /// The model it was measured on (informative).
    pub model: String,
    /// Tokens run through the model.
    pub tokens: u64,
    /// Per decoder layer, per expert: tokens routed to it.
    pub layers: Vec<Vec<u64>>,
}

impl RoutingProfile {
    /// Reads a profile written by `moe-run profile`.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks that the profile has `cfg`'s layers and experts.
    pub fn check(&self, cfg: &ModelConfig) -> Result<()> {
        if self.layers.len() != cfg.num_layers() {
            return Err(Error::Input(format!(
                "routing profile of {:?}: {} layers, the model has {}",
                self.model,
                self.layers.len(),
                cfg.num_layers()
            )));
        }
        for (i, (counts, ffn)) in self.layers.iter().zip(&cfg.layers).enumerate() {
            let want = match ffn {
                FfnKind::Moe(m) => m.num_experts,
                FfnKind::Dense { .. } => 0,
            };
            if counts.len() != want {
                return Err(Error::Input(format!(
                    "routing profile of {:?}: layer {i} has {} experts, the model {want}",
                    self.model,
                    counts.len()
                )));
            }
        }
        Ok(())
    }

    /// Share of layer `i`'s routed tokens each expert served (uniform when the layer saw none).
    pub fn shares(&self, i: usize) -> Vec<f64> {
        let c = &self.layers[i];
        let total: u64 = c.iter().sum();
        if total == 0 {
            return vec![1.0 / c.len().max(1) as f64; c.len()];
        }
        c.iter().map(|&n| n as f64 / total as f64).collect()
    }

    /// Mean over MoE layers of the share of routed tokens served by the hottest quarter of
    /// the experts (0.25 when routing is uniform, 1.0 when a quarter takes everything).
    pub fn hottest_quarter_share(&self) -> f64 {
        let mut sum = 0.0;
        let mut n = 0;
        for i in 0..self.layers.len() {
            let mut s = self.shares(i);
            if s.is_empty() {
                continue;
            }
            s.sort_by(|a, b| b.total_cmp(a));
            let q = s.len().div_ceil(4);
            sum += s[..q].iter().sum::<f64>();
            n += 1;
        }
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }
}

/// What asks for the placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Hottest experts first from a routing profile.
    Profile,
    /// `--n-cpu-moe N`.
    NCpuMoe(usize),
    /// No profile, no N: whole layers from the last.
    LayersFromLast,
}

/// One MoE layer's routed experts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerPlacement {
    pub layer: usize,
    /// Bytes of one routed expert (gate, up, down) of this layer.
    pub expert_bytes: u64,
    /// `on_gpu[e]`: expert e lives on the GPU; otherwise in host memory, run by the CPU kernels.
    pub on_gpu: Vec<bool>,
    /// Share of this layer's routed tokens served by its GPU experts (profile, else uniform).
    pub gpu_token_share: f64,
}

impl LayerPlacement {
    pub fn gpu_experts(&self) -> usize {
        self.on_gpu.iter().filter(|&&g| g).count()
    }
    pub fn cpu_experts(&self) -> usize {
        self.on_gpu.len() - self.gpu_experts()
    }
}

/// A placement: bytes on each side and every MoE layer's split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub precision: Precision,
    pub policy: Policy,
    pub budget_bytes: u64,
    pub context: u64,
    pub batch: u64,
    /// Weights that are not routed experts (all on the GPU).
    pub fixed_weight_bytes: u64,
    pub kv_bytes: u64,
    pub workspace_bytes: u64,
    /// Routed experts on the GPU.
    pub gpu_expert_bytes: u64,
    /// Routed experts in host memory.
    pub host_expert_bytes: u64,
    pub layers: Vec<LayerPlacement>,
}

impl Plan {
    /// Everything on the GPU.
    pub fn gpu_bytes(&self) -> u64 {
        self.fixed_weight_bytes + self.kv_bytes + self.workspace_bytes + self.gpu_expert_bytes
    }
    pub fn experts_on_cpu(&self) -> usize {
        self.layers.iter().map(LayerPlacement::cpu_experts).sum()
    }
    pub fn experts_total(&self) -> usize {
        self.layers.iter().map(|l| l.on_gpu.len()).sum()
    }
    /// `on_gpu` per decoder layer (`None` for dense layers): what the model's executors take.
    pub fn per_layer(&self, num_layers: usize) -> Vec<Option<Vec<bool>>> {
        let mut v = vec![None; num_layers];
        for l in &self.layers {
            v[l.layer] = Some(l.on_gpu.clone());
        }
        v
    }
}

/// Activation workspace of a prefill forward of `batch x min(context, WORKSPACE_TOKENS)` tokens:
/// per token the logits row, ~8 hidden-size rows and 3 rows of the widest FFN, in f32 (the same
/// over-estimate as bench's memory check).
pub fn workspace_bytes(cfg: &ModelConfig, context: u64, batch: u64) -> u64 {
    activation_row_bytes(cfg).saturating_mul(batch.saturating_mul(context.min(WORKSPACE_TOKENS)))
}

/// Activation bytes one prefill token may hold at once (an over-estimate): its f32 logits row,
/// ~8 hidden-size rows and 3 rows of the widest FFN (a dense MLP, or k experts plus the shared
/// ones).
pub fn activation_row_bytes(cfg: &ModelConfig) -> u64 {
    let widest = cfg
        .layers
        .iter()
        .map(|l| match l {
            FfnKind::Dense { intermediate } => *intermediate,
            FfnKind::Moe(m) => m.expert_ffn * m.top_k + m.shared.map_or(0, |s| s.ffn),
        })
        .max()
        .unwrap_or(0);
    (cfg.vocab_size + 8 * cfg.hidden_size + 3 * widest) as u64 * 4
}

/// What the planner needs besides the config.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    pub precision: Precision,
    pub budget_bytes: u64,
    pub context: u64,
    pub batch: u64,
    pub n_cpu_moe: Option<usize>,
    pub profile: Option<&'a RoutingProfile>,
}

/// The placement (see the module doc), or an error naming what does not fit.
pub fn plan(cfg: &ModelConfig, r: &PlanRequest) -> Result<Plan> {
    let p = r.precision;
    let inv = tensor_inventory(cfg);
    let moe: Vec<(usize, usize, u64)> = cfg
        .layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match l {
            FfnKind::Moe(m) => Some((i, m.num_experts, expert_bytes(cfg, i, p))),
            FfnKind::Dense { .. } => None,
        })
        .collect();
    let all_experts: u64 = moe.iter().map(|&(_, e, b)| e as u64 * b).sum();
    let fixed_weight_bytes = weight_bytes(&inv, p) - all_experts;
    let kv_bytes = kv_bytes_per_sequence(cfg, r.context, p.kv_elem_bytes()).saturating_mul(r.batch);
    let workspace = workspace_bytes(cfg, r.context, r.batch);
    let fixed = fixed_weight_bytes
        .saturating_add(kv_bytes)
        .saturating_add(workspace);
    let gib = |b: u64| crate::units::human_bytes(b);
    if fixed > r.budget_bytes {
        return Err(Error::Input(format!(
            "does not fit even with every routed expert on the CPU: the GPU part needs {} \
             (weights other than routed experts {}, KV cache {} for {} x {} tokens, workspace {}) \
             and the budget is {}",
            gib(fixed),
            gib(fixed_weight_bytes),
            gib(kv_bytes),
            r.batch,
            r.context,
            gib(workspace),
            gib(r.budget_bytes)
        )));
    }
    let mut left = r.budget_bytes - fixed;
    if let Some(prof) = r.profile {
        prof.check(cfg)?;
    }
    let shares: Vec<Vec<f64>> = moe
        .iter()
        .map(|&(i, e, _)| match r.profile {
            Some(prof) => prof.shares(i),
            None => vec![1.0 / e as f64; e],
        })
        .collect();
    let mut on: Vec<Vec<bool>> = moe.iter().map(|&(_, e, _)| vec![false; e]).collect();
    let policy = match (r.n_cpu_moe, r.profile) {
        (Some(n), _) => {
            let n = n.min(moe.len());
            let need: u64 = moe[n..].iter().map(|&(_, e, b)| e as u64 * b).sum();
            if need > left {
                return Err(Error::Input(format!(
                    "--n-cpu-moe {n}: the routed experts of the other {} MoE layers need {} on \
                     the GPU beside {} of other weights, KV cache and workspace, over the budget \
                     of {}; raise --n-cpu-moe or leave it out to let the planner choose",
                    moe.len() - n,
                    gib(need),
                    gib(fixed),
                    gib(r.budget_bytes)
                )));
            }
            for o in &mut on[n..] {
                o.fill(true);
            }
            Policy::NCpuMoe(n)
        }
        (None, Some(_)) => {
            // Every (layer, expert), hottest first; ties keep layer then expert order.
            let mut order: Vec<(usize, usize)> = (0..moe.len())
                .flat_map(|l| (0..moe[l].1).map(move |e| (l, e)))
                .collect();
            order.sort_by(|a, b| shares[b.0][b.1].total_cmp(&shares[a.0][a.1]));
            for (l, e) in order {
                let b = moe[l].2;
                if b <= left {
                    left -= b;
                    on[l][e] = true;
                }
            }
            Policy::Profile
        }
        (None, None) => {
            for l in (0..moe.len()).rev() {
                let b = moe[l].1 as u64 * moe[l].2;
                if b > left {
                    break;
                }
                left -= b;
                on[l].fill(true);
            }
            Policy::LayersFromLast
        }
    };
    let mut layers = Vec::new();
    let (mut gpu_expert_bytes, mut host_expert_bytes) = (0, 0);
    for (((i, _, b), o), s) in moe.iter().zip(on).zip(&shares) {
        let g = o.iter().filter(|&&x| x).count() as u64;
        gpu_expert_bytes += g * b;
        host_expert_bytes += (o.len() as u64 - g) * b;
        layers.push(LayerPlacement {
            layer: *i,
            expert_bytes: *b,
            gpu_token_share: o.iter().zip(s).filter(|(g, _)| **g).map(|(_, s)| s).sum(),
            on_gpu: o,
        });
    }
    Ok(Plan {
        precision: p,
        policy,
        budget_bytes: r.budget_bytes,
        context: r.context,
        batch: r.batch,
        fixed_weight_bytes,
        kv_bytes,
        workspace_bytes: workspace,
        gpu_expert_bytes,
        host_expert_bytes,
        layers,
    })
}
