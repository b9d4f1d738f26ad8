//! The CPU expert MLPs of an MoE layer on a host dispatch, gate and up fused with SwiGLU:
//!
//! ```text
//! act[r, j] = silu(x[t_r] . Wg[e, j]) * (x[t_r] . Wu[e, j])     j < F, rows r of expert e, t_r = row_token[r]
//! out[r, i] = act[r] . Wd[e, i]                                  i < H
//! ```
//!
//! With [`Epilogue`] (gpt-oss): `g += bg[e]`, `u += bu[e]` before the activation, which may be the clamped
//! SwiGLU `(clamp(u, ±l) + 1) * g' * sigmoid(a * g')`, `g' = min(g, l)`, and `out += bd[e]`.
//!
//! `gate_up` is `[E, 2F, H]` (gate rows first, then up), `down` `[E, H, F]`, in any [`Rows`] format; `x` is
//! `[T, H]` f32, `out` `[R, H]` f32 in dispatch (expert-sorted) row order. Two parallel phases on the rayon
//! pool, each split into tasks of (expert, block of output features); a task decodes each weight row once for
//! up to [`MAX_ROWS`] of the expert's rows at a time, so decode (one row per expert) streams every active
//! weight exactly once and prefill re-reads a weight row once per 4 rows, from cache.

use rayon::prelude::*;

use super::q8::{dots_q8, Q8Rows};
use super::simd::{decode_row, dots, group_sums, Level, Mat, Rows, MAX_ROWS};

/// Multiply-adds a task aims for: a phase's work over [`TASKS_PER_THREAD`] tasks per thread (so that
/// an uneven start or a busy core still balances), within these bounds: the lower keeps rayon's
/// per-task cost (~1 us) small, the upper keeps tasks many when the phase is big. Measured on
/// Mixtral-8x7B's expert shapes (`cargo bench -p moe-kernels --bench cpu_expert_stream`, 2 threads):
/// fixed 2^15-MAC tasks streamed bf16 at 80% and q8 INT8 at 76% of the read bandwidth, 2^21 at 95%
/// and 87%.
const TASK_MACS: (usize, usize) = (1 << 15, 1 << 21);

/// See [`TASK_MACS`].
const TASKS_PER_THREAD: usize = 8;

/// Below this many multiply-adds a phase runs on the calling thread: waking the pool costs more.
const SERIAL_MACS: usize = 1 << 17;

/// From this many rows per expert (prefill), a task dequantizes its block of weight rows to f32 once and
/// multiplies with the `gemm` crate's cache-blocked kernel; fewer rows take the dot kernels of [`dots`].
pub const GEMM_MIN_ROWS: usize = 16;

/// Output features per task on the GEMM path.
const GEMM_BLOCK: usize = 64;

/// A raw pointer that tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of elements (its expert's rows x its block of features), and the
// buffer outlives the parallel loop that uses it.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `i` is in the buffer and no other task writes element `i`.
    unsafe fn write(&self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

/// What an expert computes between gate_up and down (the activation of gate `g` and up `u`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    /// `silu(g) * u`.
    #[default]
    SwiGlu,
    /// gpt-oss: `g' = min(g, limit)`, `(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`.
    ClampedSwiGlu { alpha: f32, limit: f32 },
}

impl Activation {
    #[inline]
    pub fn apply(self, g: f32, u: f32) -> f32 {
        match self {
            Activation::SwiGlu => g / (1.0 + (-g).exp()) * u,
            Activation::ClampedSwiGlu { alpha, limit } => {
                let g = g.min(limit);
                (u.clamp(-limit, limit) + 1.0) * g / (1.0 + (-alpha * g).exp())
            }
        }
    }
}

/// The activation and the per-expert biases of gpt-oss's experts: `gate_up_bias [E', 2F]` (gate, then up)
/// and `down_bias [E', H]`, f32, indexed by `bias_index(e)` for the weights' expert `e` (the identity, or a
/// placed share's global ids).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub act: Activation,
    pub gate_up_bias: Option<&'a [f32]>,
    pub down_bias: Option<&'a [f32]>,
    /// The global id of each of the weights' experts (`None`: the same ids).
    pub experts: Option<&'a [usize]>,
}

