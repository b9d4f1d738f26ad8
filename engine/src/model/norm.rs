//! RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, with the statistics in f32 whatever the
//! activation dtype (as transformers does).

use candle_core::{DType, Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `[H]`
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm { weight, eps }
    }

    /// `x [.., H] -> [.., H]`
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}
