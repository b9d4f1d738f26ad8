//! RMSNorm and bias-free LayerNorm, with the statistics in f32 whatever the activation dtype
//! (as transformers does), then cast back and scaled by the weight.

use candle_core::{DType, Result, Tensor, D};

use crate::config::NormKind;

#[derive(Debug, Clone)]
pub struct Norm {
    /// `[dim]`
    pub weight: Tensor,
    pub kind: NormKind,
}

impl Norm {
    pub fn new(weight: Tensor, kind: NormKind) -> Self {
        Norm { weight, kind }
    }

    /// `x [.., dim] -> [.., dim]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let normed = match self.kind {
            NormKind::Rms { eps } => {
                let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
                x32.broadcast_div(&(var + eps)?.sqrt()?)?
            }
            NormKind::LayerNorm { eps } => {
                let centred = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
                let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
                centred.broadcast_div(&(var + eps)?.sqrt()?)?
            }
        };
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_and_layer_norm() {
        // Every element of two rows against an independent f64 evaluation of each formula.
        let rows = [[1f32, 2., 3., 6.], [-0.5, 4., 0.25, -3.]];
        let ws = [1f32, 0.5, 2., -1.];
        let x = Tensor::new(&rows, &Device::Cpu).unwrap();
        let w = Tensor::new(&ws, &Device::Cpu).unwrap();
        let eps = 1e-5;
        let run = |kind| -> Vec<Vec<f32>> {
            Norm::new(w.clone(), kind)
                .forward(&x)
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let check = |got: Vec<Vec<f32>>, f: &dyn Fn(&[f32; 4]) -> Vec<f64>| {
            assert_eq!(got.len(), 2);
            for (g, r) in got.iter().zip(&rows) {
                let want = f(r);
                assert_eq!(g.len(), 4);
                for (a, b) in g.iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0),
                        "{a} vs {b}"
                    );
                }
            }
        };
        let scaled =
            |v: Vec<f64>| -> Vec<f64> { v.iter().zip(&ws).map(|(a, &w)| a * w as f64).collect() };
        check(run(NormKind::Rms { eps }), &|r| {
            let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 4.0;
            scaled(r.iter().map(|&v| v as f64 / (ms + eps).sqrt()).collect())
        });
        check(run(NormKind::LayerNorm { eps }), &|r| {
            let mean = r.iter().map(|&v| v as f64).sum::<f64>() / 4.0;
            let var = r.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 4.0;
            scaled(
                r.iter()
                    .map(|&v| (v as f64 - mean) / (var + eps).sqrt())
                    .collect(),
            )
        });
    }
}
