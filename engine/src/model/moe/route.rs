//! Stage 1, route: router logits `[N, E]` -> for each token the top-k expert ids (best first)
//! and their weights. This is the specification the CUDA router kernel is checked against.

use candle_core::{DType, Result, Tensor};

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

/// Routes every row of `logits [N, E]` (any float dtype; scored in f32).
pub fn route(logits: &Tensor, kind: RouterKind, top_k: usize) -> Result<Routing> {
    let (n, e) = logits.dims2()?;
    if top_k == 0 || top_k > e {
        candle_core::bail!("route: top_k {top_k} must be in 1..={e}")
    }
    let scores: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut ids = Vec::with_capacity(n * top_k);
    let mut weights = Vec::with_capacity(n * top_k);
    let mut probs = vec![0f32; e];
    for row in scores.chunks_exact(e) {
        match kind {
            RouterKind::Softmax { norm_p } => {
                softmax_into(row, &mut probs);
                let chosen = top_k_indices(&probs, top_k);
                let norm = match norm_p {
                    None => 1.0,
                    Some(1.0) => chosen.iter().map(|&i| probs[i]).sum(),
                    Some(p) => {
                        let p = p as f32;
                        chosen
                            .iter()
                            .map(|&i| probs[i].powf(p))
                            .sum::<f32>()
                            .powf(1.0 / p)
                    }
                };
                for &i in &chosen {
                    ids.push(i as u32);
                    weights.push(probs[i] / norm);
                }
            }
        }
    }
    Ok(Routing {
        top_k,
        ids,
        weights,
    })
}

/// Numerically stable softmax in f32 (subtract the max, as torch does).
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
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softmax_top2_renormalised() {
        // One token, 4 experts; logits chosen so the top two are experts 2 and 0.
        let logits = Tensor::new(&[[1.0f32, -1.0, 2.0, 0.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: Some(1.0) }, 2).unwrap();
        assert_eq!(r.ids, vec![2, 0]);
        // Renormalised over the two: softmax over [2, 1] = [e/(e+1), 1/(e+1)].
        let e = std::f32::consts::E;
        assert!((r.weights[0] - e / (e + 1.0)).abs() < 1e-6);
        assert!((r.weights[1] - 1.0 / (e + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn without_renormalisation_weights_are_probabilities() {
        let logits = Tensor::new(&[[0.0f32, 0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: None }, 2).unwrap();
        assert_eq!(r.ids, vec![0, 1], "ties go to the lower index");
        assert_eq!(r.weights, vec![0.25, 0.25]);
    }

    #[test]
    fn p_norm_normalisation() {
        // DBRX divides the top-k probabilities by their p-norm; p = 2 here.
        let logits = Tensor::new(&[[0.0f32, 1.0, 2.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: Some(2.0) }, 2).unwrap();
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
    fn many_tokens_and_bad_k() {
        let logits = Tensor::new(&[[0.0f32, 5.0, 1.0], [3.0, 0.0, 4.0]], &Device::Cpu).unwrap();
        let r = route(&logits, RouterKind::Softmax { norm_p: Some(1.0) }, 1).unwrap();
        assert_eq!(r.ids, vec![1, 2]);
        assert_eq!(r.weights, vec![1.0, 1.0]);
        assert_eq!(r.num_tokens(), 2);
        assert!(route(&logits, RouterKind::Softmax { norm_p: Some(1.0) }, 4).is_err());
    }
}
