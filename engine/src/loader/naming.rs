//! Reads any family's published tensor names ([`Naming`], chosen by the family table in
//! `config`) into the canonical layout of the tensor spec ([`crate::spec::tensors`]): fused q/k/v
//! `[q+2kv, H]`, stacked experts `gate_up [E, 2F, H]` (gate rows then up rows) and
//! `down [E, H, F]`, dense MLPs as `gate_up [2F, H]`, `down [H, F]`. Which tensors must exist
//! (biases, QK-norms, shared experts...) and their shapes come from the spec alone: [`published`]
//! names the checkpoint tensors of each canonical one, [`tensor`] reads them.

use candle_core::{DType, Device, Tensor};

use super::{Checkpoint, LoadOptions};
use crate::config::naming::{AttnNames, ExpertNames, Naming};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::assemble::build_weights;
use crate::model::ModelWeights;
use crate::quant::{QuantTensor, Weight};
use crate::spec::bytes::Storage;
use crate::spec::tensors::{Role, TensorSpec};

/// A checkpoint tensor: full name and shape.
type Part = (String, Vec<usize>);

/// A linear weight `shape = [.., N, K]` made of `parts` (full `.weight` names, each `[rows, K]`,
/// stacked along rows). Three cases:
/// - stored quantized by moe-run (`{stem}.qweight` u8 + `{stem}.qparams` f16 per part, rows
///   split exactly like the dense parts): read as is, never re-quantized;
/// - `o.quant` set on a dense checkpoint: read in f32 on the host and quantized here, one
///   tensor at a time, so peak host memory stays near one layer beyond the result;
/// - otherwise dense in `o.weight_dtype` (`--weight-dtype`), else the compute dtype.
///
/// Quantized weights are recorded in `ck`'s quantization log when `moe-run quantize` asked for it.
fn lin(
    ck: &mut Checkpoint,
    parts: &[(String, Vec<usize>)],
    shape: &[usize],
    o: &LoadOptions,
) -> Result<Weight> {
    let stem = |n: &str| n.strip_suffix(".weight").unwrap_or(n).to_string();
    let Some(fmt) = o.quant else {
        let dt = o.weight_dtype.unwrap_or(o.dtype);
        return Ok(Weight::Dense(ck.take_concat(parts, shape, dt, &o.device)?));
    };
    let stored = parts
        .first()
        .is_some_and(|(n, _)| ck.contains(&format!("{}.qweight", stem(n))));
    let q = if stored {
        let split = |suffix: &str, f: &dyn Fn(&[usize]) -> Vec<usize>| {
            parts
                .iter()
                .map(|(n, s)| (format!("{}.{suffix}", stem(n)), f(s)))
                .collect::<Vec<_>>()
        };
        let qparts = split("qweight", &|s| QuantTensor::stored_shapes(fmt, s).0);
        let pparts = split("qparams", &|s| QuantTensor::stored_shapes(fmt, s).1);
        let (qs, ps) = QuantTensor::stored_shapes(fmt, shape);
        QuantTensor {
            fmt,
            shape: shape.to_vec(),
            qweight: ck.take_concat(&qparts, &qs, DType::U8, &o.device)?,
            params: ck.take_concat(&pparts, &ps, fmt.params_dtype(), &o.device)?,
        }
    } else {
        let w = ck.take_concat(parts, shape, DType::F32, &Device::Cpu)?;
        QuantTensor::quantize(&w, fmt, &o.device)?
    };
    ck.log_quantized(parts, &q);
    Ok(Weight::Quant(q))
}

/// Reads every weight `cfg` calls for under `names`, validating names, shapes and dtypes.
pub(super) fn weights(
    ck: &mut Checkpoint,
    cfg: &ModelConfig,
    names: &Naming,
    o: &LoadOptions,
) -> Result<ModelWeights> {
    let w = build_weights(cfg, |t| tensor(ck, names, t, o))?;
    if cfg.tie_word_embeddings && ck.contains(names.lm_head) {
        // Some exporters write the tied copy too; it must still have the right shape.
        let shape = [cfg.vocab_size, cfg.hidden_size];
        ck.take(names.lm_head, &shape, o.dtype, &o.device)?;
    }
    Ok(w)
}

