//! The kernel self-test (`moe-run selftest`): every op on random inputs at many shapes, compared with its
//! plain-Rust reference by normalized MSE against a named budget per op.
//!
//! `nmse = sum (got - want)^2 / sum want^2` over the compared elements (a non-finite `got` fails). Outputs are
//! poisoned (0xFF bytes = NaN / 0xffffffff) before each CUDA kernel runs, so unwritten elements fail too.
//! What is compared per op:
//! - route: ids exactly (a mismatch fails whatever the nmse) and the weights by nmse vs [`ROUTE_NMSE`];
//! - dispatch: counts and offsets exactly and, since the CUDA rows within an expert come in atomic order,
//!   [`check_dispatch`] (every slot in its expert's range holding its token, rows distinct, padding marked);
//!   its nmse column is 0 when valid;
//! - experts: the live rows of `out` (padding rows are unspecified), one case per forced path;
//! - rms_norm: `out`, and `h` of the fused variant;
//! - qk_norm_rope: `out [B, H, T, D]`, each case without norm, norm before and norm after RoPE, each also with
//!   its position read from a decode step's table (the worse nmse counts);
//! - decode_attention: `out [B, H, 1, D]`; cache rows outside the visible range are NaN; each case also with
//!   its keys read from a decode step's table, the launch sized for the whole cache (the worse nmse counts);
//! - kv_store: both whole caches after the in-place write, exactly (budget 0), for a fixed slot and one read
//!   from a step table;
//! - qmatmul: `out` of the dense and grouped (expert-stacked) quantized matmuls vs the CPU reference on the
//!   same quantized weights (int8, int4 g128/g32).
//!
//! Targets ([`Target`]): on the CPU the ops run the references themselves, so every nmse is 0 (that run checks
//! the harness and the references' plumbing); `emu` runs the kernels' own CUDA source compiled for the CPU
//! ([`crate::emu`]); `cuda` the kernels on a GPU. The expected side of every case is always a plain-Rust
//! reference (or, in `vs_candle`, candle's composite ops), never the op under test.
//!
//! Layout: this module is the harness (report, targets, random inputs, nmse, timing); each op family's cases
//! are one file beside it (`route.rs`, `dispatch.rs`, `experts.rs`, `combine.rs`, `norm.rs`, `qmatmul.rs`,
//! `rope.rs`, `attention.rs`, `vs_candle.rs`), registered in [`CASES`].

mod attention;
mod bandwidth;
mod combine;
mod dispatch;
mod experts;
mod norm;
mod qmatmul;
mod rope;
mod route;
mod vs_candle;

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub op: &'static str,
    pub case: String,
    pub dtype: DType,
    pub nmse: f64,
    pub budget: f64,
    /// Wall time of one (second, warm) call including a device synchronize, in microseconds.
    pub time_us: f64,
    /// Why it failed beyond the nmse (an id mismatch, an invalid dispatch, an error).
    pub note: String,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.note.is_empty() && self.nmse <= self.budget
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub device: String,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| !r.passed()).collect()
    }

    /// The printed table: op, case, dtype, nmse, budget, time, verdict.
    pub fn table(&self) -> String {
        let mut s = format!(
            "moe-kernels selftest on {} ({} cases)\n{:<16} {:<44} {:<5} {:>10} {:>8} {:>10}  result\n",
            self.device,
            self.rows.len(),
            "op",
            "case",
            "dtype",
            "nmse",
            "budget",
            "time_us"
        );
        for r in &self.rows {
            s += &format!(
                "{:<16} {:<44} {:<5} {:>10.2e} {:>8.0e} {:>10.1}  {}{}\n",
                r.op,
                r.case,
                r.dtype.as_str(),
                r.nmse,
                r.budget,
                r.time_us,
                if r.passed() { "ok" } else { "FAIL" },
                if r.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.note)
                }
            );
        }
        let f = self.failures().len();
        s += &format!("{} passed, {f} failed\n", self.rows.len() - f);
        s
    }

    /// `Ok(())` when every case passed, else an error listing the failures.
    pub fn ensure_passed(&self) -> Result<()> {
        let f = self.failures();
        if f.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = f
            .iter()
            .map(|r| format!("{} {} {}", r.op, r.case, r.dtype.as_str()))
            .collect();
        candle_core::bail!("selftest: {} case(s) failed: {}", f.len(), list.join("; "))
    }
}

type CaseFn = fn(&Device, &mut Rng, &mut Vec<Row>) -> Result<()>;

/// Every op family's cases, in the order they run.
const CASES: &[(&str, CaseFn)] = &[
    ("route", route::route_cases),
    ("dispatch", dispatch::dispatch_cases),
    ("experts", experts::experts_cases),
    ("combine", combine::combine_cases),
    ("rms_norm", norm::norm_cases),
    ("qmatmul", qmatmul::qmatmul_cases),
    ("qmatmul_moe", qmatmul::qmatmul_moe_cases),
    ("qk_norm_rope", rope::qk_norm_rope_cases),
    ("decode_attention", attention::decode_attention_cases),
    ("kv_store", attention::kv_store_cases),
    ("vs_candle", vs_candle::vs_candle_cases),
    ("qgemv_bandwidth", bandwidth::qgemv_bandwidth_cases),
];

