//! Weight-only INT8 / INT4 / MXFP4 quantization: formats (specified in `moe_kernels::qmatmul`), the
//! quantized tensor type, quantize-on-load and the moe-run quantized checkpoint format.
//!
//! What is quantized: every linear weight of attention (fused q/k/v and o, or the MLA
//! projections), of dense and shared MLPs, and the routed experts. What stays in the compute
//! dtype (f32/f16/bf16): embeddings, norms, biases, routers (+ the correction bias) and lm_head.
//! Legend: E experts, N output features, K input features.

// User input reaches this module: no unwrap/expect/panic/unchecked indexing outside tests
// (checked by `cargo clippy`; a proven-safe exception carries its own `allow` and reason).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use candle_core::{DType, Device, Tensor};

pub use moe_kernels::qmatmul::{dequantize_row, quantize_row, QFormat};

use crate::error::{Error, Result};

/// The default INT4 group along K.
pub const DEFAULT_GROUP: usize = 128;

/// Parses `int8`, `int4` (group 128), `int4:G` with G in 32, 64, 128, or `mxfp4` (`none` -> `None`).
/// An optional `--quant` flag ([`parse_quant`]; `None` without it or with `none`).
pub fn parse_quant_flag(s: Option<&str>) -> Result<Option<QFormat>> {
    Ok(s.map(parse_quant).transpose()?.flatten())
}

pub fn parse_quant(s: &str) -> Result<Option<QFormat>> {
    let bad = || {
        Error::Input(format!(
            "unknown quantization {s:?}; use int8, int4, int4:64, int4:32, mxfp4 or none"
        ))
    };
    Ok(Some(match s {
        "none" => return Ok(None),
        "int8" => QFormat::Int8,
        "mxfp4" => QFormat::Mxfp4,
        "int4" => QFormat::Int4 {
            group: DEFAULT_GROUP,
        },
        _ => {
            let g: usize = s
                .strip_prefix("int4:")
                .and_then(|g| g.parse().ok())
                .ok_or_else(bad)?;
            if ![32, 64, 128].contains(&g) {
                return Err(bad());
            }
            QFormat::Int4 { group: g }
        }
    }))
}

/// `int8`, `int4:G` or `mxfp4`, the inverse of [`parse_quant`].
pub fn format_name(fmt: QFormat) -> String {
    match fmt {
        QFormat::Int8 => "int8".into(),
        QFormat::Int4 { group } => format!("int4:{group}"),
        QFormat::Mxfp4 => "mxfp4".into(),
    }
}

/// A quantized weight `[.., N, K]` (a linear `[N, K]` or stacked experts `[E, N, K]`):
/// `qweight [.., N, row_bytes(K)]` u8 and `params [.., N, ..]` in `fmt.params_dtype()` (f16; u8 for
/// MXFP4), as in `moe_kernels::qmatmul`.
#[derive(Debug, Clone)]
pub struct QuantTensor {
    pub fmt: QFormat,
    /// The logical (dequantized) shape `[.., N, K]`.
    pub shape: Vec<usize>,
    pub qweight: Tensor,
    pub params: Tensor,
}

impl QuantTensor {
    /// Shapes of `qweight` and `params` for a logical `[.., N, K]` weight.
    pub fn stored_shapes(fmt: QFormat, shape: &[usize]) -> (Vec<usize>, Vec<usize>) {
        let (k, lead) = shape.split_last().map_or((0, &[][..]), |(k, l)| (*k, l));
        let mut q = lead.to_vec();
        q.push(fmt.row_bytes(k));
        let mut p = lead.to_vec();
        p.extend(fmt.params_shape(k));
        (q, p)
    }

    /// Quantizes `w [.., N, K]` (any float dtype, any device) row by row on the host, and puts
    /// the result on `device`.
    pub fn quantize(w: &Tensor, fmt: QFormat, device: &Device) -> Result<Self> {
        let shape = w.dims().to_vec();
        let k = match shape.as_slice() {
            [.., _, k] if *k > 0 => *k,
            _ => {
                return Err(Error::Input(format!(
                    "cannot quantize a tensor of shape {shape:?}"
                )))
            }
        };
        let data = w
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (q, p) = moe_kernels::qformat::quantize_rows(fmt, &data, k);
        let (qs, ps) = Self::stored_shapes(fmt, &shape);
        Ok(QuantTensor {
            fmt,
            qweight: Tensor::from_vec(q, qs, device)?,
            params: p.to_tensor(&ps, device)?,
            shape,
        })
    }

