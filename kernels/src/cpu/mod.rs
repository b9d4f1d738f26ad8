//! The CPU kernels of the engine's hot path: the expert MLPs of an MoE layer ([`moe_experts_cpu`]) and
//! single linears ([`linear_cpu`]) over f32, bf16, f16, INT8, INT4 and MXFP4 weights, read in place (never widened to
//! an f32 copy), explicit SIMD where the CPU has it ([`simd`]), on one rayon pool sized once
//! ([`configure_threads`]). The plain references (`QMatmul`'s CPU op, the candle composite path) stay the
//! specification that the tests compare these with.

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod experts;
pub mod q8;
pub mod simd;

use candle_core::{bail, DType, Layout, Result, Storage, Tensor};

pub use experts::{Activation, Epilogue};
pub use simd::{Level, Mat, Rows};

use crate::qformat::QFormat;

/// The environment variable rayon and candle read for their thread count.
pub const THREADS_ENV: &str = "RAYON_NUM_THREADS";

/// candle 0.11 runs its elementwise CPU ops of 64K+ elements on a pool of its own (`n - 1` threads
/// beside the caller) whose threads spin this many times after each op before they sleep.
pub const SPIN_ENV: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// What [`configure_threads`] sets [`SPIN_ENV`] to unless the user set it. candle's default (25,000
/// spins, ~50-100 us) keeps a spinning thread on a core while the next op (one of our kernels, on
/// the rayon pool) needs every core: tiny-kjv prefill 384 tokens on 2 threads ran ~5000 tok/s at the
/// default and ~7200 at 100 (moe-run bench, interleaved). 100 spins still catch back-to-back ops.
pub const SPIN_LIMIT: &str = "100";

/// Sizes the process's one thread pool, before any other thread starts: `requested` (`--threads`), else
/// `RAYON_NUM_THREADS`, else candle's default (the physical cores this process may run on). Also sets
/// `RAYON_NUM_THREADS`, which candle's CPU matmul reads on every call: without it candle recounts the cores
/// from /proc/cpuinfo each time; and [`SPIN_ENV`] (see [`SPIN_LIMIT`]). Returns the thread count.
pub fn configure_threads(requested: Option<usize>) -> std::result::Result<usize, String> {
    let from_env = std::env::var(THREADS_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0);
    let n = match requested.or(from_env) {
        Some(n) => n,
        None => candle_core::utils::get_num_threads().max(1),
    };
    if std::env::var(THREADS_ENV).ok().as_deref() != Some(n.to_string().as_str()) {
        // Single-threaded at this point (called first thing in main), which set_var requires.
        std::env::set_var(THREADS_ENV, n.to_string());
    }
    if std::env::var_os(SPIN_ENV).is_none() {
        // Same reason as above.
        std::env::set_var(SPIN_ENV, SPIN_LIMIT);
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        // The command runs on a worker (see on_pool): the main thread's stack size.
        .stack_size(8 << 20)
        .build_global()
    {
        Ok(()) => Ok(n),
        // Already built (a test harness, or a second call): report what it has.
        Err(_) => Ok(rayon::current_num_threads()),
    }
}

/// Runs `f` on a worker of the pool (the caller blocks until it returns). Parallel loops started
/// from a worker run part of their tasks on that worker and hand the rest to the others, where the
/// same loop started from a thread outside the pool hands every task over and sleeps until they
/// finish: a futex wake and a context switch per loop, which dominated the decode step of a small
/// model (perf on tiny-kjv, 1 thread: ~30% of samples in the scheduler).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// The pool's streaming read bandwidth: a parallel sum over a `bytes`-long buffer, median of 5 passes
/// after one untimed, in GB/s of bytes read. The ceiling of a kernel that streams each weight once,
/// measured with the threads the kernels use.
pub fn read_bandwidth_gb_s(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let buf: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let mut times: Vec<f64> = (0..6)
        .map(|_| {
            let t = std::time::Instant::now();
            let s: u64 = buf
                .par_chunks(1 << 16)
                .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
                .reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(s);
            t.elapsed().as_secs_f64()
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    (8 * buf.len()) as f64 / times[times.len() / 2] / 1e9
}

/// A weight as the kernels read it: a dense `[.., N, K]` tensor, or packed bytes with their params (f16, or u8
/// for MXFP4: [`QFormat::params_dtype`]).
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    Dense(&'a Tensor),
    Quant {
        qweight: &'a Tensor,
        params: &'a Tensor,
        fmt: QFormat,
    },
}

impl WeightRef<'_> {
    /// Logical dims `[.., N, K]` are given by the caller: `rows` = product of the leading dims.
    fn dense_rows_k(t: &Tensor) -> (usize, usize) {
        let k = t.dims().last().copied().unwrap_or(0);
        (t.elem_count() / k.max(1), k)
    }
}

fn cpu_slice<'s, T: candle_core::WithDType>(
    st: &'s Storage,
    l: &Layout,
    what: &str,
) -> Result<&'s [T]> {
    let Storage::Cpu(c) = st else {
        bail!("{what}: the CPU kernels need a CPU tensor")
    };
    let all = c.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) if b <= all.len() => Ok(&all[a..b]),
        _ => bail!("{what}: must be contiguous (shape {:?})", l.dims()),
    }
}

