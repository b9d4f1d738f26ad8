//! Checkpoint loading: config.json + safetensors -> canonical [`ModelWeights`] -> [`Model`].
//! Each family's published tensor names (`config::naming`, chosen by the family table) are read
//! here into the canonical layout (stacked `[E, N, K]` experts); nothing downstream knows a
//! checkpoint's naming.

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

pub mod checkpoint;
pub mod embedded;
pub mod hub;
mod naming;
pub mod save;
pub mod source;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use checkpoint::Checkpoint;
pub use source::ModelRef;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{Model, ModelWeights};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype; weights stored as f32/f16/bf16 are converted to it (but see `weight_dtype`).
    pub dtype: DType,
    /// `--weight-dtype`: the dtype of the linear and expert weights (the tensors `--quant` would
    /// quantize) when it differs from `dtype`: bf16/f16 weights read in place by the CPU kernels
    /// under f32 compute, as llama.cpp runs a bf16 GGUF. `None`: `dtype`. Dense models only.
    pub weight_dtype: Option<DType>,
    /// Hybrid placement (`spec::placement::Plan::per_layer`): per decoder layer, which routed
    /// experts live on `device`; the others are loaded into host memory and run on the CPU
    /// kernels. `None`: everything on `device`.
    pub placement: Option<Vec<Option<Vec<bool>>>>,
    pub device: Device,
    /// Show a progress bar (only ever drawn when stderr is a terminal).
    pub progress: bool,
    /// Weight-only quantization of the linear weights (`--quant`): applied while loading a
    /// dense checkpoint; a checkpoint saved quantized by moe-run must match it (or leave `None`).
    pub quant: Option<crate::quant::QFormat>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            weight_dtype: None,
            placement: None,
            device: Device::Cpu,
            progress: false,
            quant: None,
        }
    }
}

/// Where a model comes from: a directory (given, or found in the HF cache) or the binary.
pub enum ModelSource {
    Dir(PathBuf),
    Embedded(&'static embedded::Embedded),
}

impl ModelSource {
    /// `--weights DIR` wins; `--model tiny-kjv` or no model at all is the embedded model; any
    /// other `--model NAME` is the local Hugging Face cache's snapshot, else downloaded ([`ModelRef`]).
    pub fn resolve(model: Option<&str>, weights: Option<&Path>) -> Result<Self> {
        Self::resolve_at(model, weights, None)
    }

    /// [`ModelSource::resolve`] at `--revision` (a Hub model's branch, tag or commit).
    pub fn resolve_at(
        model: Option<&str>,
        weights: Option<&Path>,
        revision: Option<&str>,
    ) -> Result<Self> {
        ModelRef::resolve(model, weights, None)
            .unwrap_or(ModelRef::Embedded(&embedded::TINY_KJV))
            .source_at(revision)
    }

    pub fn load(&self, opts: &LoadOptions) -> Result<Model> {
        match self {
            ModelSource::Dir(dir) => load_dir(dir, opts),
            ModelSource::Embedded(e) => e.load(opts),
        }
    }

    /// The model's config.
    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::Dir(dir) => ModelConfig::from_file(&dir.join("config.json")),
            ModelSource::Embedded(e) => e.config(),
        }
    }

    /// [`Checkpoint::half_dtype`] of this model's checkpoint (headers only); `None` when they
    /// cannot be read (loading then names the problem).
    pub fn half_dtype(&self) -> Option<DType> {
        match self {
            ModelSource::Dir(dir) => Checkpoint::open_dir(dir).ok()?.half_dtype(),
            ModelSource::Embedded(e) => Checkpoint::from_static(e.name, e.safetensors)
                .ok()?
                .half_dtype(),
        }
    }

    /// The linears' dtype when `--weight-dtype` is not given: under `--dtype auto` on the CPU
    /// without `--quant`, a checkpoint stored in one 16-bit dtype keeps its linear and expert
    /// weights in it, read in place by the CPU kernels under f32 compute (half the memory and
    /// bytes per decoded token of widening them, the same values); otherwise the compute dtype.
    pub fn auto_weight_dtype(
        &self,
        dtype_arg: &str,
        device: &Device,
        quant: Option<crate::quant::QFormat>,
    ) -> Result<Option<DType>> {
        if dtype_arg != "auto" || !device.is_cpu() || quant.is_some() {
            return Ok(None);
        }
        Ok(self.half_dtype())
    }
}

/// Loads `DIR/config.json` and its safetensors checkpoint.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Model> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "weights directory not found"),
        ));
    }
    let config_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&config_path)?;
    let stored = stored_quantization(&config_path, &cfg)?;
    let ck = Checkpoint::open_dir(dir)?;
    load_checkpoint(cfg, ck, &with_stored_quant(opts, stored)?)
}

