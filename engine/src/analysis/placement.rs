//! The speed a hybrid GPU/CPU placement ([`crate::spec::placement`], re-exported here) predicts
//! on a GPU and a host: `moe-run analyze --gpu NAME --quant ...` prints both.

use serde::Serialize;

pub use crate::spec::placement::*;

use super::bytes::{decode_weight_bytes, kv_read_bytes, prefill_flops_per_token, Precision};
use super::counts::{expert_params, param_counts, tensor_inventory};
use super::gpus::Gpu;
use crate::config::{FfnKind, ModelConfig};

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
    use crate::analysis::bytes::{expert_bytes, weight_bytes};
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
