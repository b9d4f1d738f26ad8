//! MoE stage 4, combine: the weighted gather-sum of expert outputs back into token order.
//!
//! Legend: T tokens, A top-k choices (slots) per token, H hidden,
//! R rows of `expert_out` (normally T*A; more if dispatch pads each expert's group of rows).
//!
//! ```text
//! expert_out [R, H]          f32 | bf16 | f16, rows in expert-sorted slot order
//! slot_of    [T*A] or [T, A] u32: row of expert_out holding token t's j-th choice, at t*A + j
//! weights    [T, A]          f32 routing weights
//! add        [T, H]          dtype of expert_out, optional (moe_combine_add)
//! out        [T, H]          dtype of expert_out
//! out[t, :] = sum_{j=0..A} weights[t, j] * expert_out[slot_of[t*A + j], :]  (+ add[t, :])
//! ```
//!
//! Semantics shared by the CPU reference and `cuda/moe_combine.cu`:
//! - the sum runs j = 0..A-1 in f32, multiply and add each rounded (no fused multiply-add), then `add` (in
//!   f32), then one round-to-nearest-even conversion to the activation dtype; f32 results therefore match
//!   bit for bit;
//! - a choice whose weight is exactly 0 is skipped and its row never read, so padding rows or rows of
//!   dropped tokens may hold anything, even NaN;
//! - a slot >= R is an error on the CPU reference; the kernel (on CUDA, or the emulator) skips it (checking
//!   would need a sync).

use crate::common::{grid_dim, suffix, Elem};
use crate::launch::{Arg, Buf, Plan};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

const OP: &str = "moe_combine";

/// out[t, :] = sum_j weights[t, j] * expert_out[slot_of[t*A + j], :] (see the module docs).
///
/// `expert_out` is `[R, H]` f32/bf16/f16, `slot_of` is u32 `[T*A]` or `[T, A]`, `weights` is f32 `[T, A]`;
/// returns `[T, H]` in the dtype of `expert_out`. Non-contiguous inputs are copied to contiguous ones.
/// Shape, dtype and device mismatches are errors, never panics.
pub fn moe_combine(expert_out: &Tensor, slot_of: &Tensor, weights: &Tensor) -> Result<Tensor> {
    moe_combine_add(expert_out, slot_of, weights, None)
}

/// [`moe_combine`] with `add [T, H]` (the dtype of `expert_out`) added to each token's f32 sum before its
/// one rounding: the MoE block's shared experts folded into combine.
pub fn moe_combine_add(
    expert_out: &Tensor,
    slot_of: &Tensor,
    weights: &Tensor,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let d = Dims::check(
        (expert_out.dtype(), expert_out.dims()),
        (slot_of.dtype(), slot_of.dims()),
        (weights.dtype(), weights.dims()),
    )?;
    if !expert_out.device().same_device(slot_of.device())
        || !expert_out.device().same_device(weights.device())
    {
        bail!(
            "{OP}: inputs on different devices: expert_out {:?}, slot_of {:?}, weights {:?}",
            expert_out.device().location(),
            slot_of.device().location(),
            weights.device().location()
        );
    }
    if let Some(s) = add {
        if s.dims() != [d.t, d.h] || s.dtype() != expert_out.dtype() {
            bail!(
                "{OP}: add must be {:?} [{}, {}], got {:?} {:?}",
                expert_out.dtype(),
                d.t,
                d.h,
                s.dtype(),
                s.dims()
            );
        }
        if !s.device().same_device(expert_out.device()) {
            bail!("{OP}: add is on another device");
        }
    }
    if d.t == 0 || d.h == 0 {
        return Tensor::zeros((d.t, d.h), expert_out.dtype(), expert_out.device());
    }
    if crate::launch::runs_kernels(expert_out.device()) {
        let plan = combine_plan_with(expert_out.dtype(), d.t, d.a, d.h, d.r, add.is_some())?;
        let mut inputs = vec![expert_out, slot_of, weights];
        inputs.extend(add);
        let mut outs = plan.run(&inputs)?;
        return match outs.pop() {
            Some(out) => Ok(out),
            None => bail!("{OP}: the plan returned no output"),
        };
    }
    let Some(s) = add else {
        return expert_out.contiguous()?.apply_op3_no_bwd(
            &slot_of.contiguous()?,
            &weights.contiguous()?,
            &MoeCombine,
        );
    };
    // The reference in f32 (its products and sum are f32 whatever the dtype), plus `add`, one rounding.
    let sum = expert_out
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op3_no_bwd(&slot_of.contiguous()?, &weights.contiguous()?, &MoeCombine)?;
    (sum + s.to_dtype(DType::F32)?)?.to_dtype(expert_out.dtype())
}

