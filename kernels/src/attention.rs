//! One decode step of grouped-query attention over a preallocated KV cache (flash-decoding).
//!
//! Legend: B batch, H query heads, KV kv heads (H % KV == 0, g = H / KV), CAP cache capacity, L valid length,
//! D head dim.
//!
//! ```text
//! q        [B, H, 1, D]      f32 | bf16 | f16
//! k, v     [B, KV, CAP, D]   same dtype; rows >= L (and, with a window, rows < start) are never read
//! start    = window ? L - min(w, L) : 0      (the query sits at position L - 1 and sees key j iff
//!                                             j <= L - 1 and L - 1 - j < w: the engine's mask rule)
//! s_j      = scale * sum_d f32(q[d]) * f32(k[j, d])    j in start..L, kv head h / g
//! out      [B, H, 1, D] = T(sum_j exp(s_j - max s) * f32(v[j]) / sum_j exp(s_j - max s))
//! ```
//! Softmax and the weighted sum stay in f32 (the engine rounds the probabilities to the activation dtype
//! before its matmul; this op does not). [`decode_attention_reference`] is the specification.
//!
//! The CUDA path (`cuda/decode_attention.cu`, written and compiled without a GPU, NOT YET RUN ON ONE) splits
//! `start..L` into chunks of [`DECODE_ATTN_CHUNK`] keys: one block per (chunk, head, batch) writes the chunk's
//! max, exp-sum and unnormalised f32 output, then a reduce kernel rescales and combines the chunks per head.

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::common::{
    check_act, check_dtype, grid_dim, host, same_device, suffix, At, Elem, StepRow, STEP_KEYS,
    STEP_SLOT, STEP_START,
};
use crate::launch::{plan::step_input, Arg, Buf, Plan};

const OP: &str = "decode_attention";

/// Keys per block of the CUDA chunk kernel (`DA_CHUNK` in `cuda/decode_attention.cu`).
pub const DECODE_ATTN_CHUNK: usize = 256;
/// Largest head dim the CUDA kernel stages in shared memory (`DA_MAX_D`).
pub const DECODE_ATTN_MAX_D: usize = 512;

/// Self-test budgets (not yet measured on a GPU): f32 differs by summation order and expf; bf16/f16 outputs
/// by an ulp where the single final rounding flips.
pub const DECODE_ATTN_NMSE_F32: f64 = 1e-10;
pub const DECODE_ATTN_NMSE_F16: f64 = 1e-6;
pub const DECODE_ATTN_NMSE_BF16: f64 = 1e-5;

/// First visible key of a query at position `len - 1` with an optional sliding window.
pub fn window_start(len: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| len.saturating_sub(w))
}

/// `softmax(q K[start..L]^T * scale) V[start..L]` for one new token per sequence: q `[B, H, 1, D]`, caches
/// `[B, KV, CAP, D]` -> `[B, H, 1, D]`. `sinks` (f32 `[H]`, gpt-oss) adds one logit per head to each
/// softmax's denominator, with no value.
pub fn decode_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    len: usize,
    window: Option<usize>,
    scale: f32,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    decode_attention_keys(
        q,
        k_cache,
        v_cache,
        Keys::Host { len, window },
        scale,
        sinks,
    )
}

/// The cache rows a decode step attends to.
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    /// Rows `window_start(len, window)..len`.
    Host { len: usize, window: Option<usize> },
    /// Rows `first..keys` of a decode step's table row (columns [`STEP_START`], [`STEP_KEYS`]), read by the
    /// kernels as they run; the launch is sized for up to `max` rows (<= CAP), the same at every step.
    Step { row: StepRow<'a>, max: usize },
}

