//! `moe-run quantize`: a dense checkpoint -> moe-run's quantized safetensors checkpoint.
//!
//! Layout of the output directory: `model.safetensors` holds every tensor the model uses, under
//! the family's own names; each quantized linear `X.weight` (or each row block of one, as the
//! family stores it: q/k/v separately, experts per expert) is replaced by `X.qweight` (u8) and
//! `X.qparams` (f16) in the layout of `moe_kernels::qmatmul`. DBRX's fused experts are stored
//! per expert (`w1.{e}`, `v1.{e}`) and `w2` already transposed to `[E*H, F]`. config.json gets a
//! `quantization_config` with `"quant_method": "moe-run"` (the format is also in the
//! safetensors `__metadata__`); tokenizer and other non-weight files are copied as they are.
//! Loading it reads the packed weights as stored, never re-quantizing.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device};
use half::f16;
use safetensors::tensor::{Dtype as StDtype, View};

use super::{format_name, quantization_config, QFormat, QuantTensor};
use crate::error::{Error, Result};
use crate::loader::{self, LoadOptions};

struct Raw<'a> {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl View for &Raw<'_> {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub format: QFormat,
    /// Tensors written, and the bytes of `model.safetensors`.
    pub tensors: usize,
    pub file_bytes: u64,
    /// Bytes of the quantized linears (packed + params) and of the dense weights they replace
    /// (at the source checkpoint's dtype).
    pub quantized_bytes: u64,
    pub replaced_bytes: u64,
}

/// Reads the checkpoint in `src` (quantizing its linears as `fmt`, layer by layer) and writes
/// moe-run's quantized checkpoint to `out` (created if needed).
pub fn quantize_checkpoint(src: &Path, out: &Path, fmt: QFormat) -> Result<QuantizeReport> {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        progress: true,
        quant: Some(fmt),
    };
    let (cfg, weights, ck) = loader::load_dir_weights(src, &opts, true)?;
    drop(weights);
    let log = ck.quant_log().expect("recording was requested");
    let mut replaced: BTreeSet<&str> = log.replaced.iter().map(|s| s.as_str()).collect();
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    let (mut quantized_bytes, mut replaced_bytes) = (0u64, 0u64);
    for (parts, q) in &log.weights {
        let k = *q.shape.last().unwrap();
        let (kb, pr) = (
            fmt.row_bytes(k),
            fmt.params_shape(k).iter().product::<usize>(),
        );
        let qw = q.qweight.flatten_all()?.to_vec1::<u8>()?;
        let qp = q.params.flatten_all()?.to_vec1::<f16>()?;
        let mut row = 0;
        for (name, shape) in parts {
            replaced.insert(name.as_str());
            if let Some((_, _, bytes)) = ck.raw(name) {
                replaced_bytes += bytes.len() as u64;
            }
            let rows = shape[..shape.len() - 1].iter().product::<usize>();
            let (qs, ps) = QuantTensor::stored_shapes(fmt, shape);
            let stem = name.strip_suffix(".weight").unwrap_or(name);
            let data = qw[row * kb..(row + rows) * kb].to_vec();
            let params: Vec<u8> = qp[row * pr..(row + rows) * pr]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            quantized_bytes += (data.len() + params.len()) as u64;
            tensors.push((
                format!("{stem}.qweight"),
                Raw {
                    dtype: StDtype::U8,
                    shape: qs,
                    data: Cow::Owned(data),
                },
            ));
            tensors.push((
                format!("{stem}.qparams"),
                Raw {
                    dtype: StDtype::F16,
                    shape: ps,
                    data: Cow::Owned(params),
                },
            ));
            row += rows;
        }
    }
    for name in ck.taken() {
        if replaced.contains(name) {
            continue;
        }
        let (dtype, shape, bytes) = ck.raw(name).expect("taken tensors exist");
        tensors.push((
            name.to_string(),
            Raw {
                dtype,
                shape,
                data: Cow::Borrowed(bytes),
            },
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let st_path = out.join("model.safetensors");
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("moe-run.quantization".to_string(), format_name(fmt)),
    ]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, r)| (n, r)), Some(meta), &st_path)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", st_path.display())))?;
    let n_tensors = tensors.len();
    drop(tensors);
    loader::finish_checkpoint(ck, &cfg)?;

    // config.json with our quantization_config; every other non-weight file copied.
    let cfg_path = src.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    v["quantization_config"] = quantization_config(fmt);
    let out_cfg = out.join("config.json");
    std::fs::write(&out_cfg, serde_json::to_string_pretty(&v).unwrap() + "\n")
        .map_err(|e| Error::io(&out_cfg, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let path = entry.map_err(|e| Error::io(src, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !path.is_file()
            || name == "config.json"
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
        {
            continue;
        }
        let dst = out.join(name);
        std::fs::copy(&path, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    let file_bytes = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();
    Ok(QuantizeReport {
        format: fmt,
        tensors: n_tensors,
        file_bytes,
        quantized_bytes,
        replaced_bytes,
    })
}
