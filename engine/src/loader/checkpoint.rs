//! A set of safetensors files (one file, or shards listed by `model.safetensors.index.json`),
//! memory-mapped, with every header validated before any tensor is read. Tensors are taken by
//! name with their expected shape; whatever is never taken is reported as unexpected at the end.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensorError};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

/// The bytes of one safetensors file: a read-only memory map, a buffer compiled into the binary,
/// or one in memory.
enum Bytes {
    Mmap(memmap2::Mmap),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Static(s) => s,
            Bytes::Owned(v) => v,
        }
    }
}

struct StFile {
    /// Shown in error messages.
    name: String,
    bytes: Bytes,
    /// Start of the data section: 8 + header length.
    data_start: usize,
    meta: Metadata,
}

pub struct Checkpoint {
    files: Vec<StFile>,
    /// tensor name -> index into `files`
    index: HashMap<String, usize>,
    taken: BTreeSet<String>,
    progress: Option<ProgressBar>,
    /// What `moe-run quantize` writes: each quantized weight with the dense parts it replaces.
    quant_log: Option<QuantLog>,
}

/// A tensor name and its shape.
pub type NamedShape = (String, Vec<usize>);

/// Quantized weights produced while loading (see [`Checkpoint::record_quantization`]).
#[derive(Default)]
pub struct QuantLog {
    /// `(parts, weight)`: the dense `.weight` names and `[rows, K]` shapes, and the quantized
    /// weight whose rows they are, in order.
    pub weights: Vec<(Vec<NamedShape>, crate::quant::QuantTensor)>,
    /// Dense tensors that were taken but are replaced by quantized ones under other names.
    pub replaced: BTreeSet<String>,
}

/// Float dtypes a checkpoint may store weights in.
pub(crate) const FLOAT_DTYPES: &str = "F32, F16, BF16";

