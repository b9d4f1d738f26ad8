//! Stage 3, experts: for each expert with tokens, its SwiGLU MLP over its contiguous run of
//! dispatched rows: `y = (silu(x Wg^T) * (x Wu^T)) Wd^T`. Experts with no tokens cost nothing.

use candle_core::{DType, Result, Tensor};

use super::Dispatch;
use crate::config::ExpertAct;
use crate::quant::Weight;

/// What an expert does beyond `down(silu(gate) * up)`: gpt-oss's clamped activation and biases
/// after both projections (`gate_up_bias [E, 2F]`, gate then up; `down_bias [E, H]`).
#[derive(Clone, Copy, Default)]
pub struct ExpertExtras<'a> {
    pub act: ExpertAct,
    pub gate_up_bias: Option<&'a Tensor>,
    pub down_bias: Option<&'a Tensor>,
    /// The global id of each local expert, when the weights hold a subset of the experts (a
    /// placed layer's device or host share): the biases are indexed by global id.
    pub experts: Option<&'a [usize]>,
    /// The same biases as f32 on the host, for the CPU expert kernels.
    pub host_biases: (Option<&'a [f32]>, Option<&'a [f32]>),
}

impl ExpertExtras<'_> {
    /// The CPU expert kernels' form of these extras, when it has everything they need.
    fn cpu_epilogue(&self) -> Option<moe_kernels::cpu::Epilogue<'_>> {
        let (gb, db) = self.host_biases;
        if gb.is_none() != self.gate_up_bias.is_none() || db.is_none() != self.down_bias.is_none() {
            return None;
        }
        Some(moe_kernels::cpu::Epilogue {
            act: match self.act {
                ExpertAct::SwiGlu => moe_kernels::cpu::Activation::SwiGlu,
                ExpertAct::ClampedSwiGlu { alpha, limit } => {
                    moe_kernels::cpu::Activation::ClampedSwiGlu {
                        alpha: alpha as f32,
                        limit: limit as f32,
                    }
                }
            },
            gate_up_bias: gb,
            down_bias: db,
            experts: self.experts,
        })
    }
}

impl ExpertExtras<'_> {
    /// Plain SwiGLU without biases: what the fused expert kernels compute.
    pub fn plain(&self) -> bool {
        self.act == ExpertAct::SwiGlu && self.gate_up_bias.is_none() && self.down_bias.is_none()
    }
}

/// The activation of `gu [n, 2F]` (gate columns, then up) -> `[n, F]`.
pub fn activate(gu: &Tensor, act: ExpertAct) -> Result<Tensor> {
    let f = gu.dim(1)? / 2;
    let (g, u) = (gu.narrow(1, 0, f)?, gu.narrow(1, f, f)?);
    match act {
        ExpertAct::SwiGlu => candle_nn::ops::silu(&g)? * u,
        ExpertAct::ClampedSwiGlu { alpha, limit } => {
            let g = g.minimum(limit)?;
            let u = u.clamp(-limit, limit)?;
            let glu = (&g * candle_nn::ops::sigmoid(&(&g * alpha)?)?)?;
            (u + 1.0)? * glu
        }
    }
}

/// `y + bias[e]` for the rows of each expert: `offsets` (host, `[E + 1]`) give expert e rows
/// `offsets[e]..offsets[e + 1]` of `y [rows, N]`; `bias [E, N]`.
fn add_expert_bias(
    y: &Tensor,
    bias: Option<&Tensor>,
    offsets: &[u32],
    global: impl Fn(usize) -> usize,
) -> Result<Tensor> {
    let Some(b) = bias else {
        return Ok(y.clone());
    };
    let rows: Vec<u32> = offsets
        .windows(2)
        .enumerate()
        .flat_map(|(e, w)| std::iter::repeat_n(global(e) as u32, (w[1] - w[0]) as usize))
        .collect();
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, y.device())?;
    y + b.to_dtype(y.dtype())?.index_select(&idx, 0)?
}

