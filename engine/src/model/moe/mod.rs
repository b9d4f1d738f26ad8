//! A sparse MoE block as four stages, each a function with its own tests:
//! route (router logits -> top-k ids + weights), dispatch (group token slots by expert),
//! experts (per-expert SwiGLU MLP over its tokens), combine (weighted sum back per token).
//! Legend: N = B*T tokens, E experts, A = top-k, H hidden, F expert width.

pub mod combine;
pub mod dispatch;
pub mod experts;
pub mod route;

use candle_core::{DType, Result, Tensor};
use moe_kernels::{moe_combine_add, moe_dispatch, moe_experts, moe_route, qmatmul_moe};

pub use combine::combine;
pub use dispatch::{dispatch, Dispatch};
pub use experts::experts;
pub use route::{route, Routing};

use super::{Linear, MlpWeights, PathPlan, Weight};
use crate::config::MoeConfig;

/// Canonical expert weights: stacked `[E, N, K]` (experts, out, in) per projection.
pub struct MoeWeights {
    /// `[E, H]` (kept in f32 when the config says `router_f32`).
    pub router: Tensor,
    /// `[E, 2F, H]`: rows 0..F are the gate (w1), rows F..2F are up (w3).
    pub gate_up: Weight,
    /// `[E, H, F]`
    pub down: Weight,
    /// The selection-only correction bias `[E]` of sigmoid routers (f32).
    pub score_bias: Option<Tensor>,
    /// Always-on shared experts (one MLP) and, for sigmoid gating, the gate `[1, H]`.
    pub shared: Option<MlpWeights>,
    pub shared_gate: Option<Tensor>,
    /// gpt-oss: the router's bias `[E]` and the experts' `[E, 2F]` (gate rows, then up) and
    /// `[E, H]`.
    pub router_bias: Option<Tensor>,
    pub gate_up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
}

pub struct MoeBlock {
    pub cfg: MoeConfig,
    pub router: Linear,
    pub gate_up: Weight,
    pub down: Weight,
    pub shared: Option<Mlp>,
    pub shared_gate: Option<Linear>,
    /// `score_bias` on the host, for the candle path's host routing...
    pub score_bias: Option<Vec<f32>>,
    /// ...and on the device (f32 `[E]`), for the router kernel.
    pub score_bias_dev: Option<Tensor>,
    /// Hybrid placement: the routed experts kept in host memory and run by the CPU kernels
    /// (`gate_up`/`down` then hold only the resident ones, in [`HostExperts::resident`] order).
    pub host: Option<HostExperts>,
    /// gpt-oss: the experts' biases `[E, 2F]` (gate, then up) and `[E, H]`...
    pub gate_up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
    /// ...and the same in f32 on the host, for the CPU expert kernels.
    bias_host: (Option<Vec<f32>>, Option<Vec<f32>>),
}

/// A MoE layer's routed experts split between the model's device and host memory
/// ([`MoeBlock::place`]).
pub struct HostExperts {
    /// Global ids of the experts on the device: `MoeBlock::gate_up[i]` is expert `resident[i]`.
    pub resident: Vec<usize>,
    /// Global ids of the experts in host memory: `gate_up[i]` here is expert `host[i]`.
    pub host: Vec<usize>,
    /// `[E_host, 2F, H]` and `[E_host, H, F]` on the CPU, in the format they were loaded in.
    pub gate_up: Weight,
    pub down: Weight,
    /// gpt-oss: every expert's biases (indexed by global id), copied to the CPU.
    pub gate_up_bias: Option<Tensor>,
    pub down_bias: Option<Tensor>,
}

/// The routing of one forward pass as the kernels leave it, on the model's device: `ids [N, A]` u32 and
/// `weights [N, A]` f32. Reading it to the host is a device-to-host copy (`model::host`), done only when
/// routing statistics are asked for.
#[derive(Debug, Clone)]
pub struct DeviceRouting {
    pub ids: Tensor,
    pub weights: Tensor,
}

impl DeviceRouting {
    /// The routing on the host (two counted device-to-host reads).
    pub fn to_host(&self) -> Result<Routing> {
        Ok(Routing {
            top_k: self.ids.dim(1)?,
            ids: crate::model::host::read_vec(&self.ids)?,
            weights: crate::model::host::read_vec(&self.weights)?,
        })
    }
}