/// `name` of `t`'s layer (`{layer_prefix}{i}.{name}`), or `name` itself for a model-wide tensor.
fn at(names: &Naming, t: &TensorSpec, name: &str) -> String {
    match t.layer {
        Some(i) => format!("{}{i}.{name}", names.layer_prefix),
        None => name.to_string(),
    }
}

/// The tensors of a dense (published) checkpoint that canonical tensor `t` is read from, under
/// `names`, in row order: one per part of `t` (q, k, v; gate, up), per expert for per-expert
/// names. DBRX's fused experts are `w1`, `v1` (gate_up) or `w2` (down), each `[E*F, H]`, which
/// [`dbrx_experts`] re-lays out.
fn published(names: &Naming, t: &TensorSpec) -> Result<Vec<Part>> {
    let p = |n: &str| at(names, t, n);
    let one = |n: String| vec![(n, t.shape.clone())];
    // Row blocks of a matrix `[rows, K]` (or of a vector) named `{stem}{suffix}`, one per part.
    let rows = |stems: &[String], suffix: &str| -> Vec<Part> {
        let k = (t.shape.len() > 1).then(|| t.dim(t.shape.len() - 1));
        stems
            .iter()
            .zip(&t.parts)
            .map(|(n, &r)| (format!("{n}{suffix}"), [r].into_iter().chain(k).collect()))
            .collect()
    };
    let mlp = |prefix: &str| {
        [
            p(&format!("{prefix}.gate_proj")),
            p(&format!("{prefix}.up_proj")),
        ]
    };
    let (e, h) = (t.dim(0), t.dim(t.shape.len().saturating_sub(1)));
    Ok(match t.role {
        Role::Embed => one(names.embed.to_string()),
        Role::FinalNorm => one(names.final_norm.to_string()),
        Role::LmHead => one(names.lm_head.to_string()),
        Role::AttnNorm => one(p(names.attn_norm)),
        Role::FfnNorm => one(p(names.ffn_norm)),
        Role::Qkv | Role::QkvBias => {
            let suffix = if t.role == Role::Qkv {
                ".weight"
            } else {
                ".bias"
            };
            match names.attn {
                AttnNames::Separate { q, k, v, .. } => rows(&[p(q), p(k), p(v)], suffix),
                AttnNames::Fused { .. } if t.role == Role::QkvBias => {
                    return Err(Error::config(
                        "config.json",
                        "this family has no q/k/v biases",
                    ))
                }
                AttnNames::Fused { qkv, .. } => one(p(&format!("{qkv}.weight"))),
            }
        }
        Role::QNorm => one(p(names.q_norm)),
        Role::KNorm => one(p(names.k_norm)),
        Role::O => match names.attn {
            AttnNames::Separate { o, .. } | AttnNames::Fused { o, .. } => {
                one(p(&format!("{o}.weight")))
            }
        },
        Role::MlaQ => one(p("self_attn.q_proj.weight")),
        Role::MlaQA => one(p("self_attn.q_a_proj.weight")),
        Role::MlaQANorm => one(p("self_attn.q_a_layernorm.weight")),
        Role::MlaQB => one(p("self_attn.q_b_proj.weight")),
        Role::MlaKvA => one(p("self_attn.kv_a_proj_with_mqa.weight")),
        Role::MlaKvANorm => one(p("self_attn.kv_a_layernorm.weight")),
        Role::MlaKvB => one(p("self_attn.kv_b_proj.weight")),
        Role::DenseGateUp => rows(&mlp(names.dense), ".weight"),
        Role::DenseDown => one(p(&format!("{}.down_proj.weight", names.dense))),
        Role::Router => one(p(names.router)),
        Role::ScoreBias => one(p(names.score_bias)),
        Role::RouterBias => one(p(names.router_bias)),
        Role::Sinks => one(p(names.sinks)),
        Role::OBias => match names.attn {
            AttnNames::Separate { o, .. } => one(p(&format!("{o}.bias"))),
            AttnNames::Fused { .. } => {
                return Err(Error::config(
                    "config.json",
                    "this family has no output-projection bias",
                ))
            }
        },
        Role::ExpertsGateUpBias | Role::ExpertsDownBias => match names.experts {
            ExpertNames::Stacked { gate_up, down, .. } => {
                let stem = if t.role == Role::ExpertsGateUpBias {
                    gate_up
                } else {
                    down
                };
                one(p(&format!("{stem}_bias")))
            }
            _ => {
                return Err(Error::config(
                    "config.json",
                    "expert biases are read only from stacked expert tensors",
                ))
            }
        },
        Role::SharedGate => one(p(names.shared_gate)),
        Role::SharedGateUp => rows(&mlp(names.shared), ".weight"),
        Role::SharedDown => one(p(&format!("{}.down_proj.weight", names.shared))),
        Role::ExpertsGateUp | Role::ExpertsDown => {
            let gate_up = t.role == Role::ExpertsGateUp;
            match names.experts {
                ExpertNames::PerExpert {
                    prefix,
                    gate,
                    up,
                    down,
                } => {
                    let matrix: Vec<usize> = t.shape.iter().skip(1).copied().collect();
                    let name = |x: usize, w: &str| p(&format!("{prefix}.{x}.{w}.weight"));
                    (0..e)
                        .flat_map(|x| match gate_up {
                            true => rows(&[name(x, gate), name(x, up)], ""),
                            false => vec![(name(x, down), matrix.clone())],
                        })
                        .collect()
                }
                ExpertNames::Stacked {
                    gate_up: gu, down, ..
                } => {
                    let (n, k) = (t.dim(1), t.dim(2));
                    let stem = p(if gate_up { gu } else { down });
                    match t.mxfp4 {
                        // As published in MXFP4: not transposed, [E, N, K/32] blocks of 16
                        // bytes and one exponent byte per block.
                        true => vec![
                            (format!("{stem}_blocks"), vec![e, n, k / 32, 16]),
                            (format!("{stem}_scales"), vec![e, n, k / 32]),
                        ],
                        // [E, H, 2F] and [E, F, H]: each canonical shape transposed.
                        false => vec![(stem, vec![e, k, n])],
                    }
                }
                ExpertNames::Fused { w1, v1, w2 } => {
                    // [E*F, H] each; H is the gate_up's input, the down's output.
                    let (ef, hh) = match gate_up {
                        true => (e * t.dim(1) / 2, h),
                        false => (e * t.dim(2), t.dim(1)),
                    };
                    let stems: &[&str] = if gate_up { &[w1, v1] } else { &[w2] };
                    stems.iter().map(|n| (p(n), vec![ef, hh])).collect()
                }
            }
        }
    })
}