/// `opts` with the quantization a checkpoint was saved with (which `opts.quant` must not contradict).
pub(crate) fn with_stored_quant(
    opts: &LoadOptions,
    stored: Option<crate::quant::QFormat>,
) -> Result<LoadOptions> {
    let mut o = opts.clone();
    match (opts.quant, stored) {
        (Some(want), Some(have)) if want != have => {
            return Err(Error::Input(format!(
                "the checkpoint is stored quantized as {}; it cannot be loaded as {} (load it \
                 without --quant, or quantize the original checkpoint)",
                crate::quant::format_name(have),
                crate::quant::format_name(want)
            )))
        }
        (_, Some(have)) => o.quant = Some(have),
        _ => {}
    }
    Ok(o)
}

/// Config, canonical weights and the checkpoint they came from (all tensors taken), without
/// building the model: what `moe-run quantize` saves.
pub fn load_dir_weights(
    dir: &Path,
    opts: &LoadOptions,
    record: bool,
) -> Result<(ModelConfig, ModelWeights, Checkpoint)> {
    let config_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&config_path)?;
    let opts = with_stored_quant(opts, stored_quantization(&config_path, &cfg)?)?;
    let mut ck = Checkpoint::open_dir(dir)?;
    if record {
        ck.record_quantization();
    }
    let Some(names) = crate::config::family(&cfg.model_type).map(|f| f.naming) else {
        return Err(Error::UnsupportedModelType {
            path: config_path,
            model_type: cfg.model_type.clone(),
            supported: crate::config::supported_model_types(),
        });
    };
    let weights = naming::weights(&mut ck, &cfg, names, &opts)?;
    Ok((cfg, weights, ck))
}

/// Validates every tensor of `ck` against `cfg` (names, shapes, dtypes, nothing missing or extra)
/// and builds the model.
pub fn load_checkpoint(cfg: ModelConfig, mut ck: Checkpoint, opts: &LoadOptions) -> Result<Model> {
    if opts.progress && std::io::stderr().is_terminal() {
        ck.show_progress();
    }
    let Some(names) = crate::config::family(&cfg.model_type).map(|f| f.naming) else {
        return Err(Error::UnsupportedModelType {
            path: "config.json".into(),
            model_type: cfg.model_type.clone(),
            supported: crate::config::supported_model_types(),
        });
    };
    // Refuse before allocating anything when analyze's prediction of the weights does not fit in
    // the GPU's free memory or the available RAM (and explain a driver OOM the same way if one
    // happens anyway).
    let host = host_expert_bytes(&cfg, opts);
    let need = predicted_weight_bytes(&cfg, opts) - host;
    let what = format!("the weights of this {} model", cfg.model_type);
    crate::memory::check_device_fits(&opts.device, &what, need)?;
    if host > 0 && !opts.device.is_cpu() {
        crate::memory::check_device_fits(
            &Device::Cpu,
            "the routed experts placed in host memory",
            host,
        )?;
    }
    let oom = |e| crate::memory::explain_oom(e, &opts.device, &what, need);
    let weights: ModelWeights = naming::weights(&mut ck, &cfg, names, opts).map_err(oom)?;
    let unread = |n: &str| names.unread.iter().any(|p| n.starts_with(p));
    if ck.names().any(unread) {
        eprintln!(
            "{}: loaded the language model only (text in, text out); the checkpoint's tensors under {} (its vision tower) are not supported and were not read",
            cfg.model_type,
            names.unread.join(", ")
        );
    }
    ck.finish(&cfg.model_type, |name| ignorable(name, &cfg))?;
    let mut model =
        Model::new(cfg, weights, opts.dtype, &opts.device).map_err(|e| oom(e.into()))?;
    if let Some(p) = &opts.placement {
        model.place_experts(p).map_err(|e| oom(e.into()))?;
    }
    Ok(model)
}

/// The hybrid-placement flags of run, logits and bench.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlacementArgs<'a> {
    /// `--n-cpu-moe N`
    pub n_cpu_moe: Option<usize>,
    /// `--gpu-memory SIZE` (bytes)
    pub gpu_memory: Option<u64>,
    /// `--profile FILE`
    pub profile: Option<&'a Path>,
}

