//! Rotary position embedding, "rotate half" form (Llama/Mixtral): the head dim is split in two
//! halves that rotate as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
//! cos/sin tables are computed once for every position in f32, the way transformers does
//! (inv_freq = 1 / theta^(2i/d) in f32, angle = pos * inv_freq in f32).

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{RopeConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_pos, hd/2]` in the activation dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(
        cfg: &RopeConfig,
        head_dim: usize,
        max_pos: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let theta = cfg.theta as f32;
        let pos_scale = match cfg.scaling {
            RopeScaling::None => 1.0f32,
            RopeScaling::Linear { factor } => 1.0 / factor as f32,
        };
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            let pos = p as f32 * pos_scale;
            for &f in &inv_freq {
                let angle = pos * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, half), device)?.to_dtype(dtype)?;
        Ok(Rope { cos, sin })
    }

    /// `x [B, heads, T, hd]` at positions `pos..pos+T` -> same shape.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}
