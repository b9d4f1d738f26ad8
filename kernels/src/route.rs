//! MoE stage 1, route: router logits -> top-k expert ids (best first) and combine weights.
//!
//! Legend: N tokens, E experts, K = top-k.
//!
//! ```text
//! logits  [N, E]  f32 | bf16 | f16, scored in f32
//! bias    [E]     f32 selection-only correction bias (Router::SigmoidBiasGrouped only)
//! ids     [N, K]  u32, best first, ties to the lower expert index
//! weights [N, K]  f32
//! ```
//!
//! [`route_reference`] is the specification: the same math as the engine's CPU router
//! (`engine/src/model/moe/route.rs`), copied here so the kernels crate does not depend on the engine.
//! The CUDA kernel (`cuda/moe_route.cu`, one warp per token, NOT YET RUN ON A GPU) supports E <= 256,
//! K <= 8 and n_group <= 32; the CPU reference has no such limits. The self-test compares ids exactly and
//! weights by normalized MSE against [`ROUTE_NMSE`].

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{check_act, check_dtype, grid_dim, host, same_device, suffix};
use crate::launch::{Arg, Buf, Plan};

const OP: &str = "moe_route";

/// Kernel limits (one warp per token, 8 experts per lane, one group per lane).
pub const ROUTE_MAX_EXPERTS: usize = 256;
pub const ROUTE_MAX_TOP_K: usize = 8;
pub const ROUTE_MAX_GROUPS: usize = 32;

/// Self-test budget for the weights (the ids must match exactly). Both sides compute in f32 from the same
/// logits; they differ only by expf vs libm exp and the softmax sum order (~1e-7 relative).
pub const ROUTE_NMSE: f64 = 1e-10;

/// How a MoE layer routes its tokens (the engine's `config::RouterKind`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Router {
    /// p = softmax_f32(x Wg^T); the top-k of p; then, with `norm_p = Some(q)`, divide by their
    /// q-norm (q = 1: renormalise to sum 1 as Mixtral; DBRX allows any q); `None`: use p as is.
    Softmax { norm_p: Option<f64> },
    /// DeepSeek-V2: p = softmax_f32(x Wg^T); with `n_group` > 1, keep the `topk_group` groups
    /// whose max p is largest (others' p set to 0 for selection); top-k of p; weight = p *
    /// `scaling`, never renormalised.
    SoftmaxGroupLimited {
        n_group: usize,
        topk_group: usize,
        scaling: f64,
    },
    /// DeepSeek-V3 / dots.llm1 "noaux_tc": s = sigmoid_f32(x Wg^T), c = s + bias (the
    /// `e_score_correction_bias`, used only to choose); keep the `topk_group` groups with the
    /// largest sum of their top-2 c (others read -inf); ids = top-k of c; weight = s at those
    /// ids, divided by their sum (+1e-20) if `renormalize`, times `scaling`.
    SigmoidBiasGrouped {
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
        scaling: f64,
    },
}

impl Router {
    fn groups(&self) -> Option<(usize, usize)> {
        match *self {
            Router::Softmax { .. } => None,
            Router::SoftmaxGroupLimited {
                n_group,
                topk_group,
                ..
            }
            | Router::SigmoidBiasGrouped {
                n_group,
                topk_group,
                ..
            } => Some((n_group, topk_group)),
        }
    }
}

/// Whether the CUDA router kernel handles `router` over `e` experts with `top_k` (the CPU reference
/// has no limits). Pure.
pub fn route_kernel_supports(router: Router, e: usize, top_k: usize) -> bool {
    e <= ROUTE_MAX_EXPERTS
        && top_k <= ROUTE_MAX_TOP_K
        && router.groups().is_none_or(|(g, _)| g <= ROUTE_MAX_GROUPS)
}