/// The placement the flags ask for on `device` ([`crate::spec::placement::plan`]), announced
/// on stderr; `None` without any of them. The budget: `--gpu-memory`, else the device's free
/// memory minus [`crate::spec::placement::SAFETY_MARGIN_BYTES`]; the CPU as the device has
/// none of its own (`--n-cpu-moe` / `--profile` split alone, which exercises the split path).
pub fn placement_for(
    cfg: &ModelConfig,
    precision: crate::spec::bytes::Precision,
    device: &Device,
    a: &PlacementArgs,
    context: u64,
    batch: u64,
) -> Result<Option<crate::spec::placement::Plan>> {
    use crate::spec::placement::{self, PlanRequest, RoutingProfile};
    if a.n_cpu_moe.is_none() && a.gpu_memory.is_none() && a.profile.is_none() {
        return Ok(None);
    }
    let profile = a.profile.map(RoutingProfile::read).transpose()?;
    let budget_bytes = match (a.gpu_memory, crate::memory::device_memory(device)) {
        (Some(b), _) => b,
        (None, Some((free, _))) => free.saturating_sub(placement::SAFETY_MARGIN_BYTES),
        (None, None) => u64::MAX / 4,
    };
    let plan = placement::plan(
        cfg,
        &PlanRequest {
            precision,
            budget_bytes,
            context,
            batch,
            n_cpu_moe: a.n_cpu_moe,
            profile: profile.as_ref(),
        },
    )?;
    eprintln!(
        "placement: {} of {} routed experts in host memory ({}), {} of routed experts on {}",
        plan.experts_on_cpu(),
        plan.experts_total(),
        crate::units::human_bytes(plan.host_expert_bytes),
        crate::units::human_bytes(plan.gpu_expert_bytes),
        if device.is_cpu() {
            "the device (the CPU)"
        } else {
            "the GPU"
        },
    );
    Ok(Some(plan))
}

/// Bytes of the routed experts `opts.placement` keeps in host memory (analyze's count).
pub fn host_expert_bytes(cfg: &ModelConfig, opts: &LoadOptions) -> u64 {
    use crate::spec::bytes::{expert_bytes, Precision};
    let Some(pl) = &opts.placement else { return 0 };
    let p = Precision::with_weights(opts.dtype, opts.weight_dtype, opts.quant);
    pl.iter()
        .enumerate()
        .filter_map(|(i, on)| on.as_ref().map(|on| (i, on)))
        .map(|(i, on)| on.iter().filter(|&&g| !g).count() as u64 * expert_bytes(cfg, i, p))
        .sum()
}

/// `moe-run analyze`'s weight bytes for the dtypes and quantization of `opts` (int4 at its group).
pub fn predicted_weight_bytes(cfg: &ModelConfig, opts: &LoadOptions) -> u64 {
    use crate::spec::bytes::{weight_bytes, Precision};
    let p = Precision::with_weights(opts.dtype, opts.weight_dtype, opts.quant);
    weight_bytes(&crate::spec::counts::tensor_inventory(cfg), p)
}

/// The quantization a checkpoint is stored with: `None` (dense), moe-run's own INT8/INT4, or an
/// error for checkpoints stored pre-quantized by their publisher (DeepSeek-V3's FP8 blocks with
/// `weight_scale_inv`, GPTQ/AWQ...), which need their own dequantization, not written yet.
pub(crate) fn stored_quantization(
    config_path: &Path,
    cfg: &ModelConfig,
) -> Result<Option<crate::quant::QFormat>> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: config_path.to_path_buf(),
        source,
    })?;
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    // Published MXFP4 experts (gpt-oss) are read per tensor (`ModelConfig::experts_mxfp4`, which
    // the family's parser set from this same field); nothing else of the checkpoint is quantized.
    if cfg.experts_mxfp4 && q.get("quant_method").and_then(|m| m.as_str()) == Some("mxfp4") {
        return Ok(None);
    }
    crate::quant::parse_quantization_config(q)
        .map(Some)
        .map_err(|method| {
            Error::config(
                config_path,
                format!(
                    "the checkpoint is stored quantized ({method}), which this build cannot load yet; use a bf16/f16/f32 \
                     export (for DeepSeek-V3, DeepSeek's fp8_cast_bf16.py converts it), or moe-run's own \
                     --quant int8|int4"
                ),
            )
        })
}

/// Fails on any checkpoint tensor `cfg` did not use (after [`load_dir_weights`]).
pub(crate) fn finish_checkpoint(ck: Checkpoint, cfg: &ModelConfig) -> Result<()> {
    ck.finish(&cfg.model_type, |name| ignorable(name, cfg))
}

/// Tensors we deliberately do not load: recomputed RoPE tables some exporters write, and
/// DeepSeek-V3's multi-token-prediction layers stored after the last decoder layer (used only
/// for speculative decoding; transformers skips them too), and the prefixes the family's naming
/// does not read (`Naming::unread`: a multimodal Llama-4's vision tower and projector).
fn ignorable(name: &str, cfg: &ModelConfig) -> bool {
    let extra_layer = name
        .strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .is_some_and(|i| i >= cfg.num_layers());
    let unread = crate::config::family(&cfg.model_type)
        .is_some_and(|f| f.naming.unread.iter().any(|p| name.starts_with(p)));
    name.ends_with("rotary_emb.inv_freq") || extra_layer || unread
}