/// Reads canonical tensor `t`: a linear the quantization formats apply to through [`lin`], any
/// other tensor dense (in f32 where the spec keeps it so).
fn tensor(ck: &mut Checkpoint, names: &Naming, t: &TensorSpec, o: &LoadOptions) -> Result<Weight> {
    let parts = published(names, t)?;
    // Under a hybrid placement the routed experts are read into host memory; the model then
    // copies the resident ones to the device (`Model::place_experts`).
    let host;
    let o = match (&o.placement, t.role) {
        (Some(_), Role::ExpertsGateUp | Role::ExpertsDown) => {
            host = LoadOptions {
                device: Device::Cpu,
                ..o.clone()
            };
            &host
        }
        _ => o,
    };
    if matches!(t.role, Role::ExpertsGateUp | Role::ExpertsDown) {
        match names.experts {
            ExpertNames::Fused { w1, v1, w2 } => {
                return dbrx_experts(ck, names, t, &parts, [w1, v1, w2], o)
            }
            ExpertNames::Stacked { interleaved, .. } => {
                return stacked_experts(ck, t, &parts, interleaved, o)
            }
            ExpertNames::PerExpert { .. } => {}
        }
    }
    // kv_b_proj stays dense in the compute dtype under int8/int4 (like norms and routers; see
    // `spec::bytes::storage`): the absorbed decode multiplies by it per head on both sides,
    // which the quantized layout cannot do, so one dense copy serves both MLA paths. A
    // checkpoint that stores it quantized is still read as stored (the model dequantizes it once).
    let stored_quantized = t.role == Role::MlaKvB
        && o.quant.is_some()
        && parts
            .first()
            .is_some_and(|(n, _)| ck.contains(&format!("{}.qweight", stem(n))));
    if t.storage() == Storage::Quantized || stored_quantized {
        return lin(ck, &parts, &t.shape, o);
    }
    let dt = if t.f32 { DType::F32 } else { o.dtype };
    let w = match parts.as_slice() {
        [(name, shape)] => ck.take(name, shape, dt, &o.device)?,
        _ => ck.take_concat(&parts, &t.shape, dt, &o.device)?,
    };
    // gpt-oss interleaves the gate and up columns of its expert biases like their weights.
    let interleaved = matches!(
        names.experts,
        ExpertNames::Stacked {
            interleaved: true,
            ..
        }
    );
    Ok(Weight::Dense(match t.role {
        Role::ExpertsGateUpBias if interleaved => deinterleave(&w, 1)?,
        _ => w,
    }))
}

