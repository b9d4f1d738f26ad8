//! Hybrid placement of a model bigger than its GPU: what stays on the GPU and which routed experts
//! stay in host memory and run on the CPU kernels, decided before anything is loaded, and the
//! decode / prefill speed that placement predicts. Pure functions of the config, the precision,
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

use super::bytes::{
    decode_weight_bytes, expert_bytes, kv_bytes_per_sequence, kv_read_bytes,
    prefill_flops_per_token, weight_bytes, Precision,
};
use super::counts::{expert_params, param_counts, tensor_inventory};
use super::gpus::Gpu;
use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};

/// Bytes the budget leaves for the CUDA context, cuBLAS workspace and allocator slack when it
/// comes from a GPU's nominal memory (`--gpu`) or the driver's free memory.
pub const SAFETY_MARGIN_BYTES: u64 = 768 << 20;

/// Prompt tokens one prefill forward is sized for in [`workspace_bytes`].
pub const WORKSPACE_TOKENS: u64 = 512;

/// Host and link figures the prediction uses (`--host-bandwidth`, `--host-tflops`, `--pcie`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostSpec {
    /// Host memory read bandwidth the CPU expert kernels stream at, GB/s.
    pub bandwidth_gb_s: f64,
    /// Host matmul peak the CPU expert kernels reach at prefill, TFLOPS.
    pub tflops: f64,
    /// Host <-> GPU link, GB/s each way.
    pub pcie_gb_s: f64,
    /// Latency of one host round trip (copy out, CPU launch, copy back), microseconds.
    pub round_trip_us: f64,
}

impl Default for HostSpec {
    /// A desktop host beside an RTX 4090: dual-channel DDR5-6000 (96 GB/s peak, ~60 streamed by
    /// 8+ cores), ~1 TFLOPS of f32 FMA on 8-16 cores, PCIe 4.0 x16 (~25 GB/s achieved),
    /// ~20 us per round trip (two copies, a synchronisation and the CPU kernels' start).
    fn default() -> Self {
        HostSpec {
            bandwidth_gb_s: 60.0,
            tflops: 1.0,
            pcie_gb_s: 25.0,
            round_trip_us: 20.0,
        }
    }
}

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
    let widest = cfg
        .layers
        .iter()
        .map(|l| match l {
            FfnKind::Dense { intermediate } => *intermediate,
            FfnKind::Moe(m) => m.expert_ffn * m.top_k + m.shared.map_or(0, |s| s.ffn),
        })
        .max()
        .unwrap_or(0);
    let row = (cfg.vocab_size + 8 * cfg.hidden_size + 3 * widest) as u64 * 4;
    row.saturating_mul(batch.saturating_mul(context.min(WORKSPACE_TOKENS)))
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

/// The speed a plan predicts on a GPU and host (see [`predict`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanPrediction {
    pub host: HostSpec,
    /// Batch-1 decode at the context.
    pub decode_tokens_per_s: f64,
    /// Per decoded token: GPU streaming time (everything but CPU experts), CPU experts'
    /// streaming time, and host round trips, in ms (per layer the CPU side overlaps the GPU's
    /// experts; the sum below is not the total).
    pub decode_gpu_ms: f64,
    pub decode_cpu_ms: f64,
    pub decode_link_ms: f64,
    /// The same model if everything fit the GPU: bandwidth / decode bytes per token.
    pub decode_tokens_per_s_all_on_gpu: f64,
    /// Mean over MoE layers of the share of routed tokens the CPU experts serve.
    pub cpu_token_share: f64,
    /// Prefill of this many tokens (min(context, 512)), compute-bound on each side.
    pub prefill_tokens: u64,
    /// `None` without the GPU's matmul peak (a custom GPU without --tflops).
    pub prefill_tokens_per_s: Option<f64>,
}