/// Routes every row of `logits [N, E]`. Returns `(ids [N, K] u32, weights [N, K] f32)` on the device of
/// `logits`. `bias` (f32 `[E]`) is required by [`Router::SigmoidBiasGrouped`] and ignored otherwise.
pub fn moe_route(
    logits: &Tensor,
    router: Router,
    top_k: usize,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    check_act(OP, "logits", logits.dtype())?;
    let (n, e) = logits.dims2()?;
    if top_k == 0 || top_k > e {
        bail!("{OP}: top_k {top_k} must be in 1..={e}");
    }
    if let Some((g, kg)) = router.groups() {
        if g > 1 && (!e.is_multiple_of(g) || kg == 0 || kg > g) {
            bail!("{OP}: {e} experts cannot be split into {g} groups keeping {kg}");
        }
    }
    let bias = match router {
        Router::SigmoidBiasGrouped { .. } => {
            let Some(b) = bias else {
                bail!("{OP}: the sigmoid router needs a correction bias of {e} values")
            };
            check_dtype(OP, "bias", b, DType::F32)?;
            if b.dims() != [e] {
                bail!("{OP}: bias must be [{e}], got {:?}", b.dims());
            }
            same_device(OP, &[("logits", logits), ("bias", b)])?;
            Some(b)
        }
        _ => None,
    };
    if crate::launch::runs_kernels(logits.device()) {
        return run_plan(logits, router, top_k, bias, n, e);
    }
    match logits.device() {
        Device::Cpu => {
            let scores: Vec<f32> = host(&logits.to_dtype(DType::F32)?)?;
            let b = bias.map(host::<f32>).transpose()?;
            let (ids, w) = route_reference(&scores, e, router, top_k, b.as_deref())?;
            Ok((
                Tensor::from_vec(ids, (n, top_k), &Device::Cpu)?,
                Tensor::from_vec(w, (n, top_k), &Device::Cpu)?,
            ))
        }
        d => bail!("{OP}: unsupported device {:?}", d.location()),
    }
}

/// The specification: `scores` is `[N, E]` row-major f32. Returns `(ids, weights)`, each `[N * K]`.
pub fn route_reference(
    scores: &[f32],
    e: usize,
    router: Router,
    top_k: usize,
    bias: Option<&[f32]>,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let n = scores.len() / e.max(1);
    let mut ids = Vec::with_capacity(n * top_k);
    let mut weights = Vec::with_capacity(n * top_k);
    let mut value = vec![0f32; e];
    let mut select = vec![0f32; e];
    for row in scores.chunks_exact(e) {
        let (chosen, norm, scale) = match router {
            Router::Softmax { norm_p } => {
                softmax_into(row, &mut value);
                let chosen = top_k_indices(&value, top_k);
                let norm = match norm_p {
                    None => 1.0,
                    Some(1.0) => chosen.iter().map(|&i| value[i]).sum(),
                    Some(p) => {
                        let p = p as f32;
                        chosen
                            .iter()
                            .map(|&i| value[i].powf(p))
                            .sum::<f32>()
                            .powf(1.0 / p)
                    }
                };
                (chosen, norm, 1.0)
            }
            Router::SoftmaxGroupLimited {
                n_group,
                topk_group,
                scaling,
            } => {
                softmax_into(row, &mut value);
                select.copy_from_slice(&value);
                keep_top_groups(&mut select, n_group, topk_group, 0.0, |g| {
                    g.iter().copied().fold(f32::MIN, f32::max)
                })?;
                (top_k_indices(&select, top_k), 1.0, scaling as f32)
            }
            Router::SigmoidBiasGrouped {
                n_group,
                topk_group,
                renormalize,
                scaling,
            } => {
                let Some(bias) = bias.filter(|b| b.len() == e) else {
                    bail!("{OP}: the sigmoid router needs a correction bias of {e} values")
                };
                for ((v, s), (&x, &b)) in value
                    .iter_mut()
                    .zip(select.iter_mut())
                    .zip(row.iter().zip(bias))
                {
                    *v = 1.0 / (1.0 + (-x).exp());
                    *s = *v + b;
                }
                keep_top_groups(&mut select, n_group, topk_group, f32::NEG_INFINITY, |g| {
                    let top = top_k_indices(g, 2.min(g.len()));
                    top.iter().map(|&i| g[i]).sum()
                })?;
                let chosen = top_k_indices(&select, top_k);
                let norm = if renormalize {
                    chosen.iter().map(|&i| value[i]).sum::<f32>() + 1e-20
                } else {
                    1.0
                };
                (chosen, norm, scaling as f32)
            }
        };
        for &i in &chosen {
            ids.push(i as u32);
            weights.push(value[i] / norm * scale);
        }
    }
    Ok((ids, weights))
}

