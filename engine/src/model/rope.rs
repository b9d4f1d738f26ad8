//! Rotary position embedding. Two layouts: "rotate half" (Llama, Mixtral, Qwen...: dim i pairs
//! with i + d/2) and interleaved (DeepSeek MLA: dims 2i and 2i+1 pair). cos/sin tables are
//! computed once for every position in f32 the way transformers does (inv_freq in f32,
//! angle = pos * inv_freq in f32), with linear or YaRN frequency scaling and YaRN's attention
//! factor folded into cos and sin.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::{RopeConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_pos, d/2]` in the activation dtype.
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

/// Per-pair inverse frequencies for a rotated dimension `dim`.
pub fn inv_freq(cfg: &RopeConfig, dim: usize) -> Vec<f32> {
    let theta = cfg.theta as f32;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / dim as f32))
        .collect();
    match cfg.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            // transformers' `_compute_llama3_parameters`, in f32 like its tensors.
            let old = original_max_position as f32;
            let (factor, low, high) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else if high > low {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    } else {
                        // low == high and the wavelength exactly at it: transformers divides
                        // 0 by 0 here; keep the frequency instead.
                        f
                    }
                })
                .collect()
        }
        RopeScaling::Yarn {
            factor,
            original_max_position,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // Dimensions that rotate more than beta_fast times over the pretraining context keep
            // their frequency, those under beta_slow are interpolated by `factor`, with a linear
            // ramp in between (YaRN, as transformers' `_compute_yarn_parameters`).
            let d = dim as f64;
            let correction = |rotations: f64| {
                d * (original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * cfg.theta.ln())
            };
            let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001;
            }
            base.iter()
                .enumerate()
                .map(|(i, &extra)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                    let keep = 1.0 - ramp; // share of the unscaled (extrapolated) frequency
                    (extra / factor as f32) * (1.0 - keep) + extra * keep
                })
                .collect()
        }
    }
}

impl Rope {
    /// Tables for a rotated dimension `dim` (the head dim, or MLA's rope part).
    pub fn new(
        cfg: &RopeConfig,
        dim: usize,
        max_pos: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq = inv_freq(cfg, dim);
        let scale = cfg.scaling.attention_factor() as f32;
        let half = dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, half), device)?.to_dtype(dtype)?;
        Ok(Rope {
            cos,
            sin,
            interleaved: cfg.interleaved,
        })
    }

    /// The whole `cos`, `sin` tables `[max_pos, d/2]` and whether pairs are interleaved (for
    /// the fused `moe_kernels::qk_norm_rope`).
    pub fn tables(&self) -> (&Tensor, &Tensor, bool) {
        (&self.cos, &self.sin, self.interleaved)
    }

    /// `x [B, heads, T, d]` at positions `pos..pos+T` -> same shape. When `d` is wider than
    /// the tables (partial rotary), the first `2 * cos.dim(1)` dims rotate and the rest pass
    /// through.
    pub fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let (d, rd) = (x.dim(3)?, 2 * self.cos.dim(1)?);
        if d > rd {
            let rot = self.apply(&x.narrow(3, 0, rd)?, pos)?;
            return Tensor::cat(&[rot, x.narrow(3, rd, d - rd)?.contiguous()?], 3);
        }
        let x = x.contiguous()?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_fast_dims_and_interpolates_slow_ones() {
        let cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Yarn {
                factor: 40.0,
                original_max_position: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                attention_factor: None,
                truncate: true,
            },
            interleaved: true,
            rotary_dim: None,
        };
        let plain = inv_freq(
            &RopeConfig {
                scaling: RopeScaling::None,
                ..cfg.clone()
            },
            64,
        );
        let yarn = inv_freq(&cfg, 64);
        assert_eq!(yarn[0], plain[0], "highest frequency untouched");
        // The whole ramp, against values worked out by hand: the correction dims are
        // 64 ln(4096 / (32 * 2pi)) / (2 ln 1e4) = 10.47 -> floor 10 and 64 ln(4096 / 2pi) / (2 ln 1e4)
        // = 22.51 -> ceil 23, so pair i keeps its frequency for i <= 10, is divided by 40 for i >= 23,
        // and mixes the two linearly with weight r = (i - 10) / 13 in between.
        for i in 0..32 {
            let r = ((i as f64 - 10.0) / 13.0).clamp(0.0, 1.0);
            let want = plain[i] as f64 * ((1.0 - r) + r / 40.0);
            assert!(
                (yarn[i] as f64 - want).abs() <= 1e-6 * want,
                "pair {i}: {} vs {want}",
                yarn[i]
            );
        }
        assert!(
            (yarn[31] - plain[31] / 40.0).abs() < 1e-12,
            "lowest frequency divided by the factor"
        );
        // Attention factor without mscale fields: 0.1 ln(40) + 1.
        assert!((cfg.scaling.attention_factor() - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
    }
}
