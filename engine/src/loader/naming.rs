//! The one function that reads any family's published tensor names ([`Naming`], chosen by the
//! family table in `config`) into the canonical layout: fused q/k/v `[q+2kv, H]`, stacked experts
//! `gate_up [E, 2F, H]` (gate rows then up rows) and `down [E, H, F]`, dense MLPs as
//! `gate_up [2F, H]`, `down [H, F]`. Which optional tensors must exist (biases, QK-norms, shared
//! experts) follows the config.

use candle_core::{DType, Device, Tensor};

use super::{Checkpoint, LoadOptions};
use crate::config::naming::{AttnNames as Attn, ExpertNames as Experts, Naming};
use crate::config::{
    FfnKind, MlaConfig, ModelConfig, MoeConfig, QkNorm, RouterKind, SharedExperts,
};
use crate::error::{Error, Result};
use crate::model::moe::MoeWeights;
use crate::model::{
    AttnWeights, FfnWeights, LayerWeights, MlaQueryWeights, MlaWeights, MlpWeights, ModelWeights,
};
use crate::quant::{QuantTensor, Weight};

/// A linear weight `shape = [.., N, K]` made of `parts` (full `.weight` names, each `[rows, K]`,
/// stacked along rows). Three cases:
/// - stored quantized by moe-run (`{stem}.qweight` u8 + `{stem}.qparams` f16 per part, rows
///   split exactly like the dense parts): read as is, never re-quantized;
/// - `o.quant` set on a dense checkpoint: read in f32 on the host and quantized here, one
///   tensor at a time, so peak host memory stays near one layer beyond the result;
/// - otherwise dense in the compute dtype.
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
        return Ok(Weight::Dense(
            ck.take_concat(parts, shape, o.dtype, &o.device)?,
        ));
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
            params: ck.take_concat(&pparts, &ps, DType::F16, &o.device)?,
        }
    } else {
        let w = ck.take_concat(parts, shape, DType::F32, &Device::Cpu)?;
        QuantTensor::quantize(&w, fmt, &o.device)?
    };
    ck.log_quantized(parts, &q);
    Ok(Weight::Quant(q))
}

/// [`lin`] for a single tensor.
fn lin1(ck: &mut Checkpoint, name: &str, shape: &[usize], o: &LoadOptions) -> Result<Weight> {
    lin(ck, &[(name.to_string(), shape.to_vec())], shape, o)
}