/// Runs `f` on the [`Mat`] view of `w` (`k` = its input features), borrowing the tensor storage in place.
pub fn with_mat<R>(
    w: WeightRef,
    k: usize,
    what: &str,
    f: impl FnOnce(&Mat) -> Result<R>,
) -> Result<R> {
    match w {
        WeightRef::Dense(t) => {
            let (rows, kk) = WeightRef::dense_rows_k(t);
            if kk != k {
                bail!("{what}: {kk} input features, expected {k}")
            }
            let (st, l) = t.storage_and_layout();
            let data = match t.dtype() {
                DType::F32 => Rows::F32(cpu_slice(&st, l, what)?),
                DType::BF16 => Rows::Bf16(cpu_slice(&st, l, what)?),
                DType::F16 => Rows::F16(cpu_slice(&st, l, what)?),
                other => bail!("{what}: weights in {other:?} are not supported"),
            };
            f(&Mat { data, rows, k })
        }
        WeightRef::Quant {
            qweight,
            params,
            fmt,
        } => {
            let kb = fmt.row_bytes(k).max(1);
            let rows = qweight.elem_count() / kb;
            let (qs, ql) = qweight.storage_and_layout();
            let (ps, pl) = params.storage_and_layout();
            if params.dtype() != fmt.params_dtype() {
                bail!(
                    "{what}: {fmt:?} params must be {:?}, got {:?}",
                    fmt.params_dtype(),
                    params.dtype()
                )
            }
            let q = cpu_slice(&qs, ql, what)?;
            let m = match fmt.params_dtype() {
                DType::U8 => Mat::quant(fmt, q, cpu_slice::<u8>(&ps, pl, what)?, rows, k),
                _ => Mat::quant(fmt, q, cpu_slice::<half::f16>(&ps, pl, what)?, rows, k),
            };
            m.check()
                .map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
            f(&m)
        }
    }
}

/// The activations as f32 (a copy only when they are not f32 already).
fn f32_rows(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The expert MLPs of an MoE layer on the CPU (see [`experts`]): `x [T, H]`, a host dispatch (`row_token
/// [R]`, `offsets [E + 1]`), `gate_up [E, 2F, H]`, `down [E, H, F]` -> `[R, H]` in the dtype of `x`, rows in
/// dispatch order.
pub fn moe_experts_cpu(
    level: Level,
    x: &Tensor,
    row_token: &[u32],
    offsets: &[u32],
    gate_up: WeightRef,
    down: WeightRef,
) -> Result<Tensor> {
    let ep = experts::Epilogue::default();
    moe_experts_cpu_with(level, x, row_token, offsets, gate_up, down, &ep)
}

/// [`moe_experts_cpu`] with gpt-oss's activation and biases ([`experts::Epilogue`]).
pub fn moe_experts_cpu_with(
    level: Level,
    x: &Tensor,
    row_token: &[u32],
    offsets: &[u32],
    gate_up: WeightRef,
    down: WeightRef,
    ep: &experts::Epilogue,
) -> Result<Tensor> {
    let (_, h) = x.dims2()?;
    let xs = f32_rows(x)?;
    let f = match down {
        WeightRef::Dense(t) => t.dims().last().copied().unwrap_or(0),
        WeightRef::Quant { .. } => {
            // [E, 2F, K]: F from gate_up's logical rows per expert.
            let e = offsets.len().saturating_sub(1).max(1);
            let gu_rows = match gate_up {
                WeightRef::Quant { qweight, fmt, .. } => {
                    qweight.elem_count() / fmt.row_bytes(h).max(1)
                }
                WeightRef::Dense(t) => WeightRef::dense_rows_k(t).0,
            };
            gu_rows / e / 2
        }
    };
    let mut out = vec![0f32; row_token.len() * h];
    with_mat(gate_up, h, "moe_experts_cpu: gate_up", |gu| {
        with_mat(down, f, "moe_experts_cpu: down", |dn| {
            let (e, f, _) = experts::check(xs.len(), h, row_token, offsets, gu, dn)
                .map_err(|e| candle_core::Error::Msg(format!("moe_experts_cpu: {e}")))?;
            ep.check(e, f, h)
                .map_err(|e| candle_core::Error::Msg(format!("moe_experts_cpu: {e}")))?;
            let (mut xg, mut act) = (Vec::new(), Vec::new());
            experts::experts(
                level, &xs, h, row_token, offsets, gu, dn, ep, &mut xg, &mut act, &mut out,
            );
            Ok(())
        })
    })?;
    Tensor::from_vec(out, (row_token.len(), h), x.device())?.to_dtype(x.dtype())
}

/// `x [.., K] W^T` for a weight `[N, K]` on the CPU -> `[.., N]` in the dtype of `x`.
pub fn linear_cpu(level: Level, x: &Tensor, w: WeightRef, n: usize) -> Result<Tensor> {
    let Some((&k, lead)) = x.dims().split_last() else {
        bail!("linear_cpu: x is a scalar")
    };
    let xs = f32_rows(x)?;
    let m = xs.len() / k.max(1);
    let mut out = vec![0f32; m * n];
    with_mat(w, k, "linear_cpu: weight", |mat| {
        if mat.rows != n {
            bail!("linear_cpu: weight has {} rows, expected {n}", mat.rows)
        }
        experts::linear(level, &xs, mat, &mut out);
        Ok(())
    })?;
    let mut dims = lead.to_vec();
    dims.push(n);
    Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())
}