// Indexing below is proven in range: file indices come from `index`, which `from_files` builds
// from `files` itself, and every tensor's byte range was checked against its buffer by
// `SafeTensors::read_metadata` in `parse_file` (offsets cover the data section exactly).
#[allow(clippy::indexing_slicing)]
impl Checkpoint {
    /// Opens `DIR/model.safetensors.index.json` (sharded) or `DIR/model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            Self::open_sharded(dir, &index_path)
        } else if single.exists() {
            Self::from_files(vec![open_file(&single)?])
        } else {
            Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "neither model.safetensors nor model.safetensors.index.json is in this directory",
                ),
            ))
        }
    }

    /// A single safetensors file held in memory (the embedded model goes through here).
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self> {
        Self::from_files(vec![parse_file(name.to_string(), Bytes::Static(bytes))?])
    }

    /// A single safetensors file in memory (`name` is used in messages).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::from_files(vec![parse_file(name.to_string(), Bytes::Owned(bytes))?])
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index_path.to_path_buf(),
                source,
            })?;
        let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(Error::config(index_path, "no \"weight_map\" object"));
        };
        // Shard file names in first-seen order; each must be a plain file name inside `dir`.
        let mut shard_names: Vec<&str> = Vec::new();
        for (tensor, file) in map {
            let Some(file) = file.as_str() else {
                return Err(Error::config(
                    index_path,
                    format!("weight_map[{tensor:?}] is not a file name"),
                ));
            };
            if Path::new(file).components().count() != 1 || file == ".." {
                return Err(Error::config(
                    index_path,
                    format!("weight_map[{tensor:?}] = {file:?} is not a file in this directory"),
                ));
            }
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
        }
        let files = shard_names
            .iter()
            .map(|f| open_file(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let ck = Self::from_files(files)?;
        // The index must tell the truth about where each tensor is.
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            let fi = shard_names.iter().position(|f| *f == file).unwrap_or(0);
            if ck.files[fi].meta.info(tensor).is_none() {
                return Err(Error::MissingTensor {
                    name: tensor.clone(),
                    files: vec![format!(
                        "{} (named by {})",
                        ck.files[fi].name,
                        index_path.display()
                    )],
                });
            }
        }
        Ok(ck)
    }

    fn from_files(files: Vec<StFile>) -> Result<Self> {
        let mut index = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            for name in f.meta.tensors().into_keys() {
                if let Some(prev) = index.insert(name.clone(), fi) {
                    return Err(Error::Safetensors {
                        path: PathBuf::from(&f.name),
                        msg: format!("tensor {name:?} is also stored in {}", files[prev].name),
                    });
                }
            }
        }
        Ok(Checkpoint {
            files,
            index,
            taken: BTreeSet::new(),
            quant_log: None,
            progress: None,
        })
    }

    /// Shows a progress bar over the checkpoint's bytes (call only when stderr is a terminal).
    pub fn show_progress(&mut self) {
        let total: usize = self.files.iter().map(|f| f.bytes.len()).sum();
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) =
            ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {msg}")
        {
            bar.set_style(style);
        }
        self.progress = Some(bar);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names in the checkpoint.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }

    /// The one 16-bit float dtype every float tensor of the checkpoint is stored in (bf16 or f16),
    /// or `None` when some are f32 or they mix: what `--dtype auto` keeps the linears in on the CPU.
    pub fn half_dtype(&self) -> Option<DType> {
        let mut found = None;
        for f in &self.files {
            for (_, info) in f.meta.tensors() {
                let d = match info.dtype {
                    StDtype::BF16 => DType::BF16,
                    StDtype::F16 => DType::F16,
                    StDtype::U8 => continue, // moe-run's packed quantized weights
                    _ => return None,
                };
                if found.is_some_and(|x| x != d) {
                    return None;
                }
                found = Some(d);
            }
        }
        found
    }

    /// Looks up `name`, checks that it is a float tensor of `shape`, marks it taken, and returns
    /// its on-disk dtype, file index and byte range.
    fn locate(&mut self, name: &str, shape: &[usize]) -> Result<(DType, usize, Range<usize>)> {
        let Some(&fi) = self.index.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                files: self.file_names(),
            });
        };
        let f = &self.files[fi];
        let Some(info) = f.meta.info(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                files: vec![f.name.clone()],
            });
        };
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            // moe-run's packed quantized weights (`*.qweight`).
            StDtype::U8 => DType::U8,
            other => {
                return Err(Error::TensorDtype {
                    name: name.to_string(),
                    file: f.name.clone(),
                    found: format!("{other:?}"),
                    expected: FLOAT_DTYPES,
                })
            }
        };
        if info.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                file: f.name.clone(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (s, e) = info.data_offsets;
        let range = f.data_start + s..f.data_start + e;
        self.taken.insert(name.to_string());
        if let Some(bar) = &self.progress {
            bar.inc((e - s) as u64);
        }
        Ok((dtype, fi, range))
    }

    /// Takes one tensor, converted to `dtype` on `device`.
    pub fn take(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (disk, fi, range) = self.locate(name, shape)?;
        self.check_int(name, disk, dtype)?;
        let t = Tensor::from_raw_buffer(&self.files[fi].bytes[range], disk, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Takes several tensors and returns them concatenated in order (as flat data) and shaped
    /// `out_shape`, with a single copy out of the files when they share a dtype. This is how
    /// the stacked `[E, N, K]` expert tensors and the fused q/k/v projection are built.
    pub fn take_concat(
        &mut self,
        parts: &[(String, Vec<usize>)],
        out_shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let total: usize = parts.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        if total != out_shape.iter().product::<usize>() {
            return Err(Error::Input(format!(
                "internal: the parts of {:?} do not fill {out_shape:?}",
                parts.first().map(|p| &p.0)
            )));
        }
        let locs = parts
            .iter()
            .map(|(n, shape)| self.locate(n, shape))
            .collect::<Result<Vec<_>>>()?;
        let disk = locs.first().map_or(dtype, |l| l.0);
        for (l, (n, _)) in locs.iter().zip(parts) {
            self.check_int(n, l.0, dtype)?;
        }
        let t = if locs.iter().all(|l| l.0 == disk) {
            let mut buf = Vec::with_capacity(total * disk.size_in_bytes());
            for (_, fi, range) in &locs {
                buf.extend_from_slice(&self.files[*fi].bytes[range.clone()]);
            }
            Tensor::from_raw_buffer(&buf, disk, out_shape, &Device::Cpu)?.to_dtype(dtype)?
        } else {
            // Mixed dtypes on disk (unusual): convert each part, then concatenate.
            let parts = locs
                .iter()
                .map(|(d, fi, range)| {
                    let n = range.len() / d.size_in_bytes();
                    Tensor::from_raw_buffer(
                        &self.files[*fi].bytes[range.clone()],
                        *d,
                        &[n],
                        &Device::Cpu,
                    )?
                    .to_dtype(dtype)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?.reshape(out_shape)?
        };
        Ok(t.to_device(device)?)
    }

    /// Packed u8 tensors are only ever read as u8, and float weights never as u8.
    fn check_int(&self, name: &str, disk: DType, want: DType) -> Result<()> {
        if (disk == DType::U8) != (want == DType::U8) {
            return Err(Error::TensorDtype {
                name: name.to_string(),
                file: self.files[self.index[name]].name.clone(),
                found: format!("{disk:?}"),
                expected: if want == DType::U8 {
                    "U8"
                } else {
                    FLOAT_DTYPES
                },
            });
        }
        Ok(())
    }

    /// Starts recording quantized weights (for `moe-run quantize`).
    pub fn record_quantization(&mut self) {
        self.quant_log = Some(QuantLog::default());
    }

    pub(crate) fn log_quantized(
        &mut self,
        parts: &[(String, Vec<usize>)],
        q: &crate::quant::QuantTensor,
    ) {
        if let Some(log) = &mut self.quant_log {
            log.weights.push((parts.to_vec(), q.clone()));
        }
    }

    pub(crate) fn log_replaced(&mut self, names: &[String]) {
        if let Some(log) = &mut self.quant_log {
            log.replaced.extend(names.iter().cloned());
        }
    }

    pub fn quant_log(&self) -> Option<&QuantLog> {
        self.quant_log.as_ref()
    }

    /// Names of the tensors taken so far.
    pub fn taken(&self) -> impl Iterator<Item = &str> {
        self.taken.iter().map(|s| s.as_str())
    }

    /// The stored dtype, shape and raw little-endian bytes of tensor `name`.
    pub fn raw(&self, name: &str) -> Option<(StDtype, Vec<usize>, &[u8])> {
        let f = &self.files[*self.index.get(name)?];
        let info = f.meta.info(name)?;
        let (s, e) = info.data_offsets;
        Some((
            info.dtype,
            info.shape.clone(),
            &f.bytes[f.data_start + s..f.data_start + e],
        ))
    }

    /// Fails on the first tensor that was never taken and is not `ignorable`.
    pub fn finish(self, family: &str, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        let mut extra: Vec<&String> = self
            .index
            .keys()
            .filter(|n| !self.taken.contains(*n) && !ignorable(n))
            .collect();
        extra.sort();
        match extra.first() {
            None => Ok(()),
            Some(name) => Err(Error::UnexpectedTensor {
                name: (*name).clone(),
                file: self.files[self.index[*name]].name.clone(),
                family: family.to_string(),
            }),
        }
    }
}

fn open_file(path: &Path) -> Result<StFile> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only and only read through this map; like every mmap-based
    // loader we rely on the checkpoint not being truncated by another process while it is open.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    parse_file(path.display().to_string(), Bytes::Mmap(mmap))
}

/// Validates the header of one safetensors buffer: header length, JSON, offsets, and that the
/// data section is exactly as long as the header says.
fn parse_file(name: String, bytes: Bytes) -> Result<StFile> {
    let bad = |msg: String| Error::Safetensors {
        path: PathBuf::from(&name),
        msg,
    };
    let len = bytes.len();
    if len < 8 {
        return Err(bad(format!(
            "file is {len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    let header_len = u64::from_le_bytes(len8);
    if header_len > (len - 8) as u64 {
        return Err(bad(format!(
            "header length {header_len} runs past the end of the file ({len} bytes): truncated or not safetensors"
        )));
    }
    let data_len = len - 8 - header_len as usize;
    let (n, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        // Name the tensor whose header entry lies, where we can find it.
        let header = bytes.get(8..8 + header_len as usize).unwrap_or_default();
        match diagnose_header(header, data_len) {
            Some(msg) => bad(msg),
            None if matches!(e, SafeTensorError::MetadataIncompleteBuffer) => bad(format!(
                "the header's tensor offsets do not cover the {data_len} data bytes exactly (truncated file or lying header)"
            )),
            None => bad(e.to_string()),
        }
    })?;
    Ok(StFile {
        name,
        bytes,
        data_start: 8 + n,
        meta,
    })
}

/// Finds the first tensor whose header entry is inconsistent with its dtype, shape or the data
/// section, for an error message that names it.
fn diagnose_header(header: &[u8], data_len: usize) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<(&String, &serde_json::Value)> = v
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .collect();
    let offs = |t: &serde_json::Value| -> Option<(u64, u64)> {
        let o = t.get("data_offsets")?.as_array()?;
        Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?))
    };
    entries.sort_by_key(|(_, t)| offs(t).unwrap_or((0, 0)));
    let mut expected_start = 0u64;
    for (name, t) in entries {
        let Some((s, e)) = offs(t) else {
            return Some(format!("tensor {name:?} has no valid data_offsets"));
        };
        if e > data_len as u64 {
            return Some(format!(
                "tensor {name:?}: data_offsets [{s}, {e}] run past the end of the data section ({data_len} bytes): truncated file or lying header"
            ));
        }
        let elem_bytes = match t.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => 1,
            _ => return None,
        };
        // Checked: a lying header may multiply its dims past u64.
        let need = t
            .get("shape")
            .and_then(|s| s.as_array())?
            .iter()
            .try_fold(elem_bytes, |acc: u64, d| {
                acc.checked_mul(d.as_u64().unwrap_or(0))
            });
        let Some(need) = need else {
            return Some(format!(
                "tensor {name:?}: its shape's element count overflows 64 bits"
            ));
        };
        if e < s || e - s != need {
            return Some(format!(
                "tensor {name:?}: data_offsets [{s}, {e}] span {} bytes but its dtype and shape need {need}",
                e.saturating_sub(s),
            ));
        }
        if s != expected_start {
            return Some(format!("tensor {name:?}: data_offsets start at {s}, expected {expected_start} (gap or overlap)"));
        }
        expected_start = e;
    }
    if expected_start != data_len as u64 {
        return Some(format!(
            "the tensors cover {expected_start} of the {data_len} data bytes (truncated file or lying header)"
        ));
    }
    None
}