/// Reads every weight `cfg` calls for under `names`, validating names, shapes and dtypes.
pub(super) fn weights(
    ck: &mut Checkpoint,
    cfg: &ModelConfig,
    names: &Naming,
    o: &LoadOptions,
) -> Result<ModelWeights> {
    let (h, v, dt) = (cfg.hidden_size, cfg.vocab_size, o.dtype);
    let embed = ck.take(names.embed, &[v, h], dt, &o.device)?;
    let mut layers = Vec::with_capacity(cfg.num_layers());
    for (i, kind) in cfg.layers.iter().enumerate() {
        let p = |n: &str| format!("{}{i}.{n}", names.layer_prefix);
        let attn = match cfg.mla {
            Some(m) => AttnWeights::Mla(mla(ck, &p, cfg, &m, o)?),
            None => gqa(ck, &p, cfg, names, o)?,
        };
        let ffn = match kind {
            FfnKind::Dense { intermediate } => {
                FfnWeights::Dense(mlp(ck, &p(names.dense), *intermediate, h, o)?)
            }
            FfnKind::Moe(m) => FfnWeights::Moe(moe(ck, &p, names, m, h, o)?),
        };
        layers.push(LayerWeights {
            attn_norm: ck.take(&p(names.attn_norm), &[h], dt, &o.device)?,
            attn,
            ffn_norm: ck.take(&p(names.ffn_norm), &[h], dt, &o.device)?,
            ffn,
        });
    }
    let final_norm = ck.take(names.final_norm, &[h], dt, &o.device)?;
    let lm_head = if cfg.tie_word_embeddings {
        if ck.contains(names.lm_head) {
            // Some exporters write the tied copy too; it must still have the right shape.
            ck.take(names.lm_head, &[v, h], dt, &o.device)?;
        }
        embed.clone()
    } else {
        ck.take(names.lm_head, &[v, h], dt, &o.device)?
    };
    Ok(ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

/// Grouped-query attention: q/k/v fused into one `[q + 2kv, H]` projection (+ bias), the
/// QK-norm weights the config calls for, and the output projection.
fn gqa(
    ck: &mut Checkpoint,
    p: &dyn Fn(&str) -> String,
    cfg: &ModelConfig,
    names: &Naming,
    o: &LoadOptions,
) -> Result<AttnWeights> {
    let (h, hd, dt) = (cfg.hidden_size, cfg.head_dim, o.dtype);
    let (q_out, kv_out) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let part = |n: &str, shape: &[usize]| (p(n), shape.to_vec());
    let (qkv, qkv_bias, o_name) = match names.attn {
        Attn::Separate { q, k, v, o: out } => {
            let w = |n: &str, rows| part(&format!("{n}.weight"), &[rows, h]);
            let qkv = lin(
                ck,
                &[w(q, q_out), w(k, kv_out), w(v, kv_out)],
                &[q_out + 2 * kv_out, h],
                o,
            )?;
            let bias = if cfg.attn.qkv_bias {
                let b = |n: &str, rows| part(&format!("{n}.bias"), &[rows]);
                Some(ck.take_concat(
                    &[b(q, q_out), b(k, kv_out), b(v, kv_out)],
                    &[q_out + 2 * kv_out],
                    dt,
                    &o.device,
                )?)
            } else {
                None
            };
            (qkv, bias, out)
        }
        Attn::Fused { qkv, o: out } => {
            if cfg.attn.qkv_bias {
                return Err(Error::config(
                    "config.json",
                    "this family has no q/k/v biases",
                ));
            }
            let w = lin1(
                ck,
                &p(&format!("{qkv}.weight")),
                &[q_out + 2 * kv_out, h],
                o,
            )?;
            (w, None, out)
        }
    };
    let (qn, kn) = match cfg.attn.qk_norm {
        QkNorm::None => (None, None),
        QkNorm::Whole => (Some(q_out), Some(kv_out)),
        QkNorm::PerHeadBeforeRope | QkNorm::PerHeadAfterRope => (Some(hd), Some(hd)),
    };
    let mut norm = |name: &str, len: Option<usize>| {
        len.map(|n| ck.take(&p(name), &[n], dt, &o.device))
            .transpose()
    };
    let q_norm = norm(names.q_norm, qn)?;
    let k_norm = norm(names.k_norm, kn)?;
    Ok(AttnWeights::Gqa {
        qkv,
        qkv_bias,
        q_norm,
        k_norm,
        o: lin1(ck, &p(&format!("{o_name}.weight")), &[h, q_out], o)?,
    })
}

/// DeepSeek multi-head latent attention, under the names every DeepSeek checkpoint uses.
fn mla(
    ck: &mut Checkpoint,
    p: &dyn Fn(&str) -> String,
    cfg: &ModelConfig,
    m: &MlaConfig,
    o: &LoadOptions,
) -> Result<MlaWeights> {
    let (h, nh, dt) = (cfg.hidden_size, cfg.num_heads, o.dtype);
    let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    let q = match m.q_lora_rank {
        None => MlaQueryWeights::Plain(lin1(ck, &p("self_attn.q_proj.weight"), &[nh * qk, h], o)?),
        Some(r) => MlaQueryWeights::LowRank {
            a: lin1(ck, &p("self_attn.q_a_proj.weight"), &[r, h], o)?,
            norm: ck.take(&p("self_attn.q_a_layernorm.weight"), &[r], dt, &o.device)?,
            b: lin1(ck, &p("self_attn.q_b_proj.weight"), &[nh * qk, r], o)?,
        },
    };
    let r = m.kv_lora_rank;
    let mut w = |name: &str, shape: &[usize]| lin1(ck, &p(name), shape, o);
    let kv_a = w(
        "self_attn.kv_a_proj_with_mqa.weight",
        &[r + m.qk_rope_head_dim, h],
    )?;
    let out = w("self_attn.o_proj.weight", &[h, nh * m.v_head_dim])?;
    // kv_b_proj stays dense in the compute dtype under int8/int4 (like norms and routers; see
    // `analysis::bytes::storage`): the absorbed decode multiplies by it per head on both sides,
    // which the quantized layout cannot do, so one dense copy serves both MLA paths. A checkpoint
    // that stores it quantized is still read as stored (the model dequantizes it once).
    let kv_b_name = p("self_attn.kv_b_proj.weight");
    let kv_b_shape = [nh * (m.qk_nope_head_dim + m.v_head_dim), r];
    let stem = kv_b_name.strip_suffix(".weight").unwrap_or(&kv_b_name);
    let kv_b = if o.quant.is_some() && ck.contains(&format!("{stem}.qweight")) {
        lin1(ck, &kv_b_name, &kv_b_shape, o)?
    } else {
        Weight::Dense(ck.take(&kv_b_name, &kv_b_shape, dt, &o.device)?)
    };
    Ok(MlaWeights {
        q,
        kv_a,
        kv_a_norm: ck.take(&p("self_attn.kv_a_layernorm.weight"), &[r], dt, &o.device)?,
        kv_b,
        o: out,
    })
}

/// A dense SwiGLU MLP `{prefix}.{gate,up,down}_proj` of width `f`.
fn mlp(
    ck: &mut Checkpoint,
    prefix: &str,
    f: usize,
    h: usize,
    o: &LoadOptions,
) -> Result<MlpWeights> {
    let parts = [
        (format!("{prefix}.gate_proj.weight"), vec![f, h]),
        (format!("{prefix}.up_proj.weight"), vec![f, h]),
    ];
    Ok(MlpWeights {
        gate_up: lin(ck, &parts, &[2 * f, h], o)?,
        down: lin1(ck, &format!("{prefix}.down_proj.weight"), &[h, f], o)?,
    })
}

fn moe(
    ck: &mut Checkpoint,
    p: &dyn Fn(&str) -> String,
    names: &Naming,
    m: &MoeConfig,
    h: usize,
    o: &LoadOptions,
) -> Result<MoeWeights> {
    let (e, f, dt) = (m.num_experts, m.expert_ffn, o.dtype);
    let router_dtype = if m.router_f32 { DType::F32 } else { dt };
    let router = ck.take(&p(names.router), &[e, h], router_dtype, &o.device)?;
    let (gate_up, down) = match names.experts {
        Experts::PerExpert {
            prefix,
            gate,
            up,
            down,
        } => {
            let name = |x: usize, w: &str| p(&format!("{prefix}.{x}.{w}.weight"));
            let gu: Vec<_> = (0..e)
                .flat_map(|x| [(name(x, gate), vec![f, h]), (name(x, up), vec![f, h])])
                .collect();
            let dn: Vec<_> = (0..e).map(|x| (name(x, down), vec![h, f])).collect();
            (
                lin(ck, &gu, &[e, 2 * f, h], o)?,
                lin(ck, &dn, &[e, h, f], o)?,
            )
        }
        Experts::Fused { w1, v1, w2 } => {
            // Quantized: read in f32 on the host, quantize after the re-layout. moe-run's own
            // quantized DBRX checkpoints store w1/v1 per expert (`{w1}.{e}`, `[F, H]`; gate_up
            // interleaves them per expert) and w2 already transposed to the canonical `[E*H, F]`.
            let (ld, dev) = match o.quant {
                None => (dt, o.device.clone()),
                Some(_) => (DType::F32, Device::Cpu),
            };
            let take = |ck: &mut Checkpoint, n: &str| -> Result<Tensor> {
                Ok(ck.take(&p(n), &[e * f, h], ld, &dev)?.reshape((e, f, h))?)
            };
            let gparts: Vec<_> = (0..e)
                .flat_map(|x| {
                    [
                        (p(&format!("{w1}.{x}.weight")), vec![f, h]),
                        (p(&format!("{v1}.{x}.weight")), vec![f, h]),
                    ]
                })
                .collect();
            let dparts = [(p(&format!("{w2}.weight")), vec![e * h, f])];
            if o.quant.is_some() && ck.contains(&p(&format!("{w2}.qweight"))) {
                (
                    lin(ck, &gparts, &[e, 2 * f, h], o)?,
                    lin(ck, &dparts, &[e, h, f], o)?,
                )
            } else {
                let gate = take(ck, w1)?;
                let up = take(ck, v1)?;
                let down = take(ck, w2)?.transpose(1, 2)?.contiguous()?; // [E, H, F]
                let gate_up = Weight::new(Tensor::cat(&[gate, up], 1)?, o.quant, &o.device)?;
                let down = Weight::new(down, o.quant, &o.device)?;
                if let (Weight::Quant(gu), Weight::Quant(dn)) = (&gate_up, &down) {
                    ck.log_quantized(&gparts, gu);
                    ck.log_quantized(&dparts, dn);
                    ck.log_replaced(&[p(w1), p(v1), p(w2)]);
                }
                (gate_up, down)
            }
        }
    };
    let (shared, shared_gate) = match m.shared {
        None => (None, None),
        Some(SharedExperts { ffn, sigmoid_gate }) => {
            let gate = sigmoid_gate
                .then(|| ck.take(&p(names.shared_gate), &[1, h], dt, &o.device))
                .transpose()?;
            (Some(mlp(ck, &p(names.shared), ffn, h, o)?), gate)
        }
    };
    let score_bias = match m.router {
        RouterKind::SigmoidBiasGrouped { .. } => {
            Some(ck.take(&p(names.score_bias), &[e], DType::F32, &o.device)?)
        }
        _ => None,
    };
    Ok(MoeWeights {
        router,
        score_bias,
        gate_up,
        down,
        shared,
        shared_gate,
    })
}