/// [`experts_w`] with gpt-oss's extras ([`ExpertExtras`]): with `cpu` the CPU expert kernels
/// (their epilogue adds the biases and the activation), else candle's ops per expert or the
/// grouped quantized matmul.
pub fn experts_with(
    x: &Tensor,
    d: &Dispatch,
    gate_up: &Weight,
    down: &Weight,
    cpu: Option<moe_kernels::cpu::Level>,
    extras: ExpertExtras,
) -> Result<Tensor> {
    if extras.plain() {
        return experts_w(x, d, gate_up, down, cpu);
    }
    if let (Some(level), Some(ep)) = (cpu.filter(|_| x.device().is_cpu()), extras.cpu_epilogue()) {
        return moe_kernels::cpu::moe_experts_cpu_with(
            level,
            x,
            &d.row_token,
            &d.offsets,
            gate_up.kernel_ref(),
            down.kernel_ref(),
            &ep,
        );
    }
    let global = |e: usize| extras.experts.map_or(e, |ids| ids[e]);
    match (gate_up, down) {
        (Weight::Dense(gu), Weight::Dense(dn)) => {
            let mut outs = Vec::new();
            for e in 0..d.num_experts {
                let (lo, hi) = (d.offsets[e] as usize, d.offsets[e + 1] as usize);
                if lo == hi {
                    continue;
                }
                let rows = Tensor::from_slice(&d.row_token[lo..hi], hi - lo, x.device())?;
                let xe = x.index_select(&rows, 0)?; // [n, H]
                let mut g = expert_matmul(&xe, gu, e)?; // [n, 2F]
                if let Some(b) = extras.gate_up_bias {
                    g = g.broadcast_add(&b.get(global(e))?.to_dtype(g.dtype())?)?;
                }
                let mut y = expert_matmul(&activate(&g, extras.act)?, dn, e)?;
                if let Some(b) = extras.down_bias {
                    y = y.broadcast_add(&b.get(global(e))?.to_dtype(y.dtype())?)?;
                }
                outs.push(y);
            }
            if outs.is_empty() {
                return Tensor::zeros((0, x.dim(1)?), x.dtype(), x.device());
            }
            Tensor::cat(&outs, 0)
        }
        (Weight::Quant(gu), Weight::Quant(dn)) => {
            let rows = Tensor::from_slice(&d.row_token, d.row_token.len(), x.device())?;
            let xs = x.index_select(&rows, 0)?; // [N*A, H], expert-sorted
            let g = gu.forward_grouped(&xs, &d.offsets)?; // [N*A, 2F]
            let g = add_expert_bias(&g, extras.gate_up_bias, &d.offsets, global)?;
            let y = dn.forward_grouped(&activate(&g, extras.act)?, &d.offsets)?;
            add_expert_bias(&y, extras.down_bias, &d.offsets, global)
        }
        _ => candle_core::bail!("experts: gate_up and down must both be dense or both quantized"),
    }
}

/// [`experts`] for dense or quantized weights. Quantized experts run the grouped layout: the
/// dispatched rows gathered once into expert-sorted `[N*A, H]`, then one grouped W8A16/W4A16
/// matmul per projection (`moe_kernels::qmatmul_grouped`, dequantizing on the fly).
///
/// With `cpu` (the CPU kernels' level from the path plan) any format runs the fused CPU expert
/// kernel instead (`moe_kernels::cpu::moe_experts_cpu`).
pub fn experts_w(
    x: &Tensor,
    d: &Dispatch,
    gate_up: &Weight,
    down: &Weight,
    cpu: Option<moe_kernels::cpu::Level>,
) -> Result<Tensor> {
    if let Some(level) = cpu.filter(|_| x.device().is_cpu()) {
        return moe_kernels::cpu::moe_experts_cpu(
            level,
            x,
            &d.row_token,
            &d.offsets,
            gate_up.kernel_ref(),
            down.kernel_ref(),
        );
    }
    match (gate_up, down) {
        (Weight::Dense(gu), Weight::Dense(dn)) => experts(x, d, gu, dn),
        (Weight::Quant(gu), Weight::Quant(dn)) => {
            let f = dn.shape[2];
            let rows = Tensor::from_slice(&d.row_token, d.row_token.len(), x.device())?;
            let xs = x.index_select(&rows, 0)?; // [N*A, H], expert-sorted
            let g = gu.forward_grouped(&xs, &d.offsets)?; // [N*A, 2F]
            let h = (candle_nn::ops::silu(&g.narrow(1, 0, f)?)? * g.narrow(1, f, f)?)?;
            dn.forward_grouped(&h, &d.offsets) // [N*A, H]
        }
        _ => candle_core::bail!("experts: gate_up and down must both be dense or both quantized"),
    }
}

