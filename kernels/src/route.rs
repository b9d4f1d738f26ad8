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

use crate::common::{check_act, check_dtype, host, same_device};

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
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda_route(logits, router, top_k, bias, n, e),
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

#[cfg(feature = "cuda")]
fn cuda_route(
    logits: &Tensor,
    router: Router,
    top_k: usize,
    bias: Option<&Tensor>,
    n: usize,
    e: usize,
) -> Result<(Tensor, Tensor)> {
    use crate::common::cuda::{alloc_out, wrap};
    use crate::cuda_util::{contiguous, module_key};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::Storage;

    if !route_kernel_supports(router, e, top_k) {
        bail!("{OP}: the CUDA kernel supports E <= {ROUTE_MAX_EXPERTS}, top_k <= {ROUTE_MAX_TOP_K} and n_group <= {ROUTE_MAX_GROUPS}, got E = {e}, top_k = {top_k}, {router:?}");
    }
    let (kind, n_group, topk_group, norm_mode, norm_p, scaling) = match router {
        Router::Softmax { norm_p } => match norm_p {
            None => (0u32, 1u32, 1u32, 0u32, 1f32, 1f32),
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
    };
    let logits = logits.contiguous()?;
    let (st, l) = logits.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        bail!("{OP}: logits are not on a CUDA device")
    };
    let dev = cs.device.clone();
    let ids = alloc_out::<u32>(&dev, n * top_k)?;
    let weights = alloc_out::<f32>(&dev, n * top_k)?;
    if n > 0 {
        let bias_c = bias.map(|b| b.contiguous()).transpose()?;
        let bias_guard = bias_c.as_ref().map(|b| b.storage_and_layout());
        const WARPS: usize = 4; // ROUTE_WARPS in moe_route.cu
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(WARPS) as u32, 1, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let m = &crate::ptx::MOE_ROUTE;
        let fn_name = match &cs.slice {
            CudaStorageSlice::F32(_) => "moe_route_f32",
            CudaStorageSlice::BF16(_) => "moe_route_bf16",
            CudaStorageSlice::F16(_) => "moe_route_f16",
            _ => bail!("{OP}: logits must be f32, bf16 or f16"),
        };
        let func = dev.get_or_load_custom_func(fn_name, &module_key(m), m.ptx)?;
        let mut b = func.builder();
        let xv_f32;
        let xv_bf16;
        let xv_f16;
        match &cs.slice {
            CudaStorageSlice::F32(s) => {
                xv_f32 = contiguous(s, l, OP, "logits")?;
                b.arg(&xv_f32);
            }
            CudaStorageSlice::BF16(s) => {
                xv_bf16 = contiguous(s, l, OP, "logits")?;
                b.arg(&xv_bf16);
            }
            CudaStorageSlice::F16(s) => {
                xv_f16 = contiguous(s, l, OP, "logits")?;
                b.arg(&xv_f16);
            }
            _ => unreachable!("checked above"),
        }
        let bias_view;
        let null = 0usize;
        match &bias_guard {
            Some((bst, bl)) => {
                let Storage::Cuda(bcs) = &**bst else {
                    bail!("{OP}: bias is not on a CUDA device")
                };
                bias_view = contiguous(bcs.as_cuda_slice::<f32>()?, bl, OP, "bias")?;
                b.arg(&bias_view);
            }
            None => {
                b.arg(&null);
            }
        }
        b.arg(&ids);
        b.arg(&weights);
        candle_core::builder_arg!(
            b,
            n as u32,
            e as u32,
            top_k as u32,
            kind,
            n_group,
            topk_group,
            norm_mode,
            norm_p,
            scaling
        );
        // SAFETY: argument order and types match `moe_route_<dtype>`; the kernel writes all N*K ids and
        // weights and reads N*E logits and E bias values.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((
        wrap(CudaStorageSlice::U32(ids), &dev, (n, top_k)),
        wrap(CudaStorageSlice::F32(weights), &dev, (n, top_k)),
    ))
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