fn keep_top_groups(
    scores: &mut [f32],
    n_group: usize,
    topk_group: usize,
    fill: f32,
    group_score: impl Fn(&[f32]) -> f32,
) -> Result<()> {
    if n_group <= 1 {
        return Ok(());
    }
    if !scores.len().is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
        bail!(
            "{OP}: {} experts cannot be split into {n_group} groups keeping {topk_group}",
            scores.len()
        )
    }
    let size = scores.len() / n_group;
    let group_scores: Vec<f32> = scores.chunks_exact(size).map(&group_score).collect();
    let keep = top_k_indices(&group_scores, topk_group);
    for (g, chunk) in scores.chunks_exact_mut(size).enumerate() {
        if !keep.contains(&g) {
            chunk.fill(fill);
        }
    }
    Ok(())
}

fn softmax_into(row: &[f32], out: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Warps (tokens) per block of `moe_route_<dtype>` (ROUTE_WARPS in moe_route.cu).
pub const ROUTE_WARPS: u32 = 4;

/// The kernel's `kind`, `n_group`, `topk_group`, `norm_mode`, `norm_p` and `scaling` arguments for `router`.
fn route_params(router: Router) -> (u32, u32, u32, u32, f32, f32) {
    match router {
        Router::Softmax { norm_p } => match norm_p {
            None => (0, 1, 1, 0, 1.0, 1.0),
            Some(1.0) => (0, 1, 1, 1, 1.0, 1.0),
            Some(p) => (0, 1, 1, 2, p as f32, 1.0),
        },
        Router::SoftmaxGroupLimited {
            n_group,
            topk_group,
            scaling,
        } => (1, n_group as u32, topk_group as u32, 0, 1.0, scaling as f32),
        Router::SigmoidBiasGrouped {
            n_group,
            topk_group,
            renormalize,
            scaling,
        } => (
            2,
            n_group as u32,
            topk_group as u32,
            renormalize as u32,
            1.0,
            scaling as f32,
        ),
    }
}

/// The launch of `moe_route_<dtype>` on `logits [N, E]`: one warp per token, [`ROUTE_WARPS`] tokens per block.
/// Inputs `logits` and, for [`Router::SigmoidBiasGrouped`], `bias` (the kernel gets a null pointer otherwise);
/// outputs `ids [N, K]` u32 and `weights [N, K]` f32. An error where the kernel's limits are exceeded.
pub fn route_plan(dtype: DType, n: usize, e: usize, router: Router, top_k: usize) -> Result<Plan> {
    if !route_kernel_supports(router, e, top_k) {
        bail!("{OP}: the CUDA kernel supports E <= {ROUTE_MAX_EXPERTS}, top_k <= {ROUTE_MAX_TOP_K} and n_group <= {ROUTE_MAX_GROUPS}, got E = {e}, top_k = {top_k}, {router:?}");
    }
    let has_bias = matches!(router, Router::SigmoidBiasGrouped { .. });
    let inputs: &[&'static str] = if has_bias {
        &["logits", "bias"]
    } else {
        &["logits"]
    };
    let mut p = Plan::new(OP, inputs);
    let ids = p.out("ids", DType::U32, (n, top_k));
    let weights = p.out("weights", DType::F32, (n, top_k));
    let bias = if has_bias {
        Arg::Buf(Buf::In(1))
    } else {
        Arg::Null
    };
    let (kind, n_group, topk_group, norm_mode, norm_p, scaling) = route_params(router);
    let tokens = u32::try_from(n).map_err(|_| {
        candle_core::Error::Msg(format!("{OP}: {n} tokens exceed the kernel's u32 count"))
    })?;
    // SAFETY (of the executor's launch): argument order and types match `moe_route_<dtype>`; the kernel writes
    // all N*K ids and weights and reads N*E logits and E bias values (bias only for kind 2).
    p.launch(
        "moe_route",
        format!("moe_route_{}", suffix(dtype)?),
        [
            grid_dim(
                OP,
                "token blocks",
                n.div_ceil(ROUTE_WARPS as usize),
                u32::MAX >> 1,
            )?,
            1,
            1,
        ],
        [32 * ROUTE_WARPS, 1, 1],
        vec![
            Arg::Buf(Buf::In(0)),
            bias,
            ids,
            weights,
            Arg::U32(tokens),
            Arg::U32(e as u32),
            Arg::U32(top_k as u32),
            Arg::U32(kind),
            Arg::U32(n_group),
            Arg::U32(topk_group),
            Arg::U32(norm_mode),
            Arg::F32(norm_p),
            Arg::F32(scaling),
        ],
    );
    Ok(p)
}

fn run_plan(
    logits: &Tensor,
    router: Router,
    top_k: usize,
    bias: Option<&Tensor>,
    n: usize,
    e: usize,
) -> Result<(Tensor, Tensor)> {
    let plan = route_plan(logits.dtype(), n, e, router, top_k)?;
    let mut outs = match bias {
        Some(b) if plan.inputs.len() == 2 => plan.run(&[logits, b])?,
        _ => plan.run(&[logits])?,
    };
    let weights = outs.pop();
    let ids = outs.pop();
    match (ids, weights) {
        (Some(ids), Some(weights)) => Ok((ids, weights)),
        _ => bail!("{OP}: the plan returned too few outputs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(
        scores: &[f32],
        e: usize,
        router: Router,
        k: usize,
        bias: Option<&[f32]>,
    ) -> (Vec<u32>, Vec<f32>) {
        route_reference(scores, e, router, k, bias).unwrap()
    }

    #[test]
    fn kernel_limits() {
        let soft = Router::Softmax { norm_p: Some(1.0) };
        assert!(route_kernel_supports(soft, 256, 8));
        assert!(!route_kernel_supports(soft, 384, 8), "Kimi-K2-sized E");
        assert!(!route_kernel_supports(soft, 64, 9));
        let grouped = Router::SigmoidBiasGrouped {
            n_group: 64,
            topk_group: 4,
            renormalize: true,
            scaling: 1.0,
        };
        assert!(!route_kernel_supports(grouped, 256, 8));
    }

    #[test]
    fn plan_geometry() {
        use Arg::{F32, U32};
        let src = include_str!("../cuda/moe_route.cu");
        assert!(src.contains(&format!("#define ROUTE_WARPS {ROUTE_WARPS}\n")));
        assert!(src.contains("__launch_bounds__(32 * ROUTE_WARPS)"));
        // 7 tokens, 4 per block: a partial last block (its idle warps exit together).
        let p = route_plan(DType::BF16, 7, 64, Router::Softmax { norm_p: Some(2.0) }, 4).unwrap();
        assert_eq!(p.inputs, vec!["logits"]);
        assert_eq!(
            p.outs
                .iter()
                .map(|a| (a.name, a.dtype, a.shape.dims().to_vec()))
                .collect::<Vec<_>>(),
            vec![
                ("ids", DType::U32, vec![7, 4]),
                ("weights", DType::F32, vec![7, 4])
            ]
        );
        assert_eq!(p.launches.len(), 1);
        let l = &p.launches[0];
        assert_eq!(
            (l.module, l.entry.as_str()),
            ("moe_route", "moe_route_bf16")
        );
        assert_eq!((l.grid, l.block), ([2, 1, 1], [128, 1, 1]));
        assert_eq!(
            l.args,
            vec![
                Arg::Buf(Buf::In(0)),
                Arg::Null,
                Arg::Buf(Buf::Out(0)),
                Arg::Buf(Buf::Out(1)),
                U32(7),
                U32(64),
                U32(4),
                U32(0),
                U32(1),
                U32(1),
                U32(2),
                F32(2.0),
                F32(1.0)
            ]
        );
        // The sigmoid router reads its bias; 8 tokens fill exactly two blocks.
        let v3 = Router::SigmoidBiasGrouped {
            n_group: 8,
            topk_group: 4,
            renormalize: true,
            scaling: 2.5,
        };
        let p = route_plan(DType::F32, 8, 256, v3, 8).unwrap();
        assert_eq!(p.inputs, vec!["logits", "bias"]);
        let l = &p.launches[0];
        assert_eq!((l.entry.as_str(), l.grid), ("moe_route_f32", [2, 1, 1]));
        assert_eq!(l.args[1], Arg::Buf(Buf::In(1)));
        assert_eq!(
            &l.args[4..],
            &[
                U32(8),
                U32(256),
                U32(8),
                U32(2),
                U32(8),
                U32(4),
                U32(1),
                F32(1.0),
                F32(2.5)
            ]
        );
        // No tokens: no launch, empty outputs; past the kernel's limits: an error.
        let p = route_plan(DType::F16, 0, 16, Router::Softmax { norm_p: None }, 2).unwrap();
        assert!(p.launches.is_empty());
        assert_eq!(p.outs[0].shape.dims(), &[0, 2]);
        assert!(route_plan(DType::F32, 1, 384, Router::Softmax { norm_p: None }, 8).is_err());
    }

    #[test]
    fn engine_semantics() {
        // The engine's route.rs test cases, verbatim.
        let (ids, w) = r(
            &[1.0, -1.0, 2.0, 0.0],
            4,
            Router::Softmax { norm_p: Some(1.0) },
            2,
            None,
        );
        assert_eq!(ids, vec![2, 0]);
        let e = std::f32::consts::E;
        assert!((w[0] - e / (e + 1.0)).abs() < 1e-6);
        let (ids, w) = r(&[0.0; 4], 4, Router::Softmax { norm_p: None }, 2, None);
        assert_eq!(
            (ids, w),
            (vec![0, 1], vec![0.25, 0.25]),
            "ties go to the lower index"
        );
        let kind = Router::SoftmaxGroupLimited {
            n_group: 4,
            topk_group: 2,
            scaling: 2.0,
        };
        let (ids, _) = r(&[5.0, 0.0, 4.9, 0.0, 0.0, 4.8, 0.0, 1.0], 8, kind, 3, None);
        assert_eq!(ids, vec![0, 2, 1]);
        let kind = Router::SigmoidBiasGrouped {
            n_group: 2,
            topk_group: 1,
            renormalize: false,
            scaling: 1.0,
        };
        let (ids, w) = r(&[0.0; 6], 6, kind, 2, Some(&[0.9, 0.0, 0.0, 0.5, 0.5, 0.0]));
        assert_eq!((ids, w), (vec![3, 4], vec![0.5, 0.5]));
    }

    #[test]
    fn op_checks_inputs() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        assert!(moe_route(&x, Router::Softmax { norm_p: None }, 7, None).is_err());
        let v3 = Router::SigmoidBiasGrouped {
            n_group: 4,
            topk_group: 1,
            renormalize: true,
            scaling: 1.0,
        };
        let v3ok = Router::SigmoidBiasGrouped {
            n_group: 2,
            topk_group: 1,
            renormalize: true,
            scaling: 1.0,
        };
        assert!(moe_route(&x, v3ok, 2, None)
            .unwrap_err()
            .to_string()
            .contains("bias"));
        let b = Tensor::zeros(6, DType::F32, &dev).unwrap();
        assert!(moe_route(&x, v3, 2, Some(&b))
            .unwrap_err()
            .to_string()
            .contains("groups"));
        let (ids, w) = moe_route(
            &x.to_dtype(DType::BF16).unwrap(),
            Router::Softmax { norm_p: None },
            2,
            None,
        )
        .unwrap();
        assert_eq!(ids.dims(), &[2, 2]);
        assert_eq!(w.dtype(), DType::F32);
    }
}