    /// The dequantized weight `[.., N, K]` in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let k = self.shape.last().copied().unwrap_or(0).max(1);
        let w = moe_kernels::qformat::dequantize_tensors(self.fmt, &self.qweight, &self.params, k)?;
        Tensor::from_vec(w, self.shape.clone(), self.qweight.device())?.to_dtype(dtype)
    }

    /// `x [.., K] -> [.., N]`: `x W^T` for a `[N, K]` weight, dequantized on the fly.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (&[.., n, _], Some((&k, lead))) = (self.shape.as_slice(), x.dims().split_last()) else {
            candle_core::bail!("qmatmul: weight {:?}, input {:?}", self.shape, x.dims())
        };
        let y = moe_kernels::qmatmul(&x.reshape(((), k))?, &self.qweight, &self.params, self.fmt)?;
        let mut out = lead.to_vec();
        out.push(n);
        y.reshape(out)
    }

    /// Stacked experts `[E, N, K]`: `x [M, K]` expert-sorted with rows `offsets[e]..offsets[e+1]`
    /// for expert e -> `[M, N]`.
    pub fn forward_grouped(&self, x: &Tensor, offsets: &[u32]) -> candle_core::Result<Tensor> {
        moe_kernels::qmatmul_grouped(x, &self.qweight, &self.params, offsets, self.fmt)
    }

    pub fn bytes(&self) -> usize {
        self.qweight.elem_count() + self.params.elem_count() * self.params.dtype().size_in_bytes()
    }
}

/// A linear weight `[.., N, K]`: dense in the compute dtype, or quantized.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(QuantTensor),
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Weight::Dense(t)
    }
}

impl Weight {
    /// `Dense(w)` when `fmt` is `None`, else `w` quantized onto `device`.
    pub fn new(w: Tensor, fmt: Option<QFormat>, device: &Device) -> Result<Self> {
        Ok(match fmt {
            None => Weight::Dense(w.to_device(device)?),
            Some(f) => Weight::Quant(QuantTensor::quantize(&w, f, device)?),
        })
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Dense(t) => t.dims(),
            Weight::Quant(q) => &q.shape,
        }
    }

    /// Where the weight lives.
    pub fn device(&self) -> &Device {
        match self {
            Weight::Dense(t) => t.device(),
            Weight::Quant(q) => q.qweight.device(),
        }
    }

    /// The weight as a dense tensor in `dtype` (dequantized if quantized).
    pub fn to_dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Quant(q) => q.dequantize(dtype),
        }
    }

    /// Experts `ids` (in that order) of a stacked `[E, ..]` weight, copied onto `device`.
    pub fn select_experts(&self, ids: &[usize], device: &Device) -> candle_core::Result<Weight> {
        let pick = |t: &Tensor| -> candle_core::Result<Tensor> {
            if ids.is_empty() {
                return t.narrow(0, 0, 0)?.to_device(device);
            }
            let idx: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            let idx = Tensor::from_vec(idx, ids.len(), t.device())?;
            t.index_select(&idx, 0)?.to_device(device)
        };
        Ok(match self {
            Weight::Dense(t) => Weight::Dense(pick(t)?),
            Weight::Quant(q) => {
                let mut shape = q.shape.clone();
                if let Some(e) = shape.first_mut() {
                    *e = ids.len();
                }
                Weight::Quant(QuantTensor {
                    fmt: q.fmt,
                    shape,
                    qweight: pick(&q.qweight)?,
                    params: pick(&q.params)?,
                })
            }
        })
    }

    /// The weight as the CPU kernels read it (in place, no copy).
    pub fn kernel_ref(&self) -> moe_kernels::cpu::WeightRef<'_> {
        match self {
            Weight::Dense(t) => moe_kernels::cpu::WeightRef::Dense(t),
            Weight::Quant(q) => moe_kernels::cpu::WeightRef::Quant {
                qweight: &q.qweight,
                params: &q.params,
                fmt: q.fmt,
            },
        }
    }

    /// Bytes in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.bytes(),
        }
    }
}

/// The `quantization_config` moe-run writes into config.json of a quantized checkpoint.
pub fn quantization_config(fmt: QFormat) -> serde_json::Value {
    match fmt {
        QFormat::Int8 => serde_json::json!({
            "quant_method": "moe-run", "format": "int8", "bits": 8,
            "granularity": "per_output_channel", "symmetric": true, "scale_dtype": "float16"
        }),
        QFormat::Int4 { group } => serde_json::json!({
            "quant_method": "moe-run", "format": "int4", "bits": 4, "group_size": group,
            "symmetric": false, "scale_dtype": "float16"
        }),
        QFormat::Mxfp4 => serde_json::json!({
            "quant_method": "moe-run", "format": "mxfp4", "bits": 4, "group_size": 32,
            "scale_dtype": "e8m0"
        }),
    }
}

/// Reads a `quantization_config` back: `Some(format)` for moe-run's own, an error naming any
/// other method (FP8, GPTQ, AWQ...), which this build cannot load.
pub fn parse_quantization_config(q: &serde_json::Value) -> std::result::Result<QFormat, String> {
    let method = q
        .get("quant_method")
        .and_then(|m| m.as_str())
        .unwrap_or("unknown method");
    if method != "moe-run" {
        return Err(method.to_string());
    }
    match q.get("format").and_then(|f| f.as_str()) {
        Some("int8") => Ok(QFormat::Int8),
        Some("int4") => match q.get("group_size").and_then(|g| g.as_u64()) {
            Some(g) if g > 0 && g % 2 == 0 => Ok(QFormat::Int4 { group: g as usize }),
            _ => Err("moe-run int4 without a valid group_size".into()),
        },
        Some("mxfp4") => Ok(QFormat::Mxfp4),
        other => Err(format!("moe-run with unknown format {other:?}")),
    }
}