impl MoeBlock {
    pub fn new(cfg: MoeConfig, w: MoeWeights) -> Result<Self> {
        let score_bias_dev =
            match (w.score_bias, cfg.router) {
                (Some(b), _) => Some(b.to_dtype(DType::F32)?),
                // A sigmoid router without a checkpoint bias (Llama-4) selects on the scores alone.
                (None, crate::config::RouterKind::SigmoidBiasGrouped { .. }) => Some(
                    Tensor::zeros(cfg.num_experts, DType::F32, w.router.device())?,
                ),
                (None, _) => None,
            };
        let score_bias = score_bias_dev
            .as_ref()
            .map(|b| b.to_vec1::<f32>())
            .transpose()?;
        Ok(MoeBlock {
            cfg,
            router: Linear::with_bias(w.router, w.router_bias),
            gate_up: w.gate_up,
            down: w.down,
            shared: w.shared.map(Mlp::new),
            shared_gate: w.shared_gate.map(Linear::new),
            bias_host: (host_f32(&w.gate_up_bias)?, host_f32(&w.down_bias)?),
            gate_up_bias: w.gate_up_bias,
            down_bias: w.down_bias,
            score_bias,
            score_bias_dev,
            host: None,
        })
    }

    /// Splits the routed experts: `on_device[e]` stays on `device` (copied there if it is not),
    /// the rest move to host memory, run by the CPU kernels. Once per block.
    pub fn place(&mut self, on_device: &[bool], device: &candle_core::Device) -> Result<()> {
        if self.host.is_some() || on_device.len() != self.cfg.num_experts {
            candle_core::bail!(
                "expert placement: {} flags for {} experts (or placed twice)",
                on_device.len(),
                self.cfg.num_experts
            );
        }
        let (resident, host): (Vec<usize>, Vec<usize>) =
            (0..on_device.len()).partition(|&e| on_device[e]);
        if host.is_empty() {
            // Nothing stays on the host: the experts move to the device (where a placed load
            // read them into host memory) and the layer runs unsplit.
            if !self.gate_up.device().same_device(device) {
                self.gate_up = self.gate_up.select_experts(&resident, device)?;
                self.down = self.down.select_experts(&resident, device)?;
            }
            return Ok(());
        }
        let cpu = candle_core::Device::Cpu;
        let on_cpu = |b: &Option<Tensor>| b.as_ref().map(|b| b.to_device(&cpu)).transpose();
        let h = HostExperts {
            gate_up: self.gate_up.select_experts(&host, &cpu)?,
            down: self.down.select_experts(&host, &cpu)?,
            gate_up_bias: on_cpu(&self.gate_up_bias)?,
            down_bias: on_cpu(&self.down_bias)?,
            resident,
            host,
        };
        self.gate_up = self.gate_up.select_experts(&h.resident, device)?;
        self.down = self.down.select_experts(&h.resident, device)?;
        self.host = Some(h);
        Ok(())
    }