/// Predicted speed of `plan` on `gpu` with `host` (module doc; batch 1):
/// - decode: the GPU streams the non-expert weights, the KV cache and its experts' expected
///   bytes (`k x share x expert bytes` per layer) at its bandwidth; the CPU streams its experts'
///   expected bytes at the host bandwidth; a layer with a CPU expert in the token's top-k costs
///   a round trip (latency + 2 hidden-state rows over the link), with probability
///   `1 - gpu_share^k`; per layer the CPU side overlaps the GPU's experts (max of the two).
/// - prefill of `P` tokens: FLOPs at each side's peak (the GPU's bf16 tensor peak, tf32 for
///   fp32), per layer overlapped, plus the hidden states of the CPU experts' rows over the link.
pub fn predict(
    cfg: &ModelConfig,
    plan: &Plan,
    gpu: &Gpu,
    host: &HostSpec,
    context: u64,
) -> PlanPrediction {
    let p = plan.precision;
    let inv = tensor_inventory(cfg);
    let h = cfg.hidden_size as f64;
    let gbw = gpu.bandwidth_bytes_s();
    let hbw = host.bandwidth_gb_s * 1e9;
    let link = host.pcie_gb_s * 1e9;
    let rt = host.round_trip_us * 1e-6;
    let moe = |i: usize| match &cfg.layers[i] {
        FfnKind::Moe(m) => Some(m),
        FfnKind::Dense { .. } => None,
    };
    // Decode.
    let routed_active: f64 = plan
        .layers
        .iter()
        .filter_map(|l| moe(l.layer).map(|m| m.top_k as f64 * l.expert_bytes as f64))
        .sum();
    let all_bytes =
        (decode_weight_bytes(&inv, p) + kv_read_bytes(cfg, context, p.kv_elem_bytes())) as f64;
    let gpu_fixed = (all_bytes - routed_active) / gbw;
    let (mut total, mut gpu_ms, mut cpu_ms, mut link_ms, mut cpu_share) =
        (gpu_fixed, 0.0, 0.0, 0.0, 0.0);
    gpu_ms += gpu_fixed;
    for l in &plan.layers {
        let Some(m) = moe(l.layer) else { continue };
        let k = m.top_k as f64;
        let g = l.gpu_token_share.clamp(0.0, 1.0);
        let tg = k * g * l.expert_bytes as f64 / gbw;
        let tc = k * (1.0 - g) * l.expert_bytes as f64 / hbw;
        let tl = (1.0 - g.powi(m.top_k as i32)) * (rt + 2.0 * h * 4.0 / link);
        total += tg.max(tc + tl);
        gpu_ms += tg;
        cpu_ms += tc;
        link_ms += tl;
        cpu_share += 1.0 - g;
    }
    let n_moe = plan.layers.len().max(1) as f64;
    // Prefill.
    let prompt = context.min(WORKSPACE_TOKENS);
    let counts = param_counts(cfg);
    let peak = match p {
        Precision::Fp32 => gpu.tf32_tflops,
        _ => gpu.bf16_tflops,
    };
    let prefill = peak.map(|t| {
        let pf = prompt as f64;
        let routed: f64 = plan
            .layers
            .iter()
            .filter_map(|l| {
                moe(l.layer).map(|m| m.top_k as f64 * expert_params(m, cfg.hidden_size) as f64)
            })
            .sum();
        let per_tok = prefill_flops_per_token(cfg, counts.matmul_active, prompt);
        let mut secs = pf * (per_tok - 2.0 * routed) / (t * 1e12);
        for l in &plan.layers {
            let Some(m) = moe(l.layer) else { continue };
            let f = pf * 2.0 * m.top_k as f64 * expert_params(m, cfg.hidden_size) as f64;
            let g = l.gpu_token_share.clamp(0.0, 1.0);
            let tg = f * g / (t * 1e12);
            let rows = pf * m.top_k as f64 * (1.0 - g);
            let tc = f * (1.0 - g) / (host.tflops * 1e12)
                + if rows > 0.0 {
                    rt + 2.0 * rows * h * 4.0 / link
                } else {
                    0.0
                };
            secs += tg.max(tc);
        }
        pf / secs
    });
    PlanPrediction {
        host: *host,
        decode_tokens_per_s: 1.0 / total,
        decode_gpu_ms: 1e3 * gpu_ms,
        decode_cpu_ms: 1e3 * cpu_ms,
        decode_link_ms: 1e3 * link_ms,
        decode_tokens_per_s_all_on_gpu: gbw / all_bytes,
        cpu_token_share: cpu_share / n_moe,
        prefill_tokens: prompt,
        prefill_tokens_per_s: prefill,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::gpus::find_gpu;

    fn mixtral() -> ModelConfig {
        crate::loader::ModelRef::resolve(Some("mixtral-8x7b"), None, None)
            .unwrap()
            .config()
            .unwrap()
            .1
    }

    fn req(budget: u64) -> PlanRequest<'static> {
        PlanRequest {
            precision: Precision::INT4,
            budget_bytes: budget,
            context: 4096,
            batch: 1,
            n_cpu_moe: None,
            profile: None,
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn everything_fits_a_big_budget() {
        let cfg = mixtral();
        let p = plan(&cfg, &req(80 * GIB)).unwrap();
        assert_eq!(p.experts_on_cpu(), 0);
        assert_eq!(p.experts_total(), 32 * 8);
        assert_eq!(p.host_expert_bytes, 0);
        let all = weight_bytes(&tensor_inventory(&cfg), Precision::INT4);
        assert_eq!(p.fixed_weight_bytes + p.gpu_expert_bytes, all);
        assert!(p.gpu_bytes() <= p.budget_bytes);
    }

    #[test]
    fn a_24gb_card_keeps_the_first_layers_on_the_cpu_and_stays_in_budget() {
        let cfg = mixtral();
        let budget = 24 * GIB - SAFETY_MARGIN_BYTES;
        let p = plan(&cfg, &req(budget)).unwrap();
        assert_eq!(p.policy, Policy::LayersFromLast);
        assert!(p.gpu_bytes() <= budget, "{} > {budget}", p.gpu_bytes());
        let cpu_layers: Vec<usize> = p
            .layers
            .iter()
            .filter(|l| l.gpu_experts() == 0)
            .map(|l| l.layer)
            .collect();
        assert!(!cpu_layers.is_empty());
        // Whole layers, a prefix: layers 0..n on the CPU, the rest on the GPU.
        assert_eq!(cpu_layers, (0..cpu_layers.len()).collect::<Vec<_>>());
        assert!(p.layers[cpu_layers.len()..]
            .iter()
            .all(|l| l.cpu_experts() == 0));
        // One more layer would not have fit.
        let one_more = p.layers[0].expert_bytes * 8;
        assert!(p.gpu_bytes() + one_more > budget);
        // The same split by hand.
        let n = cpu_layers.len();
        let manual = plan(
            &cfg,
            &PlanRequest {
                n_cpu_moe: Some(n),
                ..req(budget)
            },
        )
        .unwrap();
        assert_eq!(manual.per_layer(32), p.per_layer(32));
        assert!(plan(
            &cfg,
            &PlanRequest {
                n_cpu_moe: Some(n - 1),
                ..req(budget)
            }
        )
        .unwrap_err()
        .to_string()
        .contains("--n-cpu-moe"));
    }

    #[test]
    fn a_profile_puts_the_hottest_experts_on_the_gpu() {
        let cfg = mixtral();
        // Layer i: expert (i % 8) takes 9 shares, the others 1 each.
        let layers = (0..32)
            .map(|i| (0..8).map(|e| if e == i % 8 { 9 } else { 1 }).collect())
            .collect();
        let prof = RoutingProfile {
            model: "t".into(),
            tokens: 16,
            layers,
        };
        assert!((prof.hottest_quarter_share() - 10.0 / 16.0).abs() < 1e-12);
        let eb = expert_bytes(&cfg, 0, Precision::INT4);
        let base = plan(&cfg, &req(80 * GIB)).unwrap();
        let fixed = base.fixed_weight_bytes + base.kv_bytes + base.workspace_bytes;
        // Room for exactly 40 experts: the 32 hot ones, then 8 more.
        let budget = fixed + 40 * eb;
        let p = plan(
            &cfg,
            &PlanRequest {
                profile: Some(&prof),
                ..req(budget)
            },
        )
        .unwrap();
        assert_eq!(p.policy, Policy::Profile);
        assert_eq!(p.experts_total() - p.experts_on_cpu(), 40);
        for l in &p.layers {
            assert!(l.on_gpu[l.layer % 8], "layer {}: its hot expert", l.layer);
        }
        // Cold experts: equal heat, so layer then expert order.
        let extra: usize = p.layers.iter().map(|l| l.gpu_experts() - 1).sum();
        assert_eq!(extra, 8);
        assert_eq!(p.layers[0].gpu_experts(), 8, "layer 0 filled first");
        assert!((p.layers[5].gpu_token_share - 9.0 / 16.0).abs() < 1e-12);
        // Beats whole layers on the same budget: more of the routed tokens served on the GPU.
        let gpu = find_gpu("rtx4090").unwrap();
        let host = HostSpec::default();
        let hot = predict(&cfg, &p, &gpu, &host, 4096);
        let flat = predict(&cfg, &plan(&cfg, &req(budget)).unwrap(), &gpu, &host, 4096);
        assert!(hot.cpu_token_share < flat.cpu_token_share);
        assert!(hot.decode_tokens_per_s > flat.decode_tokens_per_s);
        // A profile of another shape is refused.
        let bad = RoutingProfile {
            model: "t".into(),
            tokens: 1,
            layers: vec![vec![1; 8]; 3],
        };
        assert!(plan(
            &cfg,
            &PlanRequest {
                profile: Some(&bad),
                ..req(budget)
            }
        )
        .is_err());
    }

    #[test]
    fn a_budget_below_the_fixed_part_is_refused_naming_it() {
        let cfg = mixtral();
        let e = plan(&cfg, &req(GIB)).unwrap_err().to_string();
        assert!(
            e.contains("every routed expert on the CPU") && e.contains("KV cache"),
            "{e}"
        );
    }

    #[test]
    fn the_prediction_sits_between_all_on_cpu_and_all_on_gpu() {
        let cfg = mixtral();
        let gpu = find_gpu("rtx4090").unwrap();
        let host = HostSpec::default();
        let all = plan(&cfg, &req(80 * GIB)).unwrap();
        let all_p = predict(&cfg, &all, &gpu, &host, 4096);
        assert!(
            (all_p.decode_tokens_per_s - all_p.decode_tokens_per_s_all_on_gpu).abs()
                < 1e-9 * all_p.decode_tokens_per_s
        );
        assert_eq!(all_p.cpu_token_share, 0.0);
        let split = plan(&cfg, &req(24 * GIB - SAFETY_MARGIN_BYTES)).unwrap();
        let sp = predict(&cfg, &split, &gpu, &host, 4096);
        assert!(sp.decode_tokens_per_s < all_p.decode_tokens_per_s);
        assert!(sp.cpu_token_share > 0.0 && sp.cpu_token_share < 0.5);
        let none = plan(
            &cfg,
            &PlanRequest {
                n_cpu_moe: Some(32),
                ..req(80 * GIB)
            },
        )
        .unwrap();
        let np = predict(&cfg, &none, &gpu, &host, 4096);
        assert!(np.decode_tokens_per_s < sp.decode_tokens_per_s);
        // All routed experts on the host: their bytes at the host's bandwidth dominate.
        let cpu_bytes: f64 = none
            .layers
            .iter()
            .map(|l| 2.0 * l.expert_bytes as f64)
            .sum();
        assert!(np.decode_cpu_ms > 0.99e3 * cpu_bytes / 60e9);
        assert!(sp.prefill_tokens_per_s.unwrap() < all_p.prefill_tokens_per_s.unwrap());
    }
}