/// `x [n, K] @ w[e]^T` for stacked `w [E, N, K]` -> `[n, N]`. candle-core 0.11's CPU matmul
/// has no bf16 kernel: it widens both operands' whole storage to f32, and the storage of the
/// view `w[e]` is all E experts. Widening only expert e's slice gives the same numbers (f32
/// products rounded back to bf16) with E times less transient memory and conversion work.
fn expert_matmul(x: &Tensor, w: &Tensor, e: usize) -> Result<Tensor> {
    let mut we = w.get(e)?;
    if we.dtype() != x.dtype() {
        // 16-bit experts under f32 compute (`--weight-dtype`) off the CPU kernels' path.
        we = we.to_dtype(x.dtype())?;
    }
    if x.device().is_cpu() && x.dtype() == DType::BF16 {
        let y = x
            .to_dtype(DType::F32)?
            .matmul(&we.to_dtype(DType::F32)?.t()?)?;
        return y.to_dtype(DType::BF16);
    }
    x.matmul(&we.t()?)
}

/// `x [N, H]`, `gate_up [E, 2F, H]`, `down [E, H, F]` -> `[N*A, H]` in dispatch (expert-sorted)
/// row order.
pub fn experts(x: &Tensor, d: &Dispatch, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let f = down.dim(2)?;
    let device = x.device();
    let mut outs = Vec::new();
    for e in 0..d.num_experts {
        let (lo, hi) = (d.offsets[e] as usize, d.offsets[e + 1] as usize);
        if lo == hi {
            continue;
        }
        let rows = Tensor::from_slice(&d.row_token[lo..hi], hi - lo, device)?;
        let xe = x.index_select(&rows, 0)?; // [n, H]
        let gu = expert_matmul(&xe, gate_up, e)?; // [n, 2F]
        let h = (candle_nn::ops::silu(&gu.narrow(1, 0, f)?)? * gu.narrow(1, f, f)?)?;
        outs.push(expert_matmul(&h, down, e)?); // [n, H]
    }
    if outs.is_empty() {
        return Tensor::zeros((0, x.dim(1)?), x.dtype(), device);
    }
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::super::dispatch;
    use super::*;
    use candle_core::{Device, D};

    /// Naive reference: each row through its own expert, one at a time.
    fn one(x: &Tensor, gate_up: &Tensor, down: &Tensor, e: usize) -> Tensor {
        let f = down.dim(2).unwrap();
        let g = x
            .matmul(
                &gate_up
                    .get(e)
                    .unwrap()
                    .narrow(0, 0, f)
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        let u = x
            .matmul(
                &gate_up
                    .get(e)
                    .unwrap()
                    .narrow(0, f, f)
                    .unwrap()
                    .t()
                    .unwrap(),
            )
            .unwrap();
        let silu = (&g * candle_nn::ops::sigmoid(&g).unwrap()).unwrap();
        (silu * u)
            .unwrap()
            .matmul(&down.get(e).unwrap().t().unwrap())
            .unwrap()
    }

    #[test]
    fn matches_per_row_reference_with_an_idle_expert() {
        let dev = Device::Cpu;
        let (n, h, f, e, a) = (5, 6, 4, 4, 2);
        let x = Tensor::randn(0f32, 1.0, (n, h), &dev).unwrap();
        let gate_up = Tensor::randn(0f32, 0.5, (e, 2 * f, h), &dev).unwrap();
        let down = Tensor::randn(0f32, 0.5, (e, h, f), &dev).unwrap();
        // Expert 3 gets no token.
        let ids = [0u32, 1, 1, 2, 2, 0, 0, 2, 1, 0];
        let d = dispatch(&ids, a, e).unwrap();
        assert_eq!(d.counts[3], 0);
        let y = experts(&x, &d, &gate_up, &down).unwrap();
        assert_eq!(y.dims(), &[n * a, h]);
        for (slot, &ex) in ids.iter().enumerate() {
            let row = d.slot_row[slot] as usize;
            let want = one(
                &x.narrow(0, slot / a, 1).unwrap(),
                &gate_up,
                &down,
                ex as usize,
            );
            let got = y.narrow(0, row, 1).unwrap();
            let err: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max(D::Minus1)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(err < 1e-5, "slot {slot}: err {err}");
        }
    }
}
