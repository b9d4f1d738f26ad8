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
        let x = Tensor::new(&[[1f32, 2., 3., 6.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f32, 1., 2., 1.], &Device::Cpu).unwrap();
        let rms: Vec<f32> = Norm::new(w.clone(), NormKind::Rms { eps: 0.0 })
            .forward(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let r = (50f32 / 4.0).sqrt();
        assert!((rms[2] - 2.0 * 3.0 / r).abs() < 1e-6);
        let ln: Vec<f32> = Norm::new(w, NormKind::LayerNorm { eps: 0.0 })
            .forward(&x)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // mean 3, var (4+1+0+9)/4 = 3.5
        assert!((ln[0] + 2.0 / 3.5f32.sqrt()).abs() < 1e-6);
        assert!(ln[2].abs() < 1e-6);
    }
}