impl Epilogue<'_> {
    fn bias_expert(&self, e: usize) -> usize {
        self.experts
            .and_then(|ids| ids.get(e).copied())
            .unwrap_or(e)
    }

    /// Checks the bias lengths against `e` experts (global ids in range), `f` and `h`.
    pub fn check(&self, e: usize, f: usize, h: usize) -> Result<(), String> {
        let n = match self.experts {
            Some(ids) if ids.len() != e => {
                return Err(format!("{} expert ids for {e} experts", ids.len()))
            }
            Some(ids) => ids.iter().max().map_or(0, |m| m + 1),
            None => e,
        };
        for (name, b, w) in [
            ("gate_up_bias", self.gate_up_bias, 2 * f),
            ("down_bias", self.down_bias, h),
        ] {
            if let Some(b) = b.filter(|b| b.len() < n * w) {
                return Err(format!(
                    "{name} has {} values, {n} experts need {}",
                    b.len(),
                    n * w
                ));
            }
        }
        Ok(())
    }
}

/// One task: rows `lo..hi` (one expert's), output features `j0..j0 + nj`.
#[derive(Debug, Clone, Copy)]
struct Task {
    e: usize,
    lo: usize,
    hi: usize,
    j0: usize,
    nj: usize,
}

/// The tasks of one phase over the experts with rows, and the phase's multiply-adds.
fn tasks(offsets: &[u32], n_out: usize, k: usize) -> (Vec<Task>, usize) {
    let mut t = Vec::new();
    let macs = offsets[offsets.len() - 1] as usize * n_out * k;
    let task_macs =
        (macs / (TASKS_PER_THREAD * rayon::current_num_threads())).clamp(TASK_MACS.0, TASK_MACS.1);
    for (e, w) in offsets.windows(2).enumerate() {
        let (lo, hi) = (w[0] as usize, w[1] as usize);
        if hi == lo {
            continue;
        }
        let block = if hi - lo >= GEMM_MIN_ROWS {
            GEMM_BLOCK
        } else {
            (task_macs / ((hi - lo).min(MAX_ROWS) * k).max(1)).max(4)
        }
        .min(n_out.max(1));
        t.extend((0..n_out).step_by(block).map(|j0| Task {
            e,
            lo,
            hi,
            j0,
            nj: block.min(n_out - j0),
        }));
    }
    (t, macs)
}