    /// The experts' activation and biases beyond plain SwiGLU.
    pub fn extras(&self) -> experts::ExpertExtras<'_> {
        experts::ExpertExtras {
            act: self.cfg.act,
            gate_up_bias: self.gate_up_bias.as_ref(),
            down_bias: self.down_bias.as_ref(),
            experts: None,
            host_biases: (self.bias_host.0.as_deref(), self.bias_host.1.as_deref()),
        }
    }

    /// Bytes of weights in memory (router, experts, shared experts).
    pub fn bytes(&self) -> usize {
        let bias = |b: &Option<Tensor>| b.as_ref().map_or(0, super::tensor_bytes);
        bias(&self.gate_up_bias)
            + bias(&self.down_bias)
            + self.router.bytes()
            + self.gate_up.bytes()
            + self.down.bytes()
            + self.shared.as_ref().map_or(0, Mlp::bytes)
            + self
                .host
                .as_ref()
                .map_or(0, |h| h.gate_up.bytes() + h.down.bytes())
            + self.shared_gate.as_ref().map_or(0, Linear::bytes)
            + self.score_bias.as_ref().map_or(0, |b| 4 * b.len())
    }

    /// `x [B, T, H] -> ([B, T, H], routing)` through `path`: [`ExecPath::Kernels`] keeps routing and
    /// dispatch on the device (moe_route -> moe_dispatch -> moe_experts or qmatmul_moe -> moe_combine, no
    /// device-to-host copy); [`ExecPath::Candle`] routes on the host and runs one candle matmul per active
    /// expert (faster on the CPU, where the kernels' references are single-threaded).
    pub fn forward(&self, x: &Tensor, plan: &PathPlan) -> Result<(Tensor, DeviceRouting)> {
        let shape = x.shape().clone();
        let h = x.dim(candle_core::D::Minus1)?;
        let x = x.reshape(((), h))?; // [N, H]
                                     // Router logits [N, E] in the activation dtype as transformers computes them, or in f32
                                     // for families that keep the router in f32.
        let logits = if self.cfg.router_f32 {
            self.router.forward_on(&x.to_dtype(DType::F32)?, plan)?
        } else {
            self.router.forward_on(&x, plan)?
        };
        // Beyond the router kernel's limits (E > 256, k > 8, > 32 groups) the block routes on
        // the host instead: one device-to-host read per layer rather than an error.
        // A layer with experts in host memory routes on the device too; it then reads the
        // dispatch to the host (one device-to-host read per placed layer).
        // So do experts the fused kernels do not compute (gpt-oss's biases and clamped
        // activation): they run per expert with candle's ops, on whatever device.
        // (Quantized ones, gpt-oss's published MXFP4 among them, stay on the device: two grouped
        // quantized matmuls with the biases and the activation between them.)
        let on_device = self.routes_on_device(plan);
        // The shared experts' output: folded into the combine kernel on the device path, added
        // after the routed experts on the host one.
        let shared = match &self.shared {
            None => None,
            Some(shared) => {
                let s = shared.forward(&x, plan)?;
                Some(match &self.shared_gate {
                    Some(g) => {
                        s.broadcast_mul(&candle_nn::ops::sigmoid(&g.forward_on(&x, plan)?)?)?
                    }
                    None => s,
                })
            }
        };
        let (out, routing) = if on_device {
            self.routed_kernels(&x, &logits, plan, shared.as_ref())?
        } else {
            let (out, routing) = self.routed_candle(&x, &logits, plan)?;
            match shared {
                Some(s) => ((out + s)?, routing),
                None => (out, routing),
            }
        };
        Ok((out.reshape(shape)?, routing))
    }

    /// Whether this block routes and dispatches on the device ([`ExecPath::Kernels`]'s routed
    /// kernels) rather than on the host (see [`MoeBlock::forward`]).
    fn routes_on_device(&self, plan: &PathPlan) -> bool {
        plan.route_on_device(self.cfg.router, self.cfg.num_experts, self.cfg.top_k)
            && (self.extras().plain() || matches!(self.gate_up, Weight::Quant(_)))
    }

    /// Why this block's decode step reads back to the host (so no CUDA graph can replay it), or
    /// `None`.
    pub fn graph_blocker(&self, plan: &PathPlan) -> Option<String> {
        if self.host.is_some() {
            return Some("experts in host memory (a host round trip per step)".into());
        }
        if !self.routes_on_device(plan) {
            return Some("routing is read back to the host".into());
        }
        None
    }

    /// The routed experts through the moe-kernels ops; nothing leaves the device. `x [N, H]`;
    /// `shared [N, H]` is added inside the combine kernel.
    fn routed_kernels(
        &self,
        x: &Tensor,
        logits: &Tensor,
        plan: &PathPlan,
        shared: Option<&Tensor>,
    ) -> Result<(Tensor, DeviceRouting)> {
        let (a, e) = (self.cfg.top_k, self.cfg.num_experts);
        let router = self.cfg.router;
        let (ids, weights) = moe_route(logits, router, a, self.score_bias_dev.as_ref())?;
        let d = moe_dispatch(&ids, a, e, 1)?;
        // Llama-4 (top-1): the score scales the expert's input, the output is taken as is.
        let (x, mix) = match self.cfg.scale_input {
            true => (
                &x.broadcast_mul(&weights.to_dtype(x.dtype())?)?,
                weights.ones_like()?,
            ),
            false => (x, weights.clone()),
        };
        // GEMV for decode, tiled GEMM for prefill, chosen on the host from N (no sync).
        let experts = (&self.gate_up, &self.down);
        let path = Some(plan.experts_path(x.dim(0)?, a, e, experts, x.dtype()));
        let y = match &self.host {
            None => kernel_experts(
                x,
                [&d.row_token, &d.counts, &d.offsets],
                &self.gate_up,
                &self.down,
                path,
                Some((self.extras(), &ids, &d.slot_row)),
            )?,
            // A placed layer: the dispatch (not the router logits) comes to the host, where the
            // rows are split between the device's experts and the host's. One read: counts,
            // offsets and row_token put side by side on the device, split again on the host.
            Some(h) => {
                let (nc, no) = (d.counts.elem_count(), d.offsets.elem_count());
                let flat = |t: &Tensor| t.flatten_all();
                let all = [flat(&d.counts)?, flat(&d.offsets)?, flat(&d.row_token)?];
                let mut all = crate::model::host::read_vec::<u32>(&Tensor::cat(&all, 0)?)?;
                let row_token = all.split_off(nc + no);
                let offsets = all.split_off(nc);
                let hd = Dispatch {
                    num_experts: e,
                    top_k: a,
                    counts: all,
                    offsets,
                    row_token,
                    slot_row: Vec::new(),
                };
                self.split_experts(x, &hd, h, plan)?
            }
        }; // [N*A, H], expert-sorted
        let n = x.dim(0)?;
        let out = moe_combine_add(&y, &d.slot_row.reshape((n, a))?, &mix, shared)?;
        Ok((out, DeviceRouting { ids, weights }))
    }

    /// The routed experts with host routing and candle matmuls. `x [N, H]`.
    fn routed_candle(
        &self,
        x: &Tensor,
        logits: &Tensor,
        plan: &PathPlan,
    ) -> Result<(Tensor, DeviceRouting)> {
        let routing = route(
            logits,
            self.cfg.router,
            self.cfg.top_k,
            self.score_bias.as_deref(),
        )?;
        let d = dispatch(&routing.ids, self.cfg.top_k, self.cfg.num_experts)?;
        // Llama-4 (top-1): the score scales the expert's input, the output is taken as is.
        let scaled;
        let (x, mix) = match self.cfg.scale_input {
            true => {
                let w =
                    Tensor::from_slice(&routing.weights, (routing.num_tokens(), 1), x.device())?;
                scaled = x.broadcast_mul(&w.to_dtype(x.dtype())?)?;
                let unit = Routing {
                    weights: vec![1.0; routing.weights.len()],
                    ..routing.clone()
                };
                (&scaled, std::borrow::Cow::Owned(unit))
            }
            false => (x, std::borrow::Cow::Borrowed(&routing)),
        };
        let y = match &self.host {
            None => experts::experts_with(
                x,
                &d,
                &self.gate_up,
                &self.down,
                plan.cpu_experts(),
                self.extras(),
            )?,
            Some(h) => self.split_experts(x, &d, h, plan)?,
        }; // [N*A, H], expert-sorted
        let out = combine(&y, &d, &mix)?; // [N, H]
        let (n, dev) = (routing.num_tokens(), x.device());
        let ids = Tensor::from_vec(routing.ids, (n, self.cfg.top_k), dev)?;
        let weights = Tensor::from_vec(routing.weights, (n, self.cfg.top_k), dev)?;
        Ok((out, DeviceRouting { ids, weights }))
    }
}

