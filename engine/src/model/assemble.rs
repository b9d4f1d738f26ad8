//! The canonical weights of a model from the tensor spec ([`crate::spec::tensors`]): the loader
//! and random weights each say how to make one tensor, and this puts every tensor in its place
//! in [`ModelWeights`], checking its shape against the spec. So neither can build a tensor the
//! spec does not list, or miss one it does.

use std::collections::HashMap;

use candle_core::Tensor;

use super::moe::MoeWeights;
use super::{
    AttnWeights, FfnWeights, LayerWeights, MlaQueryWeights, MlaWeights, MlpWeights, ModelWeights,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::Weight;
use crate::spec::tensors::{tensors, Class, Role, TensorSpec};

/// Builds every weight of `cfg`, calling `make` once per stored tensor of the spec, in its order
/// (a tied lm_head is not made: it is the embedding).
pub fn build_weights(
    cfg: &ModelConfig,
    mut make: impl FnMut(&TensorSpec) -> Result<Weight>,
) -> Result<ModelWeights> {
    let mut global: HashMap<Role, Weight> = HashMap::new();
    let mut layers: Vec<HashMap<Role, Weight>> = vec![HashMap::new(); cfg.num_layers()];
    for t in tensors(cfg) {
        if t.class == Class::Tied {
            continue;
        }
        let w = make(&t)?;
        if w.dims() != t.shape.as_slice() {
            return Err(internal(format!(
                "{} of layer {:?} was made {:?}, the spec says {:?}",
                t.role.name(),
                t.layer,
                w.dims(),
                t.shape
            )));
        }
        let slot = match t.layer {
            None => Some(&mut global),
            Some(i) => layers.get_mut(i),
        };
        if let Some(slot) = slot {
            slot.insert(t.role, w);
        }
    }
    let mut g = Slots(global, None);
    let embed = g.tensor(Role::Embed)?;
    let lm_head = match g.opt(Role::LmHead) {
        Some(w) => dense(Role::LmHead, w)?,
        None => embed.clone(),
    };
    let final_norm = g.tensor(Role::FinalNorm)?;
    g.done()?;
    let layers = layers
        .into_iter()
        .enumerate()
        .map(|(i, m)| layer(Slots(m, Some(i))))
        .collect::<Result<Vec<_>>>()?;
    Ok(ModelWeights {
        embed,
        layers,
        final_norm,
        lm_head,
    })
}

fn internal(msg: String) -> Error {
    Error::Input(format!(
        "internal: the tensor spec and the model disagree: {msg}"
    ))
}

fn dense(role: Role, w: Weight) -> Result<Tensor> {
    match w {
        Weight::Dense(t) => Ok(t),
        Weight::Quant(_) => Err(internal(format!("{} must be dense", role.name()))),
    }
}

/// The tensors made for one layer (or the model-wide ones), taken out as they are placed.
struct Slots(HashMap<Role, Weight>, Option<usize>);

impl Slots {
    fn opt(&mut self, role: Role) -> Option<Weight> {
        self.0.remove(&role)
    }

    fn need(&mut self, role: Role) -> Result<Weight> {
        self.opt(role)
            .ok_or_else(|| internal(format!("no {} in layer {:?}", role.name(), self.1)))
    }

    fn tensor(&mut self, role: Role) -> Result<Tensor> {
        dense(role, self.need(role)?)
    }

    fn opt_tensor(&mut self, role: Role) -> Result<Option<Tensor>> {
        self.opt(role).map(|w| dense(role, w)).transpose()
    }

    /// Fails on a tensor the spec lists but the model has no place for.
    fn done(self) -> Result<()> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(r) => Err(internal(format!(
                "{} of layer {:?} has no place",
                r.name(),
                self.1
            ))),
        }
    }
}