/// A number unique to one kernel call (the key of the per-thread quantized activations).
fn next_epoch() -> u64 {
    static EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f` on every task: on the pool, or on this thread when the phase is small.
fn run(tasks: &[Task], macs: usize, f: impl Fn(&Task) + Sync + Send) {
    if macs < SERIAL_MACS {
        tasks.iter().for_each(f);
    } else {
        tasks.par_iter().for_each(f);
    }
}

thread_local! {
    /// Per-thread scratch of the tasks: dequantized weight block, and two output blocks.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = Default::default();
    /// Per-thread quantized activations of [`Level::Avx2Q8`].
    static Q8: std::cell::RefCell<Q8Rows> = Default::default();
}

/// `y [n, nj] = x [n, k] . W[w0 .. w0 + nj]^T` for `n = x.len() / k` contiguous activation rows: the dot
/// kernels for few rows, dequantize-once + `gemm` for many. `wbuf` is scratch.
#[allow(clippy::too_many_arguments)]
fn block(
    epoch: u64,
    level: Level,
    w: &Mat,
    w0: usize,
    nj: usize,
    x: &[f32],
    y: &mut [f32],
    wbuf: &mut Vec<f32>,
) {
    let k = w.k;
    let n = x.len() / k.max(1);
    if n >= GEMM_MIN_ROWS {
        let wt: &[f32] = match w.data {
            Rows::F32(d) => &d[w0 * k..(w0 + nj) * k],
            _ => {
                wbuf.resize(nj * k, 0.0);
                for j in 0..nj {
                    decode_row(level, w, w0 + j, &mut wbuf[j * k..(j + 1) * k]);
                }
                &wbuf[..nj * k]
            }
        };
        // SAFETY: y is n x nj (row stride nj), x n x k (row stride k), wt nj x k read as its transpose
        // (k x nj: row stride 1, column stride k); every extent is within the slices.
        unsafe {
            gemm::gemm(
                n,
                nj,
                k,
                y.as_mut_ptr(),
                1,
                nj as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                wt.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        return;
    }
    if level == Level::Avx2Q8 {
        let done = Q8.with(|q8| {
            let xq = &mut *q8.borrow_mut();
            if !xq.quantize(w, x, epoch) {
                return false;
            }
            let mut o = [0f32; MAX_ROWS];
            for r0 in (0..n).step_by(MAX_ROWS) {
                let c = (n - r0).min(MAX_ROWS);
                for j in 0..nj {
                    dots_q8(w, w0 + j, xq, r0, c, &mut o);
                    for i in 0..c {
                        y[(r0 + i) * nj + j] = o[i];
                    }
                }
            }
            true
        });
        if done {
            return;
        }
    }
    let mut sums: [Vec<f32>; MAX_ROWS] = Default::default();
    for r0 in (0..n).step_by(MAX_ROWS) {
        let c = (n - r0).min(MAX_ROWS);
        let xs: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| &x[(r0 + i.min(c - 1)) * k..][..k]);
        for i in 0..c {
            group_sums(w, xs[i], &mut sums[i]);
        }
        let sm: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| sums[i].as_slice());
        let mut o = [0f32; MAX_ROWS];
        for j in 0..nj {
            dots(level, w, w0 + j, &xs[..c], &sm[..c], &mut o);
            for i in 0..c {
                y[(r0 + i) * nj + j] = o[i];
            }
        }
    }
}

/// Checks the shapes; returns `(E, F, H)`.
pub fn check(
    x_len: usize,
    h: usize,
    row_token: &[u32],
    offsets: &[u32],
    gate_up: &Mat,
    down: &Mat,
) -> Result<(usize, usize, usize), String> {
    let e = offsets.len().checked_sub(1).ok_or("offsets is empty")?;
    if e == 0 || !gate_up.rows.is_multiple_of(e) || !down.rows.is_multiple_of(e) {
        return Err(format!(
            "{e} experts do not divide gate_up's {} rows and down's {} rows",
            gate_up.rows, down.rows
        ));
    }
    let f = gate_up.rows / e / 2;
    if gate_up.k != h || down.rows / e != h || down.k != f || 2 * f * e != gate_up.rows {
        return Err(format!(
            "shapes: x [.., {h}], gate_up [{e}, {}, {}], down [{e}, {}, {}]",
            gate_up.rows / e,
            gate_up.k,
            down.rows / e,
            down.k
        ));
    }
    gate_up.check().map_err(|m| format!("gate_up {m}"))?;
    down.check().map_err(|m| format!("down {m}"))?;
    if h == 0 || !x_len.is_multiple_of(h) {
        return Err(format!("x has {x_len} elements, not a multiple of H = {h}"));
    }
    let t = x_len / h;
    if offsets.windows(2).any(|w| w[1] < w[0]) || offsets[0] != 0 {
        return Err("offsets must start at 0 and not decrease".into());
    }
    if offsets[e] as usize != row_token.len() {
        return Err(format!(
            "offsets end at {} but row_token has {} rows",
            offsets[e],
            row_token.len()
        ));
    }
    if let Some(bad) = row_token.iter().find(|&&r| r as usize >= t) {
        return Err(format!("row_token holds token {bad}, x has {t} tokens"));
    }
    Ok((e, f, h))
}

/// The expert MLPs (see the module docs). Shapes must have passed [`check`] (and `ep` its own check).
/// `xg` and `act` are scratch, resized here.
#[allow(clippy::too_many_arguments)]
pub fn experts(
    level: Level,
    x: &[f32],
    h: usize,
    row_token: &[u32],
    offsets: &[u32],
    gate_up: &Mat,
    down: &Mat,
    ep: &Epilogue,
    xg: &mut Vec<f32>,
    act: &mut Vec<f32>,
    out: &mut [f32],
) {
    let f = down.k;
    let epoch = next_epoch();
    // The dispatched rows' activations, gathered once: every expert's rows are then contiguous.
    xg.clear();
    for &t in row_token {
        xg.extend_from_slice(&x[t as usize * h..][..h]);
    }
    act.clear();
    act.resize(row_token.len() * f, 0.0);
    // Phase 1: act = silu(gate) * up, tasks over (expert, block of F).
    let a = Out(act.as_mut_ptr());
    let xg = &xg[..];
    let (t1, macs1) = tasks(offsets, f, 2 * h);
    run(&t1, macs1, |t| {
        SCRATCH.with(|s| {
            let [wbuf, g, u] = &mut *s.borrow_mut();
            let n = t.hi - t.lo;
            g.resize(n * t.nj, 0.0);
            u.resize(n * t.nj, 0.0);
            let xs = &xg[t.lo * h..t.hi * h];
            block(epoch, level, gate_up, t.e * 2 * f + t.j0, t.nj, xs, g, wbuf);
            block(
                epoch,
                level,
                gate_up,
                t.e * 2 * f + f + t.j0,
                t.nj,
                xs,
                u,
                wbuf,
            );
            let bias = ep
                .gate_up_bias
                .map(|b| &b[ep.bias_expert(t.e) * 2 * f..][..2 * f]);
            for r in 0..n {
                for j in 0..t.nj {
                    let (mut gv, mut uv) = (g[r * t.nj + j], u[r * t.nj + j]);
                    if let Some(b) = bias {
                        gv += b[t.j0 + j];
                        uv += b[f + t.j0 + j];
                    }
                    // SAFETY: row t.lo + r belongs to this task's expert, feature t.j0 + j to its block.
                    unsafe { a.write((t.lo + r) * f + t.j0 + j, ep.act.apply(gv, uv)) };
                }
            }
        })
    });
    // Phase 2: out = act . Wd^T, tasks over (expert, block of H).
    let o = Out(out.as_mut_ptr());
    let act = &act[..];
    let (t2, macs2) = tasks(offsets, h, f);
    run(&t2, macs2, |t| {
        SCRATCH.with(|s| {
            let [wbuf, y, _] = &mut *s.borrow_mut();
            let n = t.hi - t.lo;
            y.resize(n * t.nj, 0.0);
            block(
                epoch,
                level,
                down,
                t.e * h + t.j0,
                t.nj,
                &act[t.lo * f..t.hi * f],
                y,
                wbuf,
            );
            let bias = ep.down_bias.map(|b| &b[ep.bias_expert(t.e) * h..][..h]);
            for r in 0..n {
                for j in 0..t.nj {
                    let b = bias.map_or(0.0, |b| b[t.j0 + j]);
                    // SAFETY: as in phase 1.
                    unsafe { o.write((t.lo + r) * h + t.j0 + j, y[r * t.nj + j] + b) };
                }
            }
        })
    });
}

/// `out [M, N] = x [M, K] W^T` for one weight matrix `[N, K]`, on the pool: tasks over blocks of N.
pub fn linear(level: Level, x: &[f32], w: &Mat, out: &mut [f32]) {
    let (k, n) = (w.k, w.rows);
    let m = x.len() / k.max(1);
    let epoch = next_epoch();
    let o = Out(out.as_mut_ptr());
    let (ts, macs) = tasks(&[0, m as u32], n, k);
    run(&ts, macs, |t| {
        SCRATCH.with(|s| {
            let [wbuf, y, _] = &mut *s.borrow_mut();
            y.resize(m * t.nj, 0.0);
            block(epoch, level, w, t.j0, t.nj, x, y, wbuf);
            for r in 0..m {
                for j in 0..t.nj {
                    // SAFETY: each task owns its block of output features.
                    unsafe { o.write(r * n + t.j0 + j, y[r * t.nj + j]) };
                }
            }
        })
    });
}

/// Whether `m` is a format these kernels read (every [`Rows`] is).
pub fn supported(m: &Mat) -> bool {
    !matches!(m.data, Rows::Int4 { group, .. } if group == 0 || group % 2 != 0)
}