/// The CPU reference behind [`moe_combine`] as a candle op (CPU only: on CUDA, and on the CPU with the emulator
/// on, [`moe_combine`] runs [`combine_plan`] instead). Applied directly it requires contiguous inputs (it reports
/// an error otherwise) and always runs the reference.
#[derive(Debug, Clone, Copy, Default)]
pub struct MoeCombine;

/// Problem sizes, validated from dtypes and shapes alone (the same check on every device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dims {
    t: usize,
    a: usize,
    h: usize,
    r: usize,
}

impl Dims {
    fn check(
        (x_dtype, x_dims): (DType, &[usize]),
        (s_dtype, s_dims): (DType, &[usize]),
        (w_dtype, w_dims): (DType, &[usize]),
    ) -> Result<Self> {
        if !matches!(x_dtype, DType::F32 | DType::BF16 | DType::F16) {
            bail!("{OP}: expert_out must be f32, bf16 or f16, got {x_dtype:?}");
        }
        if s_dtype != DType::U32 {
            bail!("{OP}: slot_of must be u32, got {s_dtype:?}");
        }
        if w_dtype != DType::F32 {
            bail!("{OP}: weights must be f32, got {w_dtype:?}");
        }
        let &[r, h] = x_dims else {
            bail!("{OP}: expert_out must be [R, H], got shape {x_dims:?}");
        };
        let &[t, a] = w_dims else {
            bail!("{OP}: weights must be [T, A], got shape {w_dims:?}");
        };
        let slots_ok = match *s_dims {
            [n] => Some(n) == t.checked_mul(a),
            [st, sa] => st == t && sa == a,
            _ => false,
        };
        if !slots_ok {
            bail!("{OP}: slot_of must be [T*A] or [T, A] = [{t}, {a}] (from weights), got shape {s_dims:?}");
        }
        // Kernel arguments are u32 and the grid's x dimension (one block per token) is at most 2^31 - 1.
        if t > i32::MAX as usize || a > u32::MAX as usize || h > u32::MAX as usize {
            bail!("{OP}: sizes T={t}, A={a}, H={h} exceed the kernel's limits (T < 2^31, A, H < 2^32)");
        }
        Ok(Self { t, a, h, r })
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((o1, o2)) if o2 <= data.len() => Ok(&data[o1..o2]),
        Some((o1, o2)) => bail!(
            "{OP}: {what} layout {o1}..{o2} exceeds its storage of {}",
            data.len()
        ),
        None => bail!(
            "{OP}: {what} must be contiguous (shape {:?})",
            layout.dims()
        ),
    }
}

/// The specification. `slot_of` must already be validated against `r` (every slot < r).
fn combine_reference<T: Elem>(x: &[T], slot_of: &[u32], weights: &[f32], d: Dims) -> Vec<T> {
    let Dims { t, a, h, .. } = d;
    let mut out = Vec::with_capacity(t * h);
    let mut acc = vec![0f32; h];
    for tok in 0..t {
        acc.fill(0.0);
        for j in 0..a {
            let w = weights[tok * a + j];
            if w == 0.0 {
                continue; // row never read: it may be padding or garbage
            }
            let row = slot_of[tok * a + j] as usize;
            for (acc, &v) in acc.iter_mut().zip(&x[row * h..(row + 1) * h]) {
                // Separate multiply and add (Rust never fuses them), exactly like the kernel.
                *acc += w * v.f32();
            }
        }
        out.extend(acc.iter().map(|&v| T::of(v)));
    }
    out
}