impl MoeBlock {
    /// The routed experts of a placed layer: the device's experts through the device's own
    /// executor (on the kernel path, a GPU's default, the moe-kernels ops; on the CPU's candle
    /// path candle's ops and the references, not the CPU kernels), the host's through the CPU
    /// kernels on host copies of the hidden states of the tokens routed to them; the two outputs
    /// put back in `d`'s row order. `[N*A, H]`.
    fn split_experts(
        &self,
        x: &Tensor,
        d: &Dispatch,
        h: &HostExperts,
        plan: &PathPlan,
    ) -> Result<Tensor> {
        let dev = x.device();
        let (dr, rows_r) = d.subset(&h.resident);
        let (mut dh, rows_h) = d.subset(&h.host);
        // Only the hidden states of the tokens routed to host experts go to the host, first
        // (a device-to-host copy waits for the work queued before it): then the device's experts
        // are queued and run while the CPU kernels work on the host's.
        let xh = match rows_h.is_empty() {
            true => None,
            false => {
                let mut tokens = dh.row_token.clone();
                tokens.sort_unstable();
                tokens.dedup();
                let mut local = vec![0u32; x.dim(0)?];
                for (i, &t) in tokens.iter().enumerate() {
                    local[t as usize] = i as u32;
                }
                dh.row_token
                    .iter_mut()
                    .for_each(|t| *t = local[*t as usize]);
                let n = tokens.len();
                let idx = Tensor::from_vec(tokens, n, dev)?;
                Some(crate::model::host::to_host(&x.index_select(&idx, 0)?)?)
            }
        };
        let (mut parts, mut order) = (Vec::new(), Vec::new());
        let extras = self.extras();
        if !rows_r.is_empty() {
            let y = if !extras.plain() {
                // gpt-oss's experts: candle's ops on the device's share.
                let ex = experts::ExpertExtras {
                    experts: Some(&h.resident),
                    ..extras
                };
                experts::experts_with(x, &dr, &self.gate_up, &self.down, None, ex)?
            } else if plan.exec == super::ExecPath::Kernels {
                // The device's kernels (on the CPU, their references).
                let t = |v: &[u32]| Tensor::from_slice(v, v.len(), dev);
                let (rt, c, o) = (t(&dr.row_token)?, t(&dr.counts)?, t(&dr.offsets)?);
                let experts = (&self.gate_up, &self.down);
                let (a, e) = (self.cfg.top_k, dr.num_experts);
                let path = Some(plan.experts_path(x.dim(0)?, a, e, experts, x.dtype()));
                kernel_experts(x, [&rt, &c, &o], &self.gate_up, &self.down, path, None)?
            } else {
                experts::experts_w(x, &dr, &self.gate_up, &self.down, None)?
            };
            parts.push(y);
            order.extend(rows_r);
        }
        if let Some(xh) = xh {
            // On the CPU the plan's level (None: references forced, so candle's ops); beside a
            // GPU the CPU's best.
            let level = if dev.is_cpu() {
                plan.cpu_experts()
            } else {
                Some(moe_kernels::cpu::Level::default_for_cpu())
            };
            let host_extras = experts::ExpertExtras {
                gate_up_bias: h.gate_up_bias.as_ref(),
                down_bias: h.down_bias.as_ref(),
                experts: Some(&h.host),
                ..extras
            };
            let y = match level {
                _ if !host_extras.plain() => {
                    experts::experts_with(&xh, &dh, &h.gate_up, &h.down, level, host_extras)?
                }
                Some(l) => moe_kernels::cpu::moe_experts_cpu(
                    l,
                    &xh,
                    &dh.row_token,
                    &dh.offsets,
                    h.gate_up.kernel_ref(),
                    h.down.kernel_ref(),
                )?,
                None => experts::experts_w(&xh, &dh, &h.gate_up, &h.down, None)?,
            };
            parts.push(crate::model::host::to_device(&y, dev)?);
            order.extend(rows_h);
        }
        if parts.is_empty() {
            return Tensor::zeros((0, x.dim(1)?), x.dtype(), dev);
        }
        // parts are in `order`'s rows; row r of the result is part row pos[r].
        let mut pos = vec![0u32; order.len()];
        for (i, &r) in order.iter().enumerate() {
            pos[r as usize] = i as u32;
        }
        let n = pos.len();
        Tensor::cat(&parts, 0)?.index_select(&Tensor::from_vec(pos, n, dev)?, 0)
    }
}

