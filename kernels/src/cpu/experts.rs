//! The CPU expert MLPs of an MoE layer on a host dispatch, gate and up fused with SwiGLU:
//!
//! ```text
//! act[r, j] = silu(x[t_r] . Wg[e, j]) * (x[t_r] . Wu[e, j])     j < F, rows r of expert e, t_r = row_token[r]
//! out[r, i] = act[r] . Wd[e, i]                                  i < H
//! ```
//!
//! `gate_up` is `[E, 2F, H]` (gate rows first, then up), `down` `[E, H, F]`, in any [`Rows`] format; `x` is
//! `[T, H]` f32, `out` `[R, H]` f32 in dispatch (expert-sorted) row order. Two parallel phases on the rayon
//! pool, each split into tasks of (expert, block of output features); a task decodes each weight row once for
//! up to [`MAX_ROWS`] of the expert's rows at a time, so decode (one row per expert) streams every active
//! weight exactly once and prefill re-reads a weight row once per 4 rows, from cache.

use rayon::prelude::*;

use super::simd::{dots, group_sums, Level, Mat, Rows, MAX_ROWS};

/// Multiply-adds a task aims for: big enough that rayon's per-task cost is noise, small enough that a
/// decode step over 2 experts still splits over every thread.
const TASK_MACS: usize = 1 << 15;

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

/// The tasks of one phase: `(expert, first feature, features)` over the experts with rows.
fn tasks(offsets: &[u32], n_out: usize, k: usize) -> Vec<(usize, usize, usize)> {
    let mut t = Vec::new();
    for (e, w) in offsets.windows(2).enumerate() {
        let rows = (w[1] - w[0]) as usize;
        if rows == 0 {
            continue;
        }
        let block = (TASK_MACS / (rows.min(MAX_ROWS) * k).max(1))
            .max(4)
            .min(n_out.max(1));
        t.extend(
            (0..n_out)
                .step_by(block)
                .map(|j| (e, j, block.min(n_out - j))),
        );
    }
    t
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

/// The expert MLPs (see the module docs). Shapes must have passed [`check`]. `act` is scratch, resized here.
#[allow(clippy::too_many_arguments)]
pub fn experts(
    level: Level,
    x: &[f32],
    h: usize,
    row_token: &[u32],
    offsets: &[u32],
    gate_up: &Mat,
    down: &Mat,
    act: &mut Vec<f32>,
    out: &mut [f32],
) {
    let r_total = row_token.len();
    let f = down.k;
    act.clear();
    act.resize(r_total * f, 0.0);
    // Phase 1: act = silu(gate) * up, tasks over (expert, block of F).
    let a = Out(act.as_mut_ptr());
    tasks(offsets, f, 2 * h)
        .par_iter()
        .for_each(|&(e, j0, nj)| {
            let (lo, hi) = (offsets[e] as usize, offsets[e + 1] as usize);
            let mut sums: [Vec<f32>; MAX_ROWS] = Default::default();
            for r0 in (lo..hi).step_by(MAX_ROWS) {
                let n = (hi - r0).min(MAX_ROWS);
                let xs: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| {
                    let t = row_token[r0 + i.min(n - 1)] as usize;
                    &x[t * h..(t + 1) * h]
                });
                for i in 0..n {
                    group_sums(gate_up, xs[i], &mut sums[i]);
                }
                let sm: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| sums[i].as_slice());
                let (mut g, mut u) = ([0f32; MAX_ROWS], [0f32; MAX_ROWS]);
                for j in j0..j0 + nj {
                    dots(level, gate_up, e * 2 * f + j, &xs[..n], &sm[..n], &mut g);
                    dots(
                        level,
                        gate_up,
                        e * 2 * f + f + j,
                        &xs[..n],
                        &sm[..n],
                        &mut u,
                    );
                    for i in 0..n {
                        let v = g[i] / (1.0 + (-g[i]).exp()) * u[i];
                        // SAFETY: row r0 + i belongs to expert e and feature j to this task's block only.
                        unsafe { a.write((r0 + i) * f + j, v) };
                    }
                }
            }
        });
    // Phase 2: out = act . Wd^T, tasks over (expert, block of H).
    let o = Out(out.as_mut_ptr());
    let act = &act[..];
    tasks(offsets, h, f).par_iter().for_each(|&(e, i0, ni)| {
        let (lo, hi) = (offsets[e] as usize, offsets[e + 1] as usize);
        let mut sums: [Vec<f32>; MAX_ROWS] = Default::default();
        for r0 in (lo..hi).step_by(MAX_ROWS) {
            let n = (hi - r0).min(MAX_ROWS);
            let xs: [&[f32]; MAX_ROWS] =
                std::array::from_fn(|i| &act[(r0 + i.min(n - 1)) * f..][..f]);
            for i in 0..n {
                group_sums(down, xs[i], &mut sums[i]);
            }
            let sm: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| sums[i].as_slice());
            let mut y = [0f32; MAX_ROWS];
            for c in i0..i0 + ni {
                dots(level, down, e * h + c, &xs[..n], &sm[..n], &mut y);
                for (i, &v) in y.iter().enumerate().take(n) {
                    // SAFETY: as in phase 1.
                    unsafe { o.write((r0 + i) * h + c, v) };
                }
            }
        }
    });
}

/// `out [M, N] = x [M, K] W^T` for one weight matrix `[N, K]`, on the pool: tasks over blocks of N.
pub fn linear(level: Level, x: &[f32], w: &Mat, out: &mut [f32]) {
    let (k, n) = (w.k, w.rows);
    let m = x.len() / k.max(1);
    let offsets = [0, m as u32];
    let o = Out(out.as_mut_ptr());
    tasks(&offsets, n, k).par_iter().for_each(|&(_, j0, nj)| {
        let mut sums: [Vec<f32>; MAX_ROWS] = Default::default();
        for r0 in (0..m).step_by(MAX_ROWS) {
            let cnt = (m - r0).min(MAX_ROWS);
            let xs: [&[f32]; MAX_ROWS] =
                std::array::from_fn(|i| &x[(r0 + i.min(cnt - 1)) * k..][..k]);
            for i in 0..cnt {
                group_sums(w, xs[i], &mut sums[i]);
            }
            let sm: [&[f32]; MAX_ROWS] = std::array::from_fn(|i| sums[i].as_slice());
            let mut y = [0f32; MAX_ROWS];
            for j in j0..j0 + nj {
                dots(level, w, j, &xs[..cnt], &sm[..cnt], &mut y);
                for (i, &v) in y.iter().enumerate().take(cnt) {
                    // SAFETY: each task owns its block of output features.
                    unsafe { o.write((r0 + i) * n + j, v) };
                }
            }
        }
    });
}

/// Whether `m` is a format these kernels read (every [`Rows`] is).
pub fn supported(m: &Mat) -> bool {
    !matches!(m.data, Rows::Int4 { group, .. } if group == 0 || group % 2 != 0)
}