/// The op names `filter` can select (a case runs when its op name contains `filter`).
pub fn ops() -> impl Iterator<Item = &'static str> {
    CASES.iter().map(|(op, _)| *op)
}

/// What the ops run on: a candle device (the CPU runs the plain-Rust references, CUDA the kernels), or the
/// kernels' own CUDA source compiled for the CPU ([`crate::emu`], feature `emu`).
#[derive(Debug, Clone)]
pub enum Target {
    Device(Device),
    Emu,
}

impl Target {
    /// `emu`, else a device as `parse_device` reads it.
    pub fn parse(s: &str, parse_device: impl Fn(&str) -> Result<Device>) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("emu") {
            if !crate::emu::available() {
                candle_core::bail!(
                    "--device emu: this build has no kernel emulator (build with `--features emu`, needs g++)"
                );
            }
            return Ok(Target::Emu);
        }
        Ok(Target::Device(parse_device(s)?))
    }

    /// The candle device the tensors live on (the CPU for the emulator).
    pub fn device(&self) -> Device {
        match self {
            Target::Device(d) => d.clone(),
            Target::Emu => Device::Cpu,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Target::Device(d) => format!("{:?}", d.location()),
            Target::Emu => "emu (the CUDA kernels' source compiled for the CPU)".to_string(),
        }
    }

    /// Turns the emulator on for this thread while the guard lives (nothing for a device).
    pub fn scope(&self) -> Result<Option<crate::emu::Scope>> {
        match self {
            Target::Device(_) => Ok(None),
            Target::Emu => crate::emu::enable().map(Some),
        }
    }
}

/// Runs every case whose op name contains `filter` (all when `None`) on `target`.
pub fn run(target: &Target, filter: Option<&str>) -> Result<Report> {
    let was = crate::poison_outputs();
    crate::set_poison_outputs(true);
    let result = target.scope().and_then(|_scope| run_cases(target, filter));
    crate::set_poison_outputs(was);
    result
}

fn run_cases(target: &Target, filter: Option<&str>) -> Result<Report> {
    let device = &target.device();
    let mut report = Report {
        device: target.name(),
        rows: Vec::new(),
    };
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for (op, cases) in CASES {
        if filter.is_none_or(|f| op.contains(f)) {
            cases(device, &mut rng, &mut report.rows)?;
        }
    }
    Ok(report)
}

/// Deterministic xorshift64* (no rand dependency).
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
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    /// N tokens x K distinct experts drawn from the first `pool` of E.
    fn ids(&mut self, n: usize, k: usize, pool: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n * k);
        for _ in 0..n {
            let mut chosen: Vec<u32> = Vec::with_capacity(k);
            while chosen.len() < k {
                let e = self.below(pool) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            out.extend(chosen);
        }
        out
    }
}

/// Normalized MSE; non-finite `got` (or `want`) gives infinity.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if num == 0.0 {
        0.0
    } else {
        num / den.max(1e-30)
    }
}

/// Runs `f` twice (the first call loads the PTX and fills caches), returns the second result and its time.
/// Under the emulator (where the time says nothing) it runs once.
fn timed<T>(device: &Device, mut f: impl FnMut() -> Result<T>) -> Result<(T, f64)> {
    if !crate::emu::active() {
        let _ = f()?;
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((out, t0.elapsed().as_secs_f64() * 1e6))
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Inputs rounded to `dtype` and back, so the references see exactly what the device sees.
fn rounded(v: &[f32], dtype: DType) -> Result<Vec<f32>> {
    f32s(&Tensor::from_slice(v, v.len(), &Device::Cpu)?.to_dtype(dtype)?)
}

fn upload(v: &[f32], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_slice(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// `t` as a view `elems` elements into a longer buffer (zeros before it): its device pointer is then that
/// many elements past the allocation's alignment, as a view into a larger tensor's storage can be (the
/// emulator keeps that alignment too).
fn offset_view(t: &Tensor, elems: usize) -> Result<Tensor> {
    if elems == 0 {
        return Ok(t.clone());
    }
    let flat = t.flatten_all()?;
    let pad = Tensor::zeros(elems, t.dtype(), t.device())?;
    Tensor::cat(&[&pad, &flat], 0)?
        .narrow(0, elems, flat.elem_count())?
        .reshape(t.dims())
}

/// Catches an op's error as a failed row instead of aborting the whole self-test.
pub fn row_or_error(
    op: &'static str,
    case: String,
    dtype: DType,
    budget: f64,
    r: Result<Row>,
) -> Row {
    r.unwrap_or_else(|e| Row {
        op,
        case,
        dtype,
        nmse: f64::INFINITY,
        budget,
        time_us: 0.0,
        note: format!("error: {e}"),
    })
}