/// [`decode_attention`] over the rows `keys` names.
pub fn decode_attention_keys(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    keys: Keys<'_>,
    scale: f32,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let runs_kernels = crate::launch::runs_kernels(q.device());
    // (len, window) for the checks and the reference; the kernels read a step table themselves.
    let (len, window, step) = match keys {
        Keys::Host { len, window } => (len, window, None),
        Keys::Step { row, max } => {
            same_device(OP, &[("q", q), ("step table", row.table)])?;
            let r = row.check(OP)?;
            match runs_kernels {
                true => (max, None, Some((row.table, r))),
                false => {
                    let (first, keys) = (row.read(STEP_START)?, row.read(STEP_KEYS)?);
                    if keys > max {
                        bail!("{OP}: the step table names {keys} keys, past the bound of {max}");
                    }
                    (keys, Some(keys.saturating_sub(first)), None)
                }
            }
        }
    };
    check_act(OP, "q", q.dtype())?;
    let (b, h, one, d) = q.dims4()?;
    let (kb, kv, cap, kd) = k_cache.dims4()?;
    if one != 1 || kb != b || kd != d || kv == 0 || h % kv != 0 {
        bail!(
            "{OP}: q [B, H, 1, D] and k_cache [B, KV, CAP, D] with H % KV == 0, got {:?} and {:?}",
            q.dims(),
            k_cache.dims()
        );
    }
    if v_cache.dims() != k_cache.dims() {
        bail!(
            "{OP}: v_cache must be {:?}, got {:?}",
            k_cache.dims(),
            v_cache.dims()
        );
    }
    for (n, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        if c.dtype() != q.dtype() {
            bail!("{OP}: {n} must be {:?}, got {:?}", q.dtype(), c.dtype());
        }
    }
    if len == 0 || len > cap || window == Some(0) {
        bail!("{OP}: need 1 <= len <= cap ({cap}) and a window >= 1, got len {len}, window {window:?}");
    }
    same_device(OP, &[("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])?;
    if let Some(s) = sinks {
        check_dtype(OP, "sinks", s, DType::F32)?;
        if s.dims() != [h] {
            bail!("{OP}: sinks must be [{h}], got {:?}", s.dims());
        }
        same_device(OP, &[("q", q), ("sinks", s)])?;
    }
    let dims = (b, h, kv, cap, d);
    if runs_kernels {
        let plan = decode_attention_plan(
            q.dtype(),
            dims,
            (len, window, step.map(|s| s.1)),
            scale,
            sinks.is_some(),
        )?;
        let mut inputs = vec![q, k_cache, v_cache];
        inputs.extend(sinks);
        inputs.extend(step.map(|s| s.0));
        let mut outs = plan.run(&inputs)?;
        return match outs.pop() {
            Some(out) => Ok(out),
            None => bail!("{OP}: the plan returned no output"),
        };
    }
    match q.device() {
        Device::Cpu => {
            fn run<T: Elem>(
                q: &Tensor,
                k: &Tensor,
                v: &Tensor,
                dims: (usize, usize, usize, usize, usize),
                (len, window, scale): (usize, Option<usize>, f32),
                sinks: Option<&[f32]>,
            ) -> Result<Tensor> {
                let out = decode_attention_reference::<T>(
                    &host(q)?,
                    &host(k)?,
                    &host(v)?,
                    dims,
                    (len, window, scale),
                    sinks,
                );
                Tensor::from_vec(out, (dims.0, dims.1, 1, dims.4), &Device::Cpu)
            }
            let s = sinks.map(host::<f32>).transpose()?;
            let (s, a) = (s.as_deref(), (len, window, scale));
            match q.dtype() {
                DType::F32 => run::<f32>(q, k_cache, v_cache, dims, a, s),
                DType::BF16 => run::<half::bf16>(q, k_cache, v_cache, dims, a, s),
                _ => run::<half::f16>(q, k_cache, v_cache, dims, a, s),
            }
        }
        dev => bail!("{OP}: unsupported device {:?}", dev.location()),
    }
}

/// The specification. `q [B*H*D]`, `k`, `v [B*KV*CAP*D]`, `dims = (B, H, KV, CAP, D)`; returns `[B*H*D]`.
/// Reads only rows `window_start(len, window)..len` of the caches. That range must not be empty (the op
/// requires len >= 1 and a window >= 1): over no keys every output would be 0 / 0 = NaN. `sinks [H]`:
/// head h's softmax gets one more logit `sinks[h]` (in its max and its sum) that weighs no value.
pub fn decode_attention_reference<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    dims: (usize, usize, usize, usize, usize),
    (len, window, scale): (usize, Option<usize>, f32),
    sinks: Option<&[f32]>,
) -> Vec<T> {
    let (b, h, kv, cap, d) = dims;
    let g = h / kv;
    let start = window_start(len, window);
    let mut out = Vec::with_capacity(b * h * d);
    let mut s = vec![0f32; len - start];
    let mut acc = vec![0f32; d];
    for bi in 0..b {
        for hi in 0..h {
            let qr = &q[(bi * h + hi) * d..][..d];
            let base = (bi * kv + hi / g) * cap;
            for (j, sj) in (start..len).zip(s.iter_mut()) {
                let kr = &k[(base + j) * d..][..d];
                *sj = scale
                    * qr.iter()
                        .zip(kr)
                        .map(|(a, b)| a.f32() * b.f32())
                        .sum::<f32>();
            }
            let sink = sinks.and_then(|s| s.get(hi).copied());
            let m = s
                .iter()
                .copied()
                .fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
            acc.iter_mut().for_each(|a| *a = 0.0);
            let mut total = sink.map_or(0.0, |s| (s - m).exp());
            for (j, &sj) in (start..len).zip(&s) {
                let p = (sj - m).exp();
                total += p;
                let vr = &v[(base + j) * d..][..d];
                acc.iter_mut().zip(vr).for_each(|(a, x)| *a += p * x.f32());
            }
            out.extend(acc.iter().map(|a| T::of(a / total)));
        }
    }
    out
}

/// Threads per block of both decode attention kernels (`DA_THREADS` in `cuda/decode_attention.cu`).
pub const DECODE_ATTN_THREADS: u32 = 128;

/// The launches of one decode attention step, `dims = (B, H, KV, CAP, D)`: `decode_attention_chunk_<dtype>` on
/// grid (chunks, H, B), chunks = ceil((L - start) / [`DECODE_ATTN_CHUNK`]), writing f32 scratch partials
/// `part_m`, `part_s [B, H, chunks]` and `part_o [B, H, chunks, D]`, then `decode_attention_reduce_<dtype>` on
/// grid (H, B) combining them into `out [B, H, 1, D]`; both with [`DECODE_ATTN_THREADS`] threads. Inputs `q`,
/// `k_cache`, `v_cache` and, with `sinks`, `sinks [H]` (f32; the reduce kernel gets a null pointer
/// otherwise). Nothing is launched when B*H*D = 0. An error for shapes past the kernel's limits and
/// for an empty key range (`start == L`: a softmax over no keys is undefined; the op rejects it up front).
/// With `step = Some(row)` the last input is a decode step's table whose row `row` gives start and L as
/// the kernels run; `len` is then the bound the grid is sized for (`window` must be `None`), the chunk and
/// reduce launches are the same at every step and the chunks past the step's keys write neutral partials.
pub fn decode_attention_plan(
    dtype: DType,
    dims: (usize, usize, usize, usize, usize),
    (len, window, step): (usize, Option<usize>, Option<u32>),
    scale: f32,
    sinks: bool,
) -> Result<Plan> {
    let (b, h, kv, cap, d) = dims;
    let sfx = suffix(dtype)?;
    if kv == 0 || h % kv != 0 {
        bail!("{OP}: {h} query heads cannot share {kv} kv heads");
    }
    if d > DECODE_ATTN_MAX_D {
        bail!("{OP}: the CUDA kernel takes head dims up to {DECODE_ATTN_MAX_D}, got {d}");
    }
    let start = window_start(len, window);
    if len > cap {
        bail!("{OP}: {len} keys exceed the cache's {cap} rows");
    }
    if start >= len {
        bail!("{OP}: no key to attend to: keys {start}..{len} (need len >= 1 and a window >= 1)");
    }
    if step.is_some() && window.is_some() {
        bail!("{OP}: a step table gives the first key itself; no window goes with it");
    }
    let chunks = (len - start).div_ceil(DECODE_ATTN_CHUNK);
    let u = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("{OP}: {what} = {v} exceeds the kernel's u32"))
        })
    };
    let (h32, kv32, cap32, d32) = (u(h, "H")?, u(kv, "KV")?, u(cap, "CAP")?, u(d, "D")?);
    let (start32, len32) = (u(start, "start")?, u(len, "len")?);
    let chunks32 = grid_dim(OP, "key chunks", chunks, u32::MAX >> 1)?;
    let hy = grid_dim(OP, "heads", h, 65535)?;
    let bz = grid_dim(OP, "sequences", b, 65535)?;
    let mut inputs = vec!["q", "k_cache", "v_cache"];
    if sinks {
        inputs.push("sinks");
    }
    let (step_arg, step_row) = step_input(&mut inputs, step);
    let mut p = Plan::new(OP, &inputs);
    let out = p.out("out", dtype, (b, h, 1, d));
    if b * h * d == 0 {
        return Ok(p);
    }
    // Partials: max and exp-sum [B, H, chunks], unnormalised output [B, H, chunks, D], all f32.
    let part_m = p.tmp("part_m", DType::F32, b * h * chunks);
    let part_s = p.tmp("part_s", DType::F32, b * h * chunks);
    let part_o = p.tmp("part_o", DType::F32, b * h * chunks * d);
    let (q, k, v) = (
        Arg::Buf(Buf::In(0)),
        Arg::Buf(Buf::In(1)),
        Arg::Buf(Buf::In(2)),
    );
    // SAFETY (of the executor's launch): matches decode_attention_chunk_<dtype>: block (c, h, b) reads q [B,H,D]
    // and cache rows start + c*CHUNK .. min(len, start + (c+1)*CHUNK) of kv head h / (H/KV), writes
    // part_m/part_s [B,H,chunks] and part_o [B,H,chunks,D] at (b, h, c).
    p.launch(
        "decode_attention",
        format!("decode_attention_chunk_{sfx}"),
        [chunks32, hy, bz],
        [DECODE_ATTN_THREADS, 1, 1],
        vec![
            q,
            k,
            v,
            part_m,
            part_s,
            part_o,
            Arg::U32(h32),
            Arg::U32(kv32),
            Arg::U32(cap32),
            Arg::U32(d32),
            Arg::U32(start32),
            Arg::U32(len32),
            Arg::U32(chunks32),
            Arg::F32(scale),
            step_arg,
            Arg::U32(step_row),
        ],
    );
    // SAFETY (of the executor's launch): matches decode_attention_reduce_<dtype>: block (h, b) reads the chunk
    // partials of (b, h) written above on the same stream and writes out [B,H,D] at (b, h).
    p.launch(
        "decode_attention",
        format!("decode_attention_reduce_{sfx}"),
        [hy, bz, 1],
        [DECODE_ATTN_THREADS, 1, 1],
        vec![
            part_m,
            part_s,
            part_o,
            match sinks {
                true => Arg::Buf(Buf::In(3)),
                false => Arg::Null,
            },
            out,
            Arg::U32(h32),
            Arg::U32(d32),
            Arg::U32(chunks32),
            step_arg,
            Arg::U32(step_row),
            Arg::U32(cap32),
        ],
    );
    Ok(p)
}

