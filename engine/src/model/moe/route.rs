//! Stage 1, route: router logits `[N, E]` -> for each token the top-k expert ids (best first)
//! and their weights. This is the specification the CUDA router kernel is checked against.

use candle_core::{DType, Result, Tensor};

use moe_kernels::route::route_reference;

use crate::config::RouterKind;

/// Top-k routing decisions for N tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[N * A]`, token-major: the experts of token n are `ids[n*A..(n+1)*A]`, best first.
    pub ids: Vec<u32>,
    /// `[N * A]`, the matching combine weights (f32).
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn num_tokens(&self) -> usize {
        self.ids.len() / self.top_k.max(1)
    }
}

/// Routes every row of `logits [N, E]` (any float dtype; scored in f32). `bias [E]` is the
/// selection-only correction bias of [`RouterKind::SigmoidBiasGrouped`]. The math is
/// `moe_kernels::route::route_reference`, the specification the CUDA router kernel is checked
/// against, so the CPU path and the kernel share one definition.
pub fn route(
    logits: &Tensor,
    kind: RouterKind,
    top_k: usize,
    bias: Option<&[f32]>,
) -> Result<Routing> {
    let (_, e) = logits.dims2()?;
    if top_k == 0 || top_k > e {
        candle_core::bail!("route: top_k {top_k} must be in 1..={e}")
    }
    // The candle path's host routing: a device-to-host read (counted; the kernel path never does this).
    let scores: Vec<f32> = crate::model::host::read_vec(&logits.to_dtype(DType::F32)?)?;
    let (ids, weights) = route_reference(&scores, e, kind, top_k, bias)?;
    Ok(Routing {
        top_k,
        ids,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_top2_renormalised() {
        // One token, 4 experts; logits chosen so the top two are experts 2 and 0.
        let logits = Tensor::new(&[[1.0f32, -1.0, 2.0, 0.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: Some(1.0) }, 2, None).unwrap();
        assert_eq!(r.ids, vec![2, 0]);
        // Renormalised over the two: softmax over [2, 1] = [e/(e+1), 1/(e+1)].
        let e = std::f32::consts::E;
        assert!((r.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((r.weights[1] - 1.0 / (e + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn without_renormalisation_weights_are_probabilities() {
        let logits = Tensor::new(&[[0.0f32, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: None }, 2, None).unwrap();
        assert_eq!(r.ids, vec![0, 1], "ties go to the lower index");
        assert_eq!(r.weights, vec![0.25, 0.25]);
    }

    #[test]
    fn p_norm_normalisation() {
        // DBRX divides the top-k probabilities by their p-norm; p = 2 here.
        let logits = Tensor::new(&[[0.0f32, 1.0, 2.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: Some(2.0) }, 2, None).unwrap();
        assert_eq!(r.ids, vec![2, 1]);
        let norm = r.weights.iter().map(|w| w * w).sum::<f32>().sqrt();
        assert!(
            (norm - 1.0).abs() < 1e-6,
            "weights have unit 2-norm: {:?}",
            r.weights
        );
        assert!((r.weights[0] / r.weights[1] - std::f32::consts::E).abs() < 1e-5);
    }

    #[test]
    fn deepseek_v2_group_limited() {
        // 8 experts in 4 groups of 2, keep 2 groups. Probabilities follow the logits' order.
        let logits =
            Tensor::new(&[[5.0f32, 0.0, 4.9, 0.0, 0.0, 4.8, 0.0, 1.0]], &Device::Cpu).unwrap();
        let kind = RouterKind::SoftmaxGroupLimited {
            n_group: 4,
            topk_group: 2,
            scaling: 2.0,
        };
        let r = route(&logits, kind, 3, None).unwrap();
        // Groups by max: g0 (5.0), g1 (4.9), g2 (4.8), g3 (1.0): g2 is dropped, so expert 5 is
        // not chosen although it has the third-highest probability.
        assert_eq!(r.ids, vec![0, 2, 1]);
        let free = route(
            &logits,
            RouterKind::SoftmaxGroupLimited {
                n_group: 1,
                topk_group: 1,
                scaling: 2.0,
            },
            3,
            None,
        )
        .unwrap();
        assert_eq!(free.ids, vec![0, 2, 5]);
        // Weights are probability x scaling, not renormalised.
        let p = route(&logits, RouterKind::Softmax { norm_p: None }, 1, None)
            .unwrap()
            .weights[0];
        assert!((r.weights[0] - 2.0 * p).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_bias_chooses_but_does_not_weigh() {
        let logits = Tensor::new(&[[2.0f32, 1.0, 0.0, -1.0]], &Device::Cpu).unwrap();
        let kind = RouterKind::SigmoidBiasGrouped {
            n_group: 1,
            topk_group: 1,
            renormalize: true,
            scaling: 2.5,
        };
        // Without bias experts 0,1 win; a bias of +3 on expert 3 makes it win instead of 1.
        let r = route(&logits, kind, 2, Some(&[0.0, 0.0, 0.0, 3.0])).unwrap();
        assert_eq!(r.ids, vec![3, 0]);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let sum = sig(-1.0) + sig(2.0);
        assert!((r.weights[0] - 2.5 * sig(-1.0) / sum).abs() < 1e-6);
        assert!((r.weights[1] - 2.5 * sig(2.0) / sum).abs() < 1e-6);
        assert!(
            route(&logits, kind, 2, None).is_err(),
            "the bias is required"
        );
    }

    #[test]
    fn sigmoid_groups_score_by_top2_sum() {
        // 2 groups of 3: g0 = (0.9, 0.0, 0.0), g1 = (0.5, 0.5, 0.0) as biases on zero logits.
        // Max would keep g0; the top-2 sum keeps g1 (1.0 vs 0.9).
        let logits = Tensor::new(&[[0.0f32; 6]], &Device::Cpu).unwrap();
        let kind = RouterKind::SigmoidBiasGrouped {
            n_group: 2,
            topk_group: 1,
            renormalize: false,
            scaling: 1.0,
        };
        let r = route(&logits, kind, 2, Some(&[0.9, 0.0, 0.0, 0.5, 0.5, 0.0])).unwrap();
        assert_eq!(r.ids, vec![3, 4]);
        assert_eq!(r.weights, vec![0.5, 0.5]);
    }

    #[test]
    fn many_tokens_and_bad_k() {
        let logits = Tensor::new(&[[0.0f32, 5.0, 1.0], [3.0, 0.0, 4.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: Some(1.0) }, 1, None).unwrap();
        assert_eq!(r.ids, vec![1, 2]);
        assert_eq!(r.weights, vec![1.0, 1.0]);
        assert_eq!(r.num_tokens(), 2);
        assert!(route(&logits, RouterKind::Softmax { norm_p: Some(1.0) }, 4, None).is_err());
    }
}