impl CustomOp3 for MoeCombine {
    fn name(&self) -> &'static str {
        OP
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::check(
            (s1.dtype(), l1.dims()),
            (s2.dtype(), l2.dims()),
            (s3.dtype(), l3.dims()),
        )?;
        let slot_of = contiguous(s2.as_slice::<u32>()?, l2, "slot_of")?;
        let weights = contiguous(s3.as_slice::<f32>()?, l3, "weights")?;
        if let Some((i, &s)) = slot_of.iter().enumerate().find(|(_, &s)| s as usize >= d.r) {
            bail!(
                "{OP}: slot_of[{i}] = {s} (token {}, choice {}) is out of range for expert_out with {} rows",
                i / d.a,
                i % d.a,
                d.r
            );
        }
        let (s, w) = (slot_of, weights);
        let out = match s1 {
            CpuStorage::F32(x) => {
                CpuStorage::F32(combine_reference(contiguous(x, l1, "expert_out")?, s, w, d))
            }
            CpuStorage::BF16(x) => {
                CpuStorage::BF16(combine_reference(contiguous(x, l1, "expert_out")?, s, w, d))
            }
            CpuStorage::F16(x) => {
                CpuStorage::F16(combine_reference(contiguous(x, l1, "expert_out")?, s, w, d))
            }
            other => bail!(
                "{OP}: expert_out must be f32, bf16 or f16, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, Shape::from((d.t, d.h))))
    }
}

/// The launch of `moe_combine_<dtype>` on `expert_out [R, H]`, `slot_of [T*A]`, `weights [T, A]`: grid (T, Y),
/// block B. A work item is a 16-byte vector when H is a multiple of its width (the kernel re-checks alignment and
/// falls back to scalars; its stride loops make any grid correct), else one element; B = the items of a row
/// rounded up to a warp, at most 128, and Y = ceil(items / B) (at most 65535) spreads a row over several blocks
/// so decode (T = 1) is not a single block. Output `out [T, H]`. No launch when T*H = 0.
pub fn combine_plan(dtype: DType, t: usize, a: usize, h: usize, r: usize) -> Result<Plan> {
    combine_plan_with(dtype, t, a, h, r, false)
}

/// [`combine_plan`], with `add` a fourth input `add [T, H]` (a null pointer otherwise).
pub fn combine_plan_with(
    dtype: DType,
    t: usize,
    a: usize,
    h: usize,
    r: usize,
    add: bool,
) -> Result<Plan> {
    let sfx = suffix(dtype)?;
    let inputs: &[&str] = match add {
        true => &["expert_out", "slot_of", "weights", "add"],
        false => &["expert_out", "slot_of", "weights"],
    };
    let mut p = Plan::new(OP, inputs);
    let out = p.out("out", dtype, (t, h));
    if t == 0 || h == 0 {
        return Ok(p);
    }
    let (Ok(a32), Ok(h32)) = (u32::try_from(a), u32::try_from(h)) else {
        bail!("{OP}: A = {a} or H = {h} exceeds the kernel's u32");
    };
    let per_vec = 16 / dtype.size_in_bytes();
    let work = if h.is_multiple_of(per_vec) {
        h / per_vec
    } else {
        h
    };
    let threads = work.next_multiple_of(32).min(128);
    let blocks_y = work.div_ceil(threads).min(65535);
    // Slots are u32, so clamping R to u32::MAX changes nothing.
    let r32 = r.min(u32::MAX as usize) as u32;
    // SAFETY (of the executor's launch): argument types and order match `moe_combine_<dtype>` in
    // cuda/moe_combine.cu; every index the kernel forms is < T*A (slots, weights), < R*H (expert_out) or < T*H
    // (out), and it writes every one of the T*H elements.
    p.launch(
        "moe_combine",
        format!("moe_combine_{sfx}"),
        [
            grid_dim(OP, "tokens", t, u32::MAX >> 1)?,
            blocks_y as u32,
            1,
        ],
        [threads as u32, 1, 1],
        vec![
            Arg::Buf(Buf::In(0)),
            Arg::Buf(Buf::In(1)),
            Arg::Buf(Buf::In(2)),
            match add {
                true => Arg::Buf(Buf::In(3)),
                false => Arg::Null,
            },
            out,
            Arg::U32(a32),
            Arg::U32(h32),
            Arg::U32(r32),
        ],
    );
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// Deterministic xorshift64* so the tests need no rand dependency.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform in [-1, 1).
        fn f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }
    }

    struct Case {
        t: usize,
        a: usize,
        h: usize,
        r: usize,
        x: Vec<f32>,
        slots: Vec<u32>,
        weights: Vec<f32>,
    }

    /// A random problem: each token picks A distinct rows (a random permutation of the R rows, like a
    /// real dispatch with R = T*A) and random softmax-like weights.
    fn random_case(rng: &mut Rng, t: usize, a: usize, h: usize, pad: usize) -> Case {
        let r = t * a + pad;
        let x = (0..r * h).map(|_| rng.f32()).collect();
        let mut perm: Vec<u32> = (0..r as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let slots = perm[..t * a].to_vec();
        let weights = (0..t * a).map(|_| rng.f32().abs() + 0.01).collect();
        Case {
            t,
            a,
            h,
            r,
            x,
            slots,
            weights,
        }
    }

    /// Naive triple loop in f64: independent of the reference's f32 accumulation order.
    fn naive(c: &Case, x: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; c.t * c.h];
        for t in 0..c.t {
            for j in 0..c.a {
                let w = c.weights[t * c.a + j] as f64;
                let row = c.slots[t * c.a + j] as usize;
                for h in 0..c.h {
                    if w != 0.0 {
                        out[t * c.h + h] += w * x[row * c.h + h] as f64;
                    }
                }
            }
        }
        out
    }

    fn tensors(c: &Case, dtype: DType) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = Tensor::from_slice(&c.x, (c.r, c.h), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let s = Tensor::from_slice(&c.slots, c.t * c.a, &dev).unwrap();
        let w = Tensor::from_slice(&c.weights, (c.t, c.a), &dev).unwrap();
        (x, s, w)
    }

    fn max_abs_diff(got: &Tensor, want: &[f64]) -> f64 {
        let got: Vec<f32> = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got.len(), want.len());
        got.iter()
            .zip(want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn matches_naive_loop_all_dtypes_and_shapes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        // (T, A, H, padding rows): odd H, H multiple of the vector width, A = 1, a single token.
        let shapes = [
            (1, 1, 1, 0),
            (1, 8, 64, 0),
            (5, 2, 7, 3),
            (7, 4, 13, 0),
            (16, 6, 96, 5),
            (3, 3, 1000, 1),
        ];
        for &(t, a, h, pad) in &shapes {
            let c = random_case(&mut rng, t, a, h, pad);
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 5e-2), (DType::F16, 5e-3)] {
                let (x, s, w) = tensors(&c, dtype);
                // The naive loop sees the same rounded inputs the op sees.
                let xr: Vec<f32> = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = moe_combine(&x, &s, &w).unwrap();
                assert_eq!(got.dims(), &[t, h]);
                assert_eq!(got.dtype(), dtype);
                let err = max_abs_diff(&got, &naive(&c, &xr));
                assert!(
                    err <= tol,
                    "T={t} A={a} H={h} {dtype:?}: max abs err {err} > {tol}"
                );
            }
        }
    }

    #[test]
    fn matches_candle_gather_mul_sum() {
        // An independent formulation with candle ops: index_select rows, scale, sum over choices.
        let mut rng = Rng(42);
        let c = random_case(&mut rng, 9, 4, 33, 2);
        let (x, s, w) = tensors(&c, DType::F32);
        let got = moe_combine(&x, &s, &w).unwrap();
        let want = x
            .index_select(&s, 0)
            .unwrap()
            .reshape((c.t, c.a, c.h))
            .unwrap()
            .broadcast_mul(&w.unsqueeze(2).unwrap())
            .unwrap()
            .sum(1)
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "diff {diff}");
    }

    #[test]
    fn zero_weight_token_is_zero_even_over_nan_rows() {
        let mut rng = Rng(7);
        let mut c = random_case(&mut rng, 4, 3, 17, 0);
        // Token 2 is dropped: all its weights are 0 and its rows hold NaN (garbage) - output must be 0.
        for j in 0..c.a {
            c.weights[2 * c.a + j] = 0.0;
            let row = c.slots[2 * c.a + j] as usize;
            c.x[row * c.h..(row + 1) * c.h].fill(f32::NAN);
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let (x, s, w) = tensors(&c, dtype);
            let got = moe_combine(&x, &s, &w)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let row2: Vec<f32> = got.i(2).unwrap().to_vec1().unwrap();
            assert!(row2.iter().all(|&v| v == 0.0), "{dtype:?}: {row2:?}");
            let others: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            assert!(others.iter().all(|v| v.is_finite()), "{dtype:?}");
        }
    }

    #[test]
    fn f32_is_exactly_the_ordered_f32_sum() {
        // The documented accumulation order (j = 0..A, separate mul and add), which the kernel reproduces.
        let mut rng = Rng(3);
        let c = random_case(&mut rng, 6, 5, 11, 0);
        let (x, s, w) = tensors(&c, DType::F32);
        let got: Vec<f32> = moe_combine(&x, &s, &w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for t in 0..c.t {
            for h in 0..c.h {
                let mut acc = 0f32;
                for j in 0..c.a {
                    acc += c.weights[t * c.a + j] * c.x[c.slots[t * c.a + j] as usize * c.h + h];
                }
                assert_eq!(got[t * c.h + h].to_bits(), acc.to_bits(), "t={t} h={h}");
            }
        }
    }

    #[test]
    fn accepts_2d_slots_and_non_contiguous_inputs() {
        let mut rng = Rng(11);
        let c = random_case(&mut rng, 5, 2, 6, 0);
        let (x, s, w) = tensors(&c, DType::F32);
        let want = moe_combine(&x, &s, &w).unwrap();
        // Same data through a transposed (non-contiguous) expert_out and [T, A] slots.
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert!(!xt.is_contiguous());
        let got = moe_combine(&xt, &s.reshape((c.t, c.a)).unwrap(), &w).unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn empty_inputs_give_empty_output() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((0, 8), DType::BF16, &dev).unwrap();
        let s = Tensor::zeros(0, DType::U32, &dev).unwrap();
        let w = Tensor::zeros((0, 2), DType::F32, &dev).unwrap();
        let out = moe_combine(&x, &s, &w).unwrap();
        assert_eq!(out.dims(), &[0, 8]);
        assert_eq!(out.dtype(), DType::BF16);
        // A = 0: every token gets zeros.
        let x = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 0), DType::F32, &dev).unwrap();
        let out = moe_combine(&x, &s, &w).unwrap();
        assert_eq!(out.to_vec2::<f32>().unwrap(), vec![vec![0.0; 4]; 2]);
    }

    #[test]
    fn plan_geometry() {
        let geom = |dtype, t, a, h, r| {
            let p = combine_plan(dtype, t, a, h, r).unwrap();
            assert_eq!(p.inputs, vec!["expert_out", "slot_of", "weights"]);
            assert_eq!((p.outs.len(), p.outs[0].dtype), (1, dtype));
            assert_eq!(p.outs[0].shape.dims(), &[t, h]);
            p.launches
                .iter()
                .map(|l| (l.entry.clone(), l.grid, l.block))
                .collect::<Vec<_>>()
        };
        let one = |e: &str, grid, block| vec![(e.to_string(), grid, block)];
        // Odd H: scalar items, a full block of 128 and a partial second one along y.
        assert_eq!(
            geom(DType::F32, 1, 8, 129, 8),
            one("moe_combine_f32", [1, 2, 1], [128, 1, 1])
        );
        // H a multiple of 8 bf16: 4096 / 8 = 512 vectors over 4 blocks per token.
        assert_eq!(
            geom(DType::BF16, 7, 2, 4096, 14),
            one("moe_combine_bf16", [7, 4, 1], [128, 1, 1])
        );
        // 24 f16 = 3 vectors: one warp; 24 f32 = 6 vectors.
        assert_eq!(
            geom(DType::F16, 3, 3, 24, 9),
            one("moe_combine_f16", [3, 1, 1], [32, 1, 1])
        );
        assert_eq!(
            geom(DType::F32, 3, 3, 24, 9),
            one("moe_combine_f32", [3, 1, 1], [32, 1, 1])
        );
        // Very long rows: y is capped at 65535 (the stride loop covers the rest).
        assert_eq!(
            geom(DType::F32, 1, 1, 128 * 70000 + 1, 1)[0].1,
            [1, 65535, 1]
        );
        // Empty outputs: nothing to launch.
        assert!(geom(DType::F32, 0, 2, 8, 0).is_empty());
        assert!(geom(DType::F32, 2, 2, 0, 4).is_empty());
        let p = combine_plan(DType::BF16, 2, 3, 16, 7).unwrap();
        assert_eq!(
            p.launches[0].args,
            vec![
                Arg::Buf(Buf::In(0)),
                Arg::Buf(Buf::In(1)),
                Arg::Buf(Buf::In(2)),
                Arg::Null,
                Arg::Buf(Buf::Out(0)),
                Arg::U32(3),
                Arg::U32(16),
                Arg::U32(7)
            ]
        );
        assert!(combine_plan(DType::U32, 1, 1, 1, 1).is_err());
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let s = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
        let w = Tensor::zeros((2, 2), DType::F32, &dev).unwrap();
        let err =
            |x: &Tensor, s: &Tensor, w: &Tensor| moe_combine(x, s, w).unwrap_err().to_string();

        assert!(err(&x.to_dtype(DType::F64).unwrap(), &s, &w)
            .contains("expert_out must be f32, bf16 or f16"));
        assert!(err(&x, &s.to_dtype(DType::I64).unwrap(), &w).contains("slot_of must be u32"));
        assert!(err(&x, &s, &w.to_dtype(DType::BF16).unwrap()).contains("weights must be f32"));
        assert!(err(&x.reshape((4, 2, 4)).unwrap(), &s, &w).contains("expert_out must be [R, H]"));
        assert!(err(&x, &s, &w.reshape(4).unwrap()).contains("weights must be [T, A]"));
        assert!(
            err(&x, &s.narrow(0, 0, 3).unwrap(), &w).contains("slot_of must be [T*A] or [T, A]")
        );
        assert!(
            err(&x, &s.reshape((1, 4)).unwrap(), &w).contains("slot_of must be [T*A] or [T, A]")
        );
        let bad = Tensor::new(&[0u32, 1, 4, 3], &dev).unwrap();
        let msg = err(&x, &bad, &w);
        assert!(
            msg.contains("slot_of[2] = 4 (token 1, choice 0)") && msg.contains("4 rows"),
            "{msg}"
        );

        // The op applied directly to a non-contiguous input reports it instead of misreading memory.
        let xt = Tensor::zeros((8, 4), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        let msg = xt
            .apply_op3_no_bwd(&s, &w, &MoeCombine)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("expert_out must be contiguous"), "{msg}");
    }
}