const KV_OP: &str = "kv_store";

/// Writes a decode step's keys and values `k [B, KV, 1, DK]`, `v [B, KV, 1, DV]` into row `slot` of
/// `k_cache [B, KV, CAP, DK]`, `v_cache [B, KV, CAP, DV]` (contiguous) in place. The slot is fixed, or read by the kernel from a step table's
/// column [`STEP_SLOT`] (then one launch serves every step); a slot >= CAP writes nothing.
pub fn kv_store(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    slot: At<'_>,
) -> Result<()> {
    check_act(KV_OP, "k", k.dtype())?;
    let (b, kv, one, dk) = k.dims4()?;
    let dv = v.dim(3)?;
    let cap = k_cache.dim(2)?;
    // k [B, KV, 1, DK] into k_cache [B, KV, CAP, DK]; v [B, KV, 1, DV] into v_cache [B, KV, CAP, DV].
    if one != 1 {
        bail!(
            "{KV_OP}: k must hold one new row per head, got {:?}",
            k.dims()
        );
    }
    for (n, t, want) in [
        ("v", v, [b, kv, 1, dv]),
        ("k_cache", k_cache, [b, kv, cap, dk]),
        ("v_cache", v_cache, [b, kv, cap, dv]),
    ] {
        if t.dims() != want || t.dtype() != k.dtype() {
            bail!(
                "{KV_OP}: {n} must be {want:?} {:?}, got {:?} {:?}",
                k.dtype(),
                t.dims(),
                t.dtype()
            );
        }
    }
    if !k_cache.is_contiguous() || !v_cache.is_contiguous() {
        bail!("{KV_OP}: the caches are written in place and must be contiguous");
    }
    same_device(
        KV_OP,
        &[
            ("k", k),
            ("v", v),
            ("k_cache", k_cache),
            ("v_cache", v_cache),
        ],
    )?;
    let step = match slot {
        At::Step(s) => {
            same_device(KV_OP, &[("k", k), ("step table", s.table)])?;
            Some((s.table, s.check(KV_OP)?))
        }
        At::Host(_) => None,
    };
    if crate::launch::runs_kernels(k.device()) {
        let host_slot = match slot {
            At::Host(s) => s,
            At::Step(_) => 0,
        };
        let plan = kv_store_plan(
            k.dtype(),
            (b, kv, cap, dk, dv),
            (host_slot, step.map(|s| s.1)),
        )?;
        let mut inputs = vec![k, v, k_cache, v_cache];
        inputs.extend(step.map(|s| s.0));
        plan.run(&inputs)?;
        return Ok(());
    }
    let slot = slot.value(STEP_SLOT)?;
    if slot < cap {
        k_cache.slice_set(&k.contiguous()?, 2, slot)?;
        v_cache.slice_set(&v.contiguous()?, 2, slot)?;
    }
    Ok(())
}