fn layer(mut s: Slots) -> Result<LayerWeights> {
    let attn = match s.opt(Role::MlaKvA) {
        Some(kv_a) => AttnWeights::Mla(MlaWeights {
            q: match s.opt(Role::MlaQ) {
                Some(q) => MlaQueryWeights::Plain(q),
                None => MlaQueryWeights::LowRank {
                    a: s.need(Role::MlaQA)?,
                    norm: s.tensor(Role::MlaQANorm)?,
                    b: s.need(Role::MlaQB)?,
                },
            },
            kv_a,
            kv_a_norm: s.tensor(Role::MlaKvANorm)?,
            kv_b: s.need(Role::MlaKvB)?,
            o: s.need(Role::O)?,
        }),
        None => AttnWeights::Gqa {
            qkv: s.need(Role::Qkv)?,
            qkv_bias: s.opt_tensor(Role::QkvBias)?,
            q_norm: s.opt_tensor(Role::QNorm)?,
            k_norm: s.opt_tensor(Role::KNorm)?,
            o: s.need(Role::O)?,
            o_bias: s.opt_tensor(Role::OBias)?,
            sinks: s.opt_tensor(Role::Sinks)?,
        },
    };
    let ffn = match s.opt(Role::Router) {
        Some(router) => {
            let shared = match s.opt(Role::SharedGateUp) {
                Some(gate_up) => Some(MlpWeights {
                    gate_up,
                    down: s.need(Role::SharedDown)?,
                }),
                None => None,
            };
            FfnWeights::Moe(MoeWeights {
                router: dense(Role::Router, router)?,
                score_bias: s.opt_tensor(Role::ScoreBias)?,
                gate_up: s.need(Role::ExpertsGateUp)?,
                down: s.need(Role::ExpertsDown)?,
                shared,
                shared_gate: s.opt_tensor(Role::SharedGate)?,
                router_bias: s.opt_tensor(Role::RouterBias)?,
                gate_up_bias: s.opt_tensor(Role::ExpertsGateUpBias)?,
                down_bias: s.opt_tensor(Role::ExpertsDownBias)?,
            })
        }
        None => FfnWeights::Dense(MlpWeights {
            gate_up: s.need(Role::DenseGateUp)?,
            down: s.need(Role::DenseDown)?,
        }),
    };
    let l = LayerWeights {
        attn_norm: s.tensor(Role::AttnNorm)?,
        attn,
        ffn_norm: s.tensor(Role::FfnNorm)?,
        ffn,
    };
    s.done()?;
    Ok(l)
}

/// What `w` holds, in the spec's terms: (role, layer, shape, quantized) of every tensor, sorted
/// (a tied lm_head, which is the embedding, left out).
#[cfg(test)]
pub(crate) fn layout(w: &ModelWeights) -> Vec<(Role, Option<usize>, Vec<usize>, bool)> {
    let mut out = Vec::new();
    out.push((Role::Embed, None, w.embed.dims().to_vec(), false));
    for (i, l) in w.layers.iter().enumerate() {
        let l_ = Some(i);
        let mut ws: Vec<(Role, &Weight)> = Vec::new();
        let mut ts: Vec<(Role, &Tensor)> = vec![(Role::AttnNorm, &l.attn_norm)];
        match &l.attn {
            AttnWeights::Gqa {
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o,
                o_bias,
                sinks,
            } => {
                ws.extend([(Role::Qkv, qkv), (Role::O, o)]);
                for (r, x) in [
                    (Role::QkvBias, qkv_bias),
                    (Role::QNorm, q_norm),
                    (Role::KNorm, k_norm),
                    (Role::OBias, o_bias),
                    (Role::Sinks, sinks),
                ] {
                    ts.extend(x.iter().map(|x| (r, x)));
                }
            }
            AttnWeights::Mla(m) => {
                match &m.q {
                    MlaQueryWeights::Plain(q) => ws.push((Role::MlaQ, q)),
                    MlaQueryWeights::LowRank { a, norm, b } => {
                        ws.extend([(Role::MlaQA, a), (Role::MlaQB, b)]);
                        ts.push((Role::MlaQANorm, norm));
                    }
                }
                ws.extend([
                    (Role::MlaKvA, &m.kv_a),
                    (Role::MlaKvB, &m.kv_b),
                    (Role::O, &m.o),
                ]);
                ts.push((Role::MlaKvANorm, &m.kv_a_norm));
            }
        }
        ts.push((Role::FfnNorm, &l.ffn_norm));
        match &l.ffn {
            FfnWeights::Dense(m) => {
                ws.extend([(Role::DenseGateUp, &m.gate_up), (Role::DenseDown, &m.down)])
            }
            FfnWeights::Moe(m) => {
                ts.push((Role::Router, &m.router));
                ws.extend([
                    (Role::ExpertsGateUp, &m.gate_up),
                    (Role::ExpertsDown, &m.down),
                ]);
                ts.extend(m.shared_gate.iter().map(|x| (Role::SharedGate, x)));
                if let Some(s) = &m.shared {
                    ws.extend([
                        (Role::SharedGateUp, &s.gate_up),
                        (Role::SharedDown, &s.down),
                    ]);
                }
                ts.extend(m.score_bias.iter().map(|x| (Role::ScoreBias, x)));
                for (r, x) in [
                    (Role::RouterBias, &m.router_bias),
                    (Role::ExpertsGateUpBias, &m.gate_up_bias),
                    (Role::ExpertsDownBias, &m.down_bias),
                ] {
                    ts.extend(x.iter().map(|x| (r, x)));
                }
            }
        }
        let mut layer: Vec<_> = ws
            .into_iter()
            .map(|(r, x)| (r, l_, x.dims().to_vec(), matches!(x, Weight::Quant(_))))
            .chain(
                ts.into_iter()
                    .map(|(r, x)| (r, l_, x.dims().to_vec(), false)),
            )
            .collect();
        out.append(&mut layer);
    }
    out.push((Role::FinalNorm, None, w.final_norm.dims().to_vec(), false));
    if w.lm_head.id() != w.embed.id() {
        out.push((Role::LmHead, None, w.lm_head.dims().to_vec(), false));
    }
    out.sort();
    out
}