/// CUDA device `ordinal` whose tensors do not track their uses with CUDA events: moe-run runs
/// every op on candle's one stream (so nothing needs them), and a CUDA graph capture cannot wait
/// on an event recorded before it began (`runtime::graph`).
fn cuda_device(ordinal: usize) -> candle_core::Result<Device> {
    let d = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        // SAFETY: nothing has been allocated on this device yet, and every tensor the engine
        // makes lives on its one stream, so no use needs an event to order it.
        unsafe { c.disable_event_tracking() };
    }
    Ok(d)
}

/// Parses `cpu` / `cuda[:N]`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        // The first GPU when this build has CUDA and a device answers, else the CPU.
        "auto" if cfg!(feature = "cuda") => Ok(cuda_device(0).unwrap_or(Device::Cpu)),
        "auto" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| Error::Input(format!("bad device {s:?}")))?,
                None => 0,
            };
            if cfg!(feature = "cuda") {
                Ok(cuda_device(ordinal)?)
            } else {
                Err(Error::Input(
                    "this moe-run was built without CUDA; rebuild with `cargo build --release --features cuda`".into(),
                ))
            }
        }
        s => Err(Error::Input(format!(
            "unknown device {s:?}; use auto, cpu or cuda[:N]"
        ))),
    }
}

/// Parses `f32|bf16|f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    parse_dtype_on(s, &Device::Cpu)
}

/// [`parse_dtype`], plus `auto`: f32 on the CPU (candle's CPU matmul has no bf16 kernel), bf16 on
/// a GPU (half the bytes per decoded token, and what checkpoints are published in).
pub fn parse_dtype_on(s: &str, device: &Device) -> Result<DType> {
    match s {
        "auto" if device.is_cpu() => Ok(DType::F32),
        "auto" => Ok(DType::BF16),
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::Input(format!(
            "unknown dtype {s:?}; use auto, f32, bf16 or f16"
        ))),
    }
}

/// `--weight-dtype` (`None` when not given): the [`LoadOptions::weight_dtype`] for compute `dtype`
/// on `device` with quantization `quant`. `None` back when it equals `dtype`. Refused: on a GPU, with
/// `--quant`, and under a compute dtype other than f32 (the CPU kernels read 16-bit weights under
/// f32 activations; candle's ops and the GPU kernels take one dtype).
pub fn parse_weight_dtype(
    s: Option<&str>,
    dtype: DType,
    device: &Device,
    quant: Option<crate::quant::QFormat>,
) -> Result<Option<DType>> {
    let Some(s) = s else { return Ok(None) };
    let w = parse_dtype(s).map_err(|_| {
        Error::Input(format!(
            "--weight-dtype {s:?}: unknown dtype; use f32, bf16 or f16"
        ))
    })?;
    if w == dtype {
        return Ok(None);
    }
    let why = if !device.is_cpu() {
        "only the CPU kernels read weights in a dtype other than the compute dtype"
    } else if quant.is_some() {
        "--quant already sets the format of those weights"
    } else if dtype != DType::F32 {
        "16-bit weights are read under f32 compute only (add --dtype f32)"
    } else {
        return Ok(Some(w));
    };
    Err(Error::Input(format!(
        "--weight-dtype {s} with --dtype {dtype:?}{}: {why}",
        quant.map_or(String::new(), |q| format!(
            " --quant {}",
            crate::quant::format_name(q)
        ))
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_dtype_rules() {
        let (cpu, f32_, bf16_) = (Device::Cpu, DType::F32, DType::BF16);
        assert_eq!(parse_weight_dtype(None, f32_, &cpu, None).unwrap(), None);
        assert_eq!(
            parse_weight_dtype(Some("f32"), f32_, &cpu, None).unwrap(),
            None
        );
        assert_eq!(
            parse_weight_dtype(Some("bf16"), bf16_, &cpu, None).unwrap(),
            None
        );
        assert_eq!(
            parse_weight_dtype(Some("bf16"), f32_, &cpu, None).unwrap(),
            Some(bf16_)
        );
        assert_eq!(
            parse_weight_dtype(Some("f16"), f32_, &cpu, None).unwrap(),
            Some(DType::F16)
        );
        for (s, dt, q, want) in [
            ("int8", f32_, None, "unknown dtype"),
            ("bf16", DType::F16, None, "--dtype f32"),
            (
                "bf16",
                f32_,
                Some(crate::quant::QFormat::Int8),
                "--quant already",
            ),
        ] {
            let e = parse_weight_dtype(Some(s), dt, &cpu, q)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--weight-dtype") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn dtype_names() {
        assert_eq!(parse_dtype_on("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(parse_dtype("bfloat16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("f16").unwrap(), DType::F16);
        let e = parse_dtype("fp8").unwrap_err().to_string();
        assert!(e.contains("auto, f32, bf16 or f16"), "{e}");
    }
}