/// The launch of `kv_store_<dtype>` on grid (KV, B) with [`DECODE_ATTN_THREADS`] threads: inputs `k`, `v`,
/// `k_cache`, `v_cache` (the last two written in place) and with `step = Some(row)` the step table, whose
/// row gives the slot (`slot` is then unused). `dims = (B, KV, CAP, DK, DV)`. Pure.
pub fn kv_store_plan(
    dtype: DType,
    (b, kv, cap, dk, dv): (usize, usize, usize, usize, usize),
    (slot, step): (usize, Option<u32>),
) -> Result<Plan> {
    let mut inputs = vec!["k", "v", "k_cache", "v_cache"];
    let (step_arg, step_row) = step_input(&mut inputs, step);
    let mut p = Plan::new(KV_OP, &inputs);
    p.write_in_place(2);
    p.write_in_place(3);
    let u = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| {
            candle_core::Error::Msg(format!("{KV_OP}: {what} = {v} exceeds the kernel's u32"))
        })
    };
    let (kv32, cap32, dk32, dv32) = (u(kv, "KV")?, u(cap, "CAP")?, u(dk, "DK")?, u(dv, "DV")?);
    // A fixed slot past the cache writes nothing: u32::MAX says so to the kernel.
    let slot32 = u32::try_from(slot).unwrap_or(u32::MAX);
    if dk + dv == 0 {
        return Ok(p);
    }
    let input = |i| Arg::Buf(Buf::In(i));
    // SAFETY (of the executor's launch): matches kv_store_<dtype>: block (h, b) reads k [B,KV,1,DK] and
    // v [B,KV,1,DV] at (b, h) and writes row slot < CAP of k_cache [B,KV,CAP,DK] and v_cache [B,KV,CAP,DV].
    p.launch(
        "decode_attention",
        format!("kv_store_{}", suffix(dtype)?),
        [
            grid_dim(KV_OP, "kv heads", kv, u32::MAX >> 1)?,
            grid_dim(KV_OP, "sequences", b, 65535)?,
            1,
        ],
        [DECODE_ATTN_THREADS, 1, 1],
        vec![
            input(0),
            input(1),
            input(2),
            input(3),
            Arg::U32(kv32),
            Arg::U32(cap32),
            Arg::U32(dk32),
            Arg::U32(dv32),
            Arg::U32(slot32),
            step_arg,
            Arg::U32(step_row),
        ],
    );
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_geometry() {
        let summary = |p: &Plan| {
            p.launches
                .iter()
                .map(|l| (l.entry.clone(), l.grid, l.block))
                .collect::<Vec<_>>()
        };
        let t = DECODE_ATTN_THREADS;
        // B=2, H=12 over KV=4, 7 keys: one chunk per head.
        let p = decode_attention_plan(
            DType::BF16,
            (2, 12, 4, 20, 128),
            (7, None, None),
            0.5,
            false,
        )
        .unwrap();
        assert_eq!(p.inputs, vec!["q", "k_cache", "v_cache"]);
        assert_eq!(p.outs[0].shape.dims(), &[2, 12, 1, 128]);
        assert_eq!(p.outs[0].dtype, DType::BF16);
        assert_eq!(
            p.tmps
                .iter()
                .map(|a| (a.name, a.dtype, a.shape.elem_count()))
                .collect::<Vec<_>>(),
            vec![
                ("part_m", DType::F32, 24),
                ("part_s", DType::F32, 24),
                ("part_o", DType::F32, 24 * 128)
            ]
        );
        assert_eq!(
            summary(&p),
            vec![
                (
                    "decode_attention_chunk_bf16".to_string(),
                    [1, 12, 2],
                    [t, 1, 1]
                ),
                (
                    "decode_attention_reduce_bf16".to_string(),
                    [12, 2, 1],
                    [t, 1, 1]
                )
            ]
        );
        let (m, s, o) = (
            Arg::Buf(Buf::Tmp(0)),
            Arg::Buf(Buf::Tmp(1)),
            Arg::Buf(Buf::Tmp(2)),
        );
        assert_eq!(
            p.launches[0].args,
            vec![
                Arg::Buf(Buf::In(0)),
                Arg::Buf(Buf::In(1)),
                Arg::Buf(Buf::In(2)),
                m,
                s,
                o,
                Arg::U32(12),
                Arg::U32(4),
                Arg::U32(20),
                Arg::U32(128),
                Arg::U32(0),
                Arg::U32(7),
                Arg::U32(1),
                Arg::F32(0.5),
                Arg::Null,
                Arg::U32(0)
            ]
        );
        assert_eq!(
            p.launches[1].args,
            vec![
                m,
                s,
                o,
                Arg::Null,
                Arg::Buf(Buf::Out(0)),
                Arg::U32(12),
                Arg::U32(128),
                Arg::U32(1),
                Arg::Null,
                Arg::U32(0),
                Arg::U32(20)
            ]
        );
        // 513 keys: two full chunks and a partial one of a single key.
        let p = decode_attention_plan(
            DType::F32,
            (1, 7, 1, 600, 80),
            (513, None, None),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(p.launches[0].grid, [3, 7, 1]);
        assert_eq!(p.tmps[2].shape.elem_count(), 7 * 3 * 80);
        // A window of 257 over 513 keys starts at 256: 257 keys in 2 chunks; a window of 256 fits one.
        let p = decode_attention_plan(
            DType::F16,
            (1, 7, 1, 600, 80),
            (513, Some(257), None),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(p.launches[0].grid, [2, 7, 1]);
        assert_eq!(
            &p.launches[0].args[10..13],
            &[Arg::U32(256), Arg::U32(513), Arg::U32(2)]
        );
        let p = decode_attention_plan(
            DType::F16,
            (1, 7, 1, 600, 80),
            (513, Some(256), None),
            1.0,
            false,
        )
        .unwrap();
        assert_eq!(p.launches[0].grid, [1, 7, 1]);
        // A step table (row 5) bounded by 600 keys: three chunks at every step, start and L read by the
        // kernels (the scalars are the bound's); the table is the last input, after the sinks.
        let p = decode_attention_plan(
            DType::F32,
            (1, 7, 1, 600, 80),
            (600, None, Some(5)),
            1.0,
            true,
        )
        .unwrap();
        assert_eq!(p.inputs, ["q", "k_cache", "v_cache", "sinks", "step"]);
        assert_eq!(p.launches[0].grid, [3, 7, 1]);
        assert_eq!(
            &p.launches[0].args[10..],
            &[
                Arg::U32(0),
                Arg::U32(600),
                Arg::U32(3),
                Arg::F32(1.0),
                Arg::Buf(Buf::In(4)),
                Arg::U32(5)
            ]
        );
        assert!(decode_attention_plan(
            DType::F32,
            (1, 7, 1, 600, 80),
            (600, Some(4), Some(5)),
            1.0,
            true
        )
        .is_err());
        // D = 0: nothing to compute, nothing launched.
        let p = decode_attention_plan(DType::F32, (1, 2, 1, 4, 0), (3, None, None), 1.0, false)
            .unwrap();
        assert!(p.launches.is_empty() && p.tmps.is_empty());
        // Past the kernel's limits.
        let plan = |dims, len, window| {
            decode_attention_plan(DType::F32, dims, (len, window, None), 1.0, false)
        };
        assert!(plan((1, 2, 1, 8, DECODE_ATTN_MAX_D + 1), 3, None).is_err());
        assert!(plan((1, 65536, 1, 8, 64), 3, None).is_err());
        assert!(plan((65536, 2, 1, 8, 64), 3, None).is_err());
        assert!(plan((1, 3, 2, 8, 64), 3, None).is_err());
    }

    #[test]
    fn empty_key_range_is_an_error() {
        // start == len (no cache yet, or a window of 0): a softmax over no keys. The reference would give
        // 0 / 0 = NaN and the kernels would launch only the reduce (the chunk grid is empty) and give NaN too,
        // so the op and the plan both reject it before anything runs (the engine's config already rejects a
        // sliding window of 0, and its decode step always has len >= 1).
        let plan = |len, window| {
            decode_attention_plan(DType::F32, (1, 2, 1, 8, 4), (len, window, None), 1.0, false)
        };
        for (len, window) in [(0, None), (0, Some(4)), (3, Some(0))] {
            let e = plan(len, window).unwrap_err().to_string();
            assert!(e.contains("no key to attend to"), "{e}");
        }
        assert!(plan(9, None)
            .unwrap_err()
            .to_string()
            .contains("exceed the cache"));
        assert!(plan(1, Some(1)).is_ok() && plan(8, Some(1)).is_ok());
        let q = Tensor::zeros((1, 2, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let k = Tensor::zeros((1, 1, 8, 4), DType::F32, &Device::Cpu).unwrap();
        for (len, window) in [(0, None), (3, Some(0))] {
            let e = decode_attention(&q, &k, &k, len, window, 1.0, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("need 1 <= len <= cap"), "{e}");
        }
    }

    #[test]
    fn one_key_returns_its_value_and_window_hides_old_keys() {
        // B=1, H=2, KV=1, CAP=4, D=2; L=3, window 1 -> only key 2 is visible.
        let q = Tensor::new(&[1.0f32, 0.0, 0.0, 1.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 2))
            .unwrap();
        let k = Tensor::new(
            &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, f32::NAN, f32::NAN],
            &Device::Cpu,
        )
        .unwrap()
        .reshape((1, 1, 4, 2))
        .unwrap();
        let v = (&k * 10.0).unwrap();
        let out: Vec<f32> = decode_attention(&q, &k, &v, 3, Some(1), 0.5, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, vec![50.0, 60.0, 50.0, 60.0]);
        // No window: head 0 scores 0.5*[1, 3, 5].
        let out: Vec<f32> = decode_attention(&q, &k, &v, 3, None, 0.5, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let e: Vec<f32> = [0.5f32, 1.5, 2.5].iter().map(|s| (s - 2.5).exp()).collect();
        let tot: f32 = e.iter().sum();
        let want0 = (e[0] * 10.0 + e[1] * 30.0 + e[2] * 50.0) / tot;
        assert!((out[0] - want0).abs() < 1e-4, "{} vs {want0}", out[0]);
        assert!(decode_attention(&q, &k, &v, 5, None, 0.5, None).is_err());
        // A sink logit per head joins the denominator only: head 0's sink of 2.0 beside scores
        // 0.5*[1, 3, 5]; head 1's sink of -inf changes nothing.
        let sinks = Tensor::new(&[2.0f32, f32::NEG_INFINITY], &Device::Cpu).unwrap();
        let out: Vec<f32> = decode_attention(&q, &k, &v, 3, None, 0.5, Some(&sinks))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let sink0 = want0 * tot / (tot + (2.0f32 - 2.5).exp());
        assert!((out[0] - sink0).abs() < 1e-4, "{} vs {sink0}", out[0]);
        let plain: Vec<f32> = decode_attention(&q, &k, &v, 3, None, 0.5, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((out[2] - plain[2]).abs() < 1e-6 && (out[3] - plain[3]).abs() < 1e-6);
        let wrong = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        let e = decode_attention(&q, &k, &v, 3, None, 0.5, Some(&wrong)).unwrap_err();
        assert!(e.to_string().contains("sinks"), "{e}");
    }
}