/// The spec of `cfg` as [`layout`] reports a built model: what random weights and the loader
/// must produce (`quant`: whether the tensors the format applies to are packed).
#[cfg(test)]
pub(crate) fn expected(
    cfg: &ModelConfig,
    quant: bool,
) -> Vec<(Role, Option<usize>, Vec<usize>, bool)> {
    use crate::spec::bytes::Storage;
    let mut v: Vec<_> = tensors(cfg)
        .into_iter()
        .filter(|t| t.class != Class::Tied)
        .map(|t| {
            let q = t.mxfp4 || (quant && t.storage() == Storage::Quantized);
            (t.role, t.layer, t.shape, q)
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tensors::every_config;

    fn small(cfg: &ModelConfig) -> bool {
        tensors(cfg).iter().map(TensorSpec::numel).sum::<u64>() < 4 << 20
    }

    #[test]
    fn every_spec_tensor_finds_its_place() {
        let mut n = 0;
        for (name, cfg) in every_config().iter().filter(|(_, c)| small(c)) {
            let w = build_weights(cfg, |t| {
                let z = Tensor::zeros(
                    t.shape.as_slice(),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )?;
                // Published MXFP4 experts are always held packed.
                Ok(match t.mxfp4 {
                    true => Weight::Quant(crate::quant::QuantTensor::quantize(
                        &z,
                        crate::quant::QFormat::Mxfp4,
                        &candle_core::Device::Cpu,
                    )?),
                    false => z.into(),
                })
            })
            .unwrap();
            assert_eq!(layout(&w), expected(cfg, false), "{name}");
            if cfg.tie_word_embeddings {
                assert_eq!(
                    w.lm_head.id(),
                    w.embed.id(),
                    "{name}: tied lm_head is the embedding"
                );
            }
            n += 1;
        }
        assert!(n >= 16, "only {n} configs");
    }

    #[test]
    fn a_tensor_of_the_wrong_shape_is_refused() {
        let (_, cfg) = every_config().into_iter().find(|(_, c)| small(c)).unwrap();
        let e = build_weights(&cfg, |t| {
            let mut shape = t.shape.clone();
            if t.role == Role::O {
                shape[0] += 1;
            }
            Ok(Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)?.into())
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("self_attn.o_proj") && e.contains("the spec says"),
            "{e}"
        );
    }
}