fn stem(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// Llama-4's and gpt-oss's stacked, transposed experts (`parts` from [`published`]: one `[E,
/// K, N]` tensor) -> the canonical `[E, N, K]` (gpt-oss's interleaved gate/up rows
/// de-interleaved). Quantized: read in f32 on the host and quantized after the
/// transpose; moe-run's own quantized checkpoints store `{name}.qweight`/`.qparams` in the
/// canonical layout, read as stored.
fn stacked_experts(
    ck: &mut Checkpoint,
    t: &TensorSpec,
    parts: &[Part],
    interleaved: bool,
    o: &LoadOptions,
) -> Result<Weight> {
    if let [(blocks, bshape), (scales, sshape)] = parts {
        return mxfp4_experts(ck, t, [blocks, scales], [bshape, sshape], interleaved, o);
    }
    let [(name, shape)] = parts else {
        return Err(Error::Input(format!(
            "internal: stacked experts read from {} tensors",
            parts.len()
        )));
    };
    let qparts = vec![(name.clone(), t.shape.clone())];
    if o.quant.is_some() && ck.contains(&format!("{name}.qweight")) {
        return lin(ck, &qparts, &t.shape, o);
    }
    let (ld, dev) = match o.quant {
        None => (o.weight_dtype.unwrap_or(o.dtype), o.device.clone()),
        Some(_) => (DType::F32, Device::Cpu),
    };
    let mut w = ck
        .take(name, shape, ld, &dev)?
        .transpose(1, 2)?
        .contiguous()?;
    if interleaved && t.role == Role::ExpertsGateUp {
        w = deinterleave(&w, 1)?;
    }
    let w = Weight::new(w, o.quant, &o.device)?;
    if let Weight::Quant(q) = &w {
        ck.log_quantized(&qparts, q);
        ck.log_replaced(std::slice::from_ref(name));
    }
    Ok(w)
}

/// Published MXFP4 experts (gpt-oss: `blocks [E, N, K/32, 16]`, `scales [E, N, K/32]`, u8)
/// read as they are, into the MXFP4 format of the kernels (`qweight [E, N, K/2]`, `params [E, N,
/// K/32]`) without any 16-bit copy; gpt-oss's interleaved gate/up rows are reordered as whole
/// packed rows. Whatever `--quant` says, they stay MXFP4.
fn mxfp4_experts(
    ck: &mut Checkpoint,
    t: &TensorSpec,
    [blocks, scales]: [&String; 2],
    [bshape, sshape]: [&Vec<usize>; 2],
    interleaved: bool,
    o: &LoadOptions,
) -> Result<Weight> {
    let (e, n, k) = (t.dim(0), t.dim(1), t.dim(2));
    if !k.is_multiple_of(32) {
        return Err(Error::Input(format!(
            "{blocks}: MXFP4 needs the input width to be a multiple of 32, found {k}"
        )));
    }
    let mut qweight = ck
        .take(blocks, bshape, DType::U8, &o.device)?
        .reshape((e, n, k / 2))?;
    let mut params = ck.take(scales, sshape, DType::U8, &o.device)?;
    if interleaved && t.role == Role::ExpertsGateUp {
        qweight = deinterleave(&qweight, 1)?;
        params = deinterleave(&params, 1)?;
    }
    Ok(Weight::Quant(QuantTensor {
        fmt: crate::quant::QFormat::Mxfp4,
        shape: t.shape.clone(),
        qweight,
        params,
    }))
}

/// Rows (or columns) `0, 2, 4, ..` then `1, 3, 5, ..` of `w` along `dim`: gpt-oss's
/// interleaved gate/up into the canonical gate block, then the up block.
fn deinterleave(w: &Tensor, dim: usize) -> Result<Tensor> {
    let n = w.dim(dim)?;
    let order: Vec<u32> = (0..n as u32)
        .step_by(2)
        .chain((1..n as u32).step_by(2))
        .collect();
    let idx = Tensor::from_vec(order, n, w.device())?;
    Ok(w.index_select(&idx, dim)?)
}

/// DBRX's fused experts (`parts` from [`published`]) -> gate_up `[E, 2F, H]` (per expert: w1
/// rows, then v1 rows) or down `[E, H, F]` (w2 transposed per expert). Quantized: read in f32 on
/// the host, quantized after the re-layout. moe-run's own quantized DBRX checkpoints (told by
/// `w2.qweight`) store w1/v1 per expert (`{w1}.{e}`, `[F, H]`) and w2 already transposed to the
/// canonical `[E*H, F]`.
fn dbrx_experts(
    ck: &mut Checkpoint,
    names: &Naming,
    t: &TensorSpec,
    parts: &[Part],
    [w1, v1, w2]: [&str; 3],
    o: &LoadOptions,
) -> Result<Weight> {
    let p = |n: &str| at(names, t, n);
    let (e, n, k) = (t.dim(0), t.dim(1), t.dim(2));
    let gate_up = t.role == Role::ExpertsGateUp;
    let stored_quantized = o.quant.is_some() && ck.contains(&p(&format!("{w2}.qweight")));
    let qparts: Vec<Part> = match gate_up {
        true => (0..e)
            .flat_map(|x| [w1, v1].map(|w| (p(&format!("{w}.{x}.weight")), vec![n / 2, k])))
            .collect(),
        false => vec![(p(&format!("{w2}.weight")), vec![e * n, k])],
    };
    if stored_quantized {
        return lin(ck, &qparts, &t.shape, o);
    }
    let (ld, dev) = match o.quant {
        None => (o.weight_dtype.unwrap_or(o.dtype), o.device.clone()),
        Some(_) => (DType::F32, Device::Cpu),
    };
    let mut take = |(name, shape): &Part, rows: usize, cols: usize| -> Result<Tensor> {
        Ok(ck.take(name, shape, ld, &dev)?.reshape((e, rows, cols))?)
    };
    let w = match (parts, gate_up) {
        ([a, b], true) => {
            let (gate, up) = (take(a, n / 2, k)?, take(b, n / 2, k)?);
            Tensor::cat(&[gate, up], 1)?
        }
        ([d], false) => take(d, k, n)?.transpose(1, 2)?.contiguous()?,
        _ => {
            return Err(Error::Input(format!(
                "internal: DBRX experts read from {} tensors",
                parts.len()
            )))
        }
    };
    let w = Weight::new(w, o.quant, &o.device)?;
    if let Weight::Quant(q) = &w {
        ck.log_quantized(&qparts, q);
        ck.log_replaced(&parts.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::assemble::{expected, layout};
    use crate::spec::tensors::{every_config, tensors, Class};

    fn fixtures() -> Vec<std::path::PathBuf> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut v: Vec<_> = std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("config.json").exists())
            .collect();
        v.sort();
        v
    }

    fn naming_of(cfg: &ModelConfig) -> &'static Naming {
        crate::config::family(&cfg.model_type).unwrap().naming
    }

    /// Every published tensor the loader asks for, from the spec.
    fn expected_checkpoint(cfg: &ModelConfig) -> Vec<Part> {
        let names = naming_of(cfg);
        let mut v: Vec<Part> = tensors(cfg)
            .iter()
            .filter(|t| t.class != Class::Tied)
            .flat_map(|t| published(names, t).unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_spec_names_every_tensor_of_each_fixture_checkpoint() {
        let dirs = fixtures();
        assert!(dirs.len() >= 16);
        let mut checkpoints: Vec<(String, ModelConfig, Checkpoint)> = dirs
            .iter()
            .map(|d| {
                let cfg = ModelConfig::from_file(&d.join("config.json")).unwrap();
                (
                    d.display().to_string(),
                    cfg,
                    Checkpoint::open_dir(d).unwrap(),
                )
            })
            .collect();
        let kjv = &super::super::embedded::TINY_KJV;
        let ck = Checkpoint::from_static(kjv.name, kjv.safetensors).unwrap();
        checkpoints.push((kjv.name.into(), kjv.config().unwrap(), ck));
        for (name, cfg, ck) in checkpoints {
            let mut on_disk: Vec<Part> = ck
                .names()
                .filter(|n| !super::super::ignorable(n, &cfg))
                .filter(|n| !(cfg.tie_word_embeddings && *n == naming_of(&cfg).lm_head))
                .map(|n| (n.to_string(), ck.raw(n).unwrap().1))
                .collect();
            on_disk.sort();
            assert_eq!(expected_checkpoint(&cfg), on_disk, "{name}");
        }
    }

    #[test]
    fn published_parts_fill_each_tensor_for_every_config() {
        for (name, cfg) in every_config() {
            let names = naming_of(&cfg);
            for t in tensors(&cfg).iter().filter(|t| t.class != Class::Tied) {
                let parts = published(names, t).unwrap();
                let n: Vec<u64> = parts
                    .iter()
                    .map(|(_, s)| s.iter().map(|&d| d as u64).product::<u64>())
                    .collect();
                match t.mxfp4 {
                    // Published MXFP4: a byte per two weights, an exponent byte per 32.
                    true => assert_eq!(n, [t.numel() / 2, t.numel() / 32], "{name}: {t:?}"),
                    false => assert_eq!(n.iter().sum::<u64>(), t.numel(), "{name}: {t:?}"),
                }
            }
            let all = expected_checkpoint(&cfg);
            let mut unique: Vec<_> = all.iter().map(|(n, _)| n).collect();
            unique.dedup();
            assert_eq!(unique.len(), all.len(), "{name}: a name read twice");
        }
    }

    #[test]
    fn loaded_weights_are_the_spec() {
        for dir in fixtures() {
            for quant in [None, Some(crate::quant::QFormat::Int8)] {
                let o = LoadOptions {
                    quant,
                    ..LoadOptions::default()
                };
                let (cfg, w, _) = super::super::load_dir_weights(&dir, &o, false).unwrap();
                assert_eq!(
                    layout(&w),
                    expected(&cfg, quant.is_some()),
                    "{} {quant:?}",
                    dir.display()
                );
            }
        }
    }
}