/// A bias as f32 on the host (`None` stays `None`).
fn host_f32(b: &Option<Tensor>) -> Result<Option<Vec<f32>>> {
    b.as_ref()
        .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
        .transpose()
}

/// The experts of `gate_up`/`down` through the moe-kernels ops (`moe_experts`, or `qmatmul_moe`
/// twice with SwiGLU between) over a dispatch's device tensors `[row_token, counts, offsets]`.
/// `[rows, H]` in the dispatch's (expert-sorted) row order. `extras` (with the routing's `ids
/// [N, A]` and the dispatch's `slot_row [N*A]`) adds gpt-oss's activation and biases to the
/// quantized form (the fused dense kernel computes plain SwiGLU only).
fn kernel_experts(
    x: &Tensor,
    [row_token, counts, offsets]: [&Tensor; 3],
    gate_up: &Weight,
    down: &Weight,
    path: Option<moe_kernels::ExpertPath>,
    extras: Option<(experts::ExpertExtras, &Tensor, &Tensor)>,
) -> Result<Tensor> {
    if extras.is_some_and(|(ex, _, _)| !ex.plain()) && !matches!(gate_up, Weight::Quant(_)) {
        candle_core::bail!("experts: the fused dense expert kernels compute plain SwiGLU only");
    }
    match (gate_up, down) {
        (Weight::Dense(gu), Weight::Dense(dn)) if gu.dtype() != x.dtype() => {
            // 16-bit experts under f32 compute (`--weight-dtype`): widened per call.
            let (gu, dn) = (gu.to_dtype(x.dtype())?, dn.to_dtype(x.dtype())?);
            moe_experts(x, row_token, counts, offsets, &gu, &dn, path)
        }
        (Weight::Dense(gu), Weight::Dense(dn)) => {
            moe_experts(x, row_token, counts, offsets, gu, dn, path)
        }
        (Weight::Quant(gu), Weight::Quant(dn)) => {
            let (qg, pg) = (&gu.qweight, &gu.params);
            let extras = extras.filter(|(ex, _, _)| !ex.plain());
            // Each row's expert bias, placed by the dispatch's slot -> row map: nothing leaves
            // the device.
            let row_bias = |y: Tensor, bias: Option<&Tensor>| -> Result<Tensor> {
                let (Some(b), Some((_, ids, slot_row))) = (bias, extras) else {
                    return Ok(y);
                };
                let per_slot = b
                    .to_dtype(y.dtype())?
                    .index_select(&ids.flatten_all()?, 0)?;
                y.index_add(&slot_row.flatten_all()?, &per_slot, 0)
            };
            let h = match extras {
                // Plain SwiGLU: fused into the gate/up kernel on decode's GEMV path.
                None => moe_kernels::qmatmul_moe_swiglu(
                    x,
                    Some(row_token),
                    counts,
                    offsets,
                    qg,
                    pg,
                    gu.fmt,
                    path,
                )?,
                Some((ex, _, _)) => {
                    let g = qmatmul_moe(x, Some(row_token), counts, offsets, qg, pg, gu.fmt, path)?;
                    experts::activate(&row_bias(g, ex.gate_up_bias)?, ex.act)?
                }
            };
            let (qd, pd) = (&dn.qweight, &dn.params);
            let y = qmatmul_moe(&h, None, counts, offsets, qd, pd, dn.fmt, path)?;
            row_bias(y, extras.and_then(|(ex, _, _)| ex.down_bias))
        }
        _ => candle_core::bail!("experts: gate_up and down must both be dense or both quantized"),
    }
}

/// A dense SwiGLU MLP `down(silu(gate x) * up x)` with gate and up fused into one matmul.
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn new(w: MlpWeights) -> Self {
        Mlp {
            gate_up: Linear::new(w.gate_up),
            down: Linear::new(w.down),
        }
    }

    /// `x [.., H] -> [.., H]`
    /// Bytes of weights in memory.
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    pub fn forward(&self, x: &Tensor, plan: &PathPlan) -> Result<Tensor> {
        let gu = self.gate_up.forward_on(x, plan)?;
        let f = gu.dim(candle_core::D::Minus1)? / 2;
        let act = (candle_nn::ops::silu(&gu.narrow(candle_core::D::Minus1, 0, f)?)?
            * gu.narrow(candle_core::D::Minus1, f, f)?)?;
        self.down.forward_on(&act, plan)
    }
}
