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

use crate::error::{Error, Result};
use crate::loader::{self, LoadOptions};
use crate::quant::{format_name, quantization_config, QFormat, QuantTensor};

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
/// moe-run's quantized checkpoint to `out`.
///
/// Nothing is written until the whole output is ready: it is built in a staging folder and then
/// put in place (see [`crate::fsio`]). `out` may not be, contain or lie in `src` (also through
/// symlinks), nor lie in a Hugging Face cache; an existing, non-empty `out` needs `force`. A
/// checkpoint that is already quantized is refused: dequantizing and quantizing again would
/// compound the rounding error of both, so the dense original is the right input.
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    fmt: QFormat,
    force: bool,
) -> Result<QuantizeReport> {
    if !src.is_dir() {
        return Err(Error::io(
            src,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights directory not found"),
        ));
    }
    let cfg_path = src.join("config.json");
    let src_cfg = crate::config::ModelConfig::from_file(&cfg_path)?;
    if let Some(have) = loader::stored_quantization(&cfg_path, &src_cfg)? {
        return Err(Error::Input(format!(
            "{}: the checkpoint is already quantized ({}); quantize the original dense checkpoint \
             instead (quantizing quantized weights again would add a second rounding error)",
            src.display(),
            format_name(have)
        )));
    }
    crate::fsio::check_output(out, "--out", &crate::fsio::Inputs::new().with(src), force)?;
    // With --force into a folder holding another checkpoint, its shards or index would be read
    // instead of the new model.safetensors: refuse rather than delete anything.
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "model.safetensors.index.json"
                || (name.ends_with(".safetensors") && name != "model.safetensors")
            {
                return Err(Error::Input(format!(
                    "--out {}: holds {name} of another checkpoint, which would be read instead of \
                     the new model.safetensors; remove it or choose another folder",
                    out.display()
                )));
            }
        }
    }
    let opts = LoadOptions {
        dtype: DType::F32,
        weight_dtype: None,
        placement: None,
        device: Device::Cpu,
        progress: true,
        quant: Some(fmt),
    };
    let (cfg, weights, ck) = loader::load_dir_weights(src, &opts, true)?;
    drop(weights);
    let Some(log) = ck.quant_log() else {
        return Err(Error::Input(
            "internal: quantization was not recorded".into(),
        ));
    };
    let mut replaced: BTreeSet<&str> = log.replaced.iter().map(|s| s.as_str()).collect();
    let mut tensors: Vec<(String, Raw)> = Vec::new();
    let (mut quantized_bytes, mut replaced_bytes) = (0u64, 0u64);
    for (parts, q) in &log.weights {
        let k = q.shape.last().copied().unwrap_or(0);
        let (kb, pr) = (
            fmt.row_bytes(k),
            fmt.params_shape(k).iter().product::<usize>(),
        );
        let qw = q.qweight.flatten_all()?.to_vec1::<u8>()?;
        // The params as stored: f16 (int8, int4) or u8 exponents (mxfp4), little-endian bytes.
        let (pdtype, pbytes): (StDtype, Vec<u8>) = match q.params.dtype() {
            candle_core::DType::U8 => (StDtype::U8, q.params.flatten_all()?.to_vec1::<u8>()?),
            _ => {
                let p = q.params.flatten_all()?.to_vec1::<f16>()?;
                (
                    StDtype::F16,
                    p.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            }
        };
        let pw = if pdtype == StDtype::U8 { 1 } else { 2 };
        let mut row = 0;
        for (name, shape) in parts {
            replaced.insert(name.as_str());
            if let Some((_, _, bytes)) = ck.raw(name) {
                replaced_bytes += bytes.len() as u64;
            }
            let rows = shape
                .split_last()
                .map_or(0, |(_, l)| l.iter().product::<usize>());
            let (qs, ps) = QuantTensor::stored_shapes(fmt, shape);
            let stem = name.strip_suffix(".weight").unwrap_or(name);
            let (Some(data), Some(params)) = (
                qw.get(row * kb..(row + rows) * kb),
                pbytes.get(row * pr * pw..(row + rows) * pr * pw),
            ) else {
                return Err(Error::Input(format!(
                    "internal: the quantized rows of {name} are out of range"
                )));
            };
            let (data, params) = (data.to_vec(), params.to_vec());
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
                    dtype: pdtype,
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
        let Some((dtype, shape, bytes)) = ck.raw(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                files: ck.file_names(),
            });
        };
        tensors.push((
            name.to_string(),
            Raw {
                dtype,
                shape,
                data: Cow::Borrowed(bytes),
            },
        ));
    }
    let staged = crate::fsio::StagedDir::new(out)?;
    let st_path = staged.path("model.safetensors");
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("moe-run.quantization".to_string(), format_name(fmt)),
    ]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, r)| (n, r)), Some(meta), &st_path)
        .map_err(|e| {
            Error::Input(format!(
                "cannot write {}: {e}",
                staged.final_path("model.safetensors").display()
            ))
        })?;
    let n_tensors = tensors.len();
    drop(tensors);
    loader::finish_checkpoint(ck, &cfg)?;

    // config.json with our quantization_config; every other non-weight file copied.
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    let Some(obj) = v.as_object_mut() else {
        return Err(Error::config(&cfg_path, "config.json is not a JSON object"));
    };
    let mut qc = quantization_config(fmt);
    if let (true, Some(q)) = (cfg.experts_mxfp4, qc.as_object_mut()) {
        // The published MXFP4 experts were copied as they are (`*_blocks`, `*_scales`).
        q.insert("published_experts".into(), "mxfp4".into());
    }
    obj.insert("quantization_config".into(), qc);
    let pretty = serde_json::to_string_pretty(&v).map_err(|source| Error::Json {
        path: cfg_path.clone(),
        source,
    })?;
    std::fs::write(staged.path("config.json"), pretty + "\n")
        .map_err(|e| Error::io(staged.final_path("config.json"), e))?;
    for entry in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let path = entry.map_err(|e| Error::io(src, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !path.is_file()
            || name == "config.json"
            || name.ends_with(".safetensors")
            || name == "model.safetensors.index.json"
            || name.starts_with('.')
        {
            continue;
        }
        std::fs::copy(&path, staged.path(name))
            .map_err(|e| Error::io(staged.final_path(name), e))?;
    }
    let file_bytes = std::fs::metadata(&st_path)
        .map_err(|e| Error::io(&st_path, e))?
        .len();
    staged.commit()?;
    Ok(QuantizeReport {
        format: fmt,
        tensors: n_tensors,
        file_bytes,
        quantized_bytes,
        replaced_bytes,
    })
}
