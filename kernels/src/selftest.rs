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
//! - qk_norm_rope: `out [B, H, T, D]`, each case without norm, norm before and norm after RoPE;
//! - decode_attention: `out [B, H, 1, D]`; cache rows outside the visible range are NaN.
//! - qmatmul: `out` of the dense and grouped (expert-stacked) quantized matmuls vs the CPU reference on the
//!   same quantized weights (int8, int4 g128/g32).
//!
//! On the CPU the ops run the references themselves, so every nmse is 0: that run checks the harness and
//! the references' plumbing. The real check is `--device cuda`.

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};

use crate::dispatch::{check_dispatch, dispatch_reference, moe_dispatch};
use crate::experts::{
    experts_reference, moe_experts, moe_experts_with, ExpertPath, EXPERTS_NMSE_BF16,
    EXPERTS_NMSE_F16, EXPERTS_NMSE_F32,
};
use crate::norm::{
    add_rms_norm, rms_norm, rms_norm_reference, RMS_NORM_NMSE_BF16, RMS_NORM_NMSE_F16,
    RMS_NORM_NMSE_F32,
};
use crate::qexperts::{qmatmul, qmatmul_grouped};
use crate::qmatmul::{
    quantize_row, QFormat, QMATMUL_NMSE_BF16, QMATMUL_NMSE_F16, QMATMUL_NMSE_F32,
};
use crate::route::{moe_route, route_reference, Router, ROUTE_NMSE};

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
    ("route", route_cases),
    ("dispatch", dispatch_cases),
    ("experts", experts_cases),
    ("combine", combine_cases),
    ("rms_norm", norm_cases),
    ("qmatmul", qmatmul_cases),
    ("qmatmul_moe", qmatmul_moe_cases),
    ("qk_norm_rope", qk_norm_rope_cases),
    ("decode_attention", decode_attention_cases),
    ("vs_candle", vs_candle_cases),
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

fn route_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let routers: [(&str, usize, usize, Router); 5] = [
        ("softmax", 8, 2, Router::Softmax { norm_p: None }),
        (
            "softmax-renorm",
            64,
            8,
            Router::Softmax { norm_p: Some(1.0) },
        ),
        ("softmax-p2", 16, 4, Router::Softmax { norm_p: Some(2.0) }),
        (
            "v2-group",
            160,
            6,
            Router::SoftmaxGroupLimited {
                n_group: 8,
                topk_group: 3,
                scaling: 16.0,
            },
        ),
        (
            "v3-sigmoid",
            256,
            8,
            Router::SigmoidBiasGrouped {
                n_group: 8,
                topk_group: 4,
                renormalize: true,
                scaling: 2.5,
            },
        ),
    ];
    for &n in &[1usize, 7, 64, 513] {
        for &(name, e, k, router) in &routers {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dtype == DType::F16 && n != 7 {
                    continue;
                }
                let case = format!("{name} N={n} E={e} k={k}");
                let logits = rounded(&rng.vec(n * e, 4.0), dtype)?;
                let bias = rng.vec(e, 0.5);
                let r = (|| {
                    let (want_ids, want_w) = route_reference(&logits, e, router, k, Some(&bias))?;
                    let lt = upload(&logits, &[n, e], dtype, device)?;
                    let bt = Tensor::from_slice(&bias, e, device)?;
                    let ((ids, w), time_us) =
                        timed(device, || moe_route(&lt, router, k, Some(&bt)))?;
                    let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                    let bad = ids.iter().zip(&want_ids).filter(|(a, b)| a != b).count();
                    Ok(Row {
                        op: "route",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&f32s(&w)?, &want_w),
                        budget: ROUTE_NMSE,
                        time_us,
                        note: if bad == 0 {
                            String::new()
                        } else {
                            format!("{bad} ids differ")
                        },
                    })
                })();
                rows.push(row_or_error("route", case, dtype, ROUTE_NMSE, r));
            }
        }
    }
    Ok(())
}

fn dispatch_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (N, K, E, experts actually used, block): decode, every expert used, idle experts, padding.
    let cases = [
        (1, 8, 256, 256, 1),
        (7, 2, 8, 8, 1),
        (8, 2, 16, 16, 1),
        (64, 8, 256, 256, 1),
        (64, 4, 64, 20, 16),
        (513, 8, 64, 64, 1),
        (513, 4, 16, 11, 64),
    ];
    for &(n, k, e, pool, block) in &cases {
        let case = format!("N={n} k={k} E={e} used<={pool} B={block}");
        let ids = if n * k == e && pool == e {
            (0..(n * k) as u32).map(|i| i % e as u32).collect() // every expert exactly once
        } else {
            rng.ids(n, k, pool)
        };
        let r = (|| {
            let it = Tensor::from_slice(&ids, (n, k), device)?;
            let (d, time_us) = timed(device, || moe_dispatch(&it, k, e, block))?;
            let got = d.to_host()?;
            let note = check_dispatch(&ids, k, e, block, &got)
                .err()
                .unwrap_or_default();
            Ok(Row {
                op: "dispatch",
                case: case.clone(),
                dtype: DType::U32,
                nmse: 0.0,
                budget: 0.0,
                time_us,
                note,
            })
        })();
        rows.push(row_or_error("dispatch", case, DType::U32, 0.0, r));
    }
    Ok(())
}

fn experts_budget(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => EXPERTS_NMSE_F32,
        DType::F16 => EXPERTS_NMSE_F16,
        _ => EXPERTS_NMSE_BF16,
    }
}

fn experts_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (N, K, E, used, H, F, block): decode, small prefill, many experts, odd H / F, idle experts, padding.
    let cases = [
        (1, 8, 64, 64, 129, 96, 1),
        (7, 2, 8, 8, 128, 64, 1),
        (7, 2, 8, 5, 129, 37, 1),
        (64, 8, 256, 256, 64, 32, 1),
        (64, 4, 32, 12, 255, 80, 16),
        (513, 4, 16, 16, 136, 72, 1),
        (513, 2, 8, 6, 129, 65, 64),
    ];
    for &(n, k, e, pool, h, f, block) in &cases {
        let ids = rng.ids(n, k, pool);
        let d = dispatch_reference(&ids, k, e, block)?;
        let x0 = rng.vec(n * h, 1.0);
        let gu0 = rng.vec(e * 2 * f * h, 1.0 / (h as f32).sqrt());
        let dn0 = rng.vec(e * h * f, 1.0 / (f as f32).sqrt());
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            if dtype == DType::F16 && n != 7 && n != 64 {
                continue;
            }
            let (x, gu, dn) = (
                rounded(&x0, dtype)?,
                rounded(&gu0, dtype)?,
                rounded(&dn0, dtype)?,
            );
            let want = reference_experts_f32(dtype, &x, &d, &gu, &dn, n, h, f)?;
            // bf16/f16 GEMM: the tensor-core entries where the target has them, and the FMA entries as well.
            let fma = (dtype != DType::F32).then_some((ExpertPath::Gemm, false, "Gemm(fma)"));
            let paths = [
                (ExpertPath::Gemv, true, "Gemv"),
                (ExpertPath::Gemm, true, "Gemm"),
            ];
            for (path, tensor_cores, name) in paths.into_iter().chain(fma) {
                let case = format!("{name} N={n} k={k} E={e} H={h} F={f} B={block}");
                let budget = experts_budget(dtype);
                let r = (|| {
                    let xt = upload(&x, &[n, h], dtype, device)?;
                    let gt = upload(&gu, &[e, 2 * f, h], dtype, device)?;
                    let dt = upload(&dn, &[e, h, f], dtype, device)?;
                    let rt = Tensor::from_slice(&d.row_token, d.row_token.len(), device)?;
                    let ct = Tensor::from_slice(&d.counts, e, device)?;
                    let ot = Tensor::from_slice(&d.offsets, e + 1, device)?;
                    let (out, time_us) = timed(device, || {
                        moe_experts_with(&xt, &rt, &ct, &ot, &gt, &dt, Some(path), tensor_cores)
                    })?;
                    let got = live_rows(&f32s(&out)?, &d.row_token, h);
                    Ok(Row {
                        op: "experts",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&got, &live_rows(&want, &d.row_token, h)),
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("experts", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

/// Rows of `[R, H]` whose row_token is not padding, concatenated.
fn live_rows(v: &[f32], row_token: &[u32], h: usize) -> Vec<f32> {
    row_token
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != crate::PAD_ROW)
        .flat_map(|(r, _)| v[r * h..(r + 1) * h].iter().copied())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn reference_experts_f32(
    dtype: DType,
    x: &[f32],
    d: &crate::DispatchHost,
    gu: &[f32],
    dn: &[f32],
    n: usize,
    h: usize,
    f: usize,
) -> Result<Vec<f32>> {
    fn go<T: crate::common::Elem>(
        x: &[f32],
        d: &crate::DispatchHost,
        gu: &[f32],
        dn: &[f32],
        n: usize,
        h: usize,
        f: usize,
    ) -> Result<Vec<f32>> {
        let c = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let out = experts_reference::<T>(
            &c(x),
            &d.row_token,
            &d.counts,
            &d.offsets,
            &c(gu),
            &c(dn),
            n,
            h,
            f,
        )?;
        Ok(out.iter().map(|v| v.f32()).collect())
    }
    match dtype {
        DType::F32 => go::<f32>(x, d, gu, dn, n, h, f),
        DType::BF16 => go::<half::bf16>(x, d, gu, dn, n, h, f),
        _ => go::<half::f16>(x, d, gu, dn, n, h, f),
    }
}

fn norm_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    for &(t, h) in &[(1usize, 129usize), (7, 4096), (64, 1000), (513, 257)] {
        let x0 = rng.vec(t * h, 2.0);
        let r0 = rng.vec(t * h, 2.0);
        let w0: Vec<f32> = (0..h).map(|_| 1.0 + 0.5 * rng.f32()).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let budget = match dtype {
                DType::F32 => RMS_NORM_NMSE_F32,
                DType::F16 => RMS_NORM_NMSE_F16,
                _ => RMS_NORM_NMSE_BF16,
            };
            let (x, res, w) = (
                rounded(&x0, dtype)?,
                rounded(&r0, dtype)?,
                rounded(&w0, dtype)?,
            );
            for fused in [false, true] {
                let case = format!("{} T={t} H={h}", if fused { "add+norm" } else { "norm" });
                let r = (|| {
                    let (want_h, want) = ref_norm_f32(dtype, &x, fused.then_some(&res[..]), &w, h)?;
                    let xt = upload(&x, &[t, h], dtype, device)?;
                    let rt = upload(&res, &[t, h], dtype, device)?;
                    let wt = upload(&w, &[h], dtype, device)?;
                    let eps = 1e-6;
                    let ((hh, out), time_us) = timed(device, || {
                        if fused {
                            add_rms_norm(&xt, &rt, &wt, eps).map(|(a, b)| (Some(a), b))
                        } else {
                            rms_norm(&xt, &wt, eps).map(|b| (None, b))
                        }
                    })?;
                    let mut e = nmse(&f32s(&out)?, &want);
                    if let (Some(hh), Some(want_h)) = (hh, want_h) {
                        e = e.max(nmse(&f32s(&hh)?, &want_h));
                    }
                    Ok(Row {
                        op: "rms_norm",
                        case: case.clone(),
                        dtype,
                        nmse: e,
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("rms_norm", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

type NormOut = (Option<Vec<f32>>, Vec<f32>);

fn ref_norm_f32(
    dtype: DType,
    x: &[f32],
    r: Option<&[f32]>,
    w: &[f32],
    h: usize,
) -> Result<NormOut> {
    fn go<T: crate::common::Elem>(x: &[f32], r: Option<&[f32]>, w: &[f32], h: usize) -> NormOut {
        let c = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let back = |v: Vec<T>| v.iter().map(|a| a.f32()).collect::<Vec<f32>>();
        let r = r.map(c);
        let (hh, out) = rms_norm_reference::<T>(&c(x), r.as_deref(), &c(w), h, 1e-6);
        (hh.map(back), back(out))
    }
    Ok(match dtype {
        DType::F32 => go::<f32>(x, r, w, h),
        DType::BF16 => go::<half::bf16>(x, r, w, h),
        _ => go::<half::f16>(x, r, w, h),
    })
}

fn qk_norm_rope_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    use crate::rope::{
        qk_norm_rope, HeadNorm, QK_NORM_ROPE_NMSE_BF16, QK_NORM_ROPE_NMSE_F16,
        QK_NORM_ROPE_NMSE_F32,
    };
    // (B, T, heads, D, pos, interleaved): decode and a small prefill, rotate-half and interleaved (MLA's 64),
    // a head dim that is not a multiple of 64 (lanes idle in the last pass) and one of 256.
    let cases = [
        (1, 1, 32, 128, 700, false),
        (2, 7, 8, 128, 5, false),
        (2, 1, 16, 64, 33, true),
        (1, 7, 3, 80, 0, true),
        (1, 7, 4, 256, 100, false),
    ];
    for &(b, t, h, d, pos, interleaved) in &cases {
        let p = pos + t + 3;
        let x0 = rng.vec(b * t * h * d, 2.0);
        let w0: Vec<f32> = (0..d).map(|_| 1.0 + 0.5 * rng.f32()).collect();
        let (mut c0, mut s0) = (Vec::new(), Vec::new());
        for q in 0..p {
            for i in 0..d / 2 {
                let a = q as f32 / 10_000f32.powf(2.0 * i as f32 / d as f32);
                c0.push(a.cos());
                s0.push(a.sin());
            }
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let budget = match dtype {
                DType::F32 => QK_NORM_ROPE_NMSE_F32,
                DType::F16 => QK_NORM_ROPE_NMSE_F16,
                _ => QK_NORM_ROPE_NMSE_BF16,
            };
            let (x, w, c, s) = (
                rounded(&x0, dtype)?,
                rounded(&w0, dtype)?,
                rounded(&c0, dtype)?,
                rounded(&s0, dtype)?,
            );
            for mode in 0..3u8 {
                let case = format!(
                    "{}{} B={b} T={t} H={h} D={d} pos={pos}",
                    ["rope", "norm+rope", "rope+norm"][mode as usize],
                    if interleaved { "(i)" } else { "" }
                );
                let r = (|| {
                    let nr = (mode > 0).then_some((&w[..], 1e-6f32, mode == 2));
                    let want =
                        ref_qk_norm_rope_f32(dtype, &x, nr, &c, &s, (b, t, h, d), pos, interleaved);
                    let xt = upload(&x, &[b, t, h, d], dtype, device)?;
                    let wt = upload(&w, &[d], dtype, device)?;
                    let ct = upload(&c, &[p, d / 2], dtype, device)?;
                    let st = upload(&s, &[p, d / 2], dtype, device)?;
                    let norm = (mode > 0).then_some(HeadNorm {
                        weight: &wt,
                        eps: 1e-6,
                        after_rope: mode == 2,
                    });
                    let (out, time_us) = timed(device, || {
                        qk_norm_rope(&xt, norm, &ct, &st, pos, interleaved)
                    })?;
                    Ok(Row {
                        op: "qk_norm_rope",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&f32s(&out)?, &want),
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("qk_norm_rope", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn ref_qk_norm_rope_f32(
    dtype: DType,
    x: &[f32],
    norm: Option<(&[f32], f32, bool)>,
    c: &[f32],
    s: &[f32],
    dims: (usize, usize, usize, usize),
    pos: usize,
    interleaved: bool,
) -> Vec<f32> {
    fn go<T: crate::common::Elem>(
        x: &[f32],
        norm: Option<(&[f32], f32, bool)>,
        c: &[f32],
        s: &[f32],
        dims: (usize, usize, usize, usize),
        pos: usize,
        interleaved: bool,
    ) -> Vec<f32> {
        let cv = |v: &[f32]| v.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
        let w = norm.map(|(w, _, _)| cv(w));
        let nr = norm.zip(w.as_deref()).map(|((_, e, a), w)| (w, e, a));
        crate::rope::qk_norm_rope_reference::<T>(&cv(x), nr, &cv(c), &cv(s), dims, pos, interleaved)
            .iter()
            .map(|v| v.f32())
            .collect()
    }
    match dtype {
        DType::F32 => go::<f32>(x, norm, c, s, dims, pos, interleaved),
        DType::BF16 => go::<half::bf16>(x, norm, c, s, dims, pos, interleaved),
        _ => go::<half::f16>(x, norm, c, s, dims, pos, interleaved),
    }
}

fn decode_attention_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    use crate::attention::{
        decode_attention, decode_attention_reference, window_start, DECODE_ATTN_NMSE_BF16,
        DECODE_ATTN_NMSE_F16, DECODE_ATTN_NMSE_F32,
    };
    // (B, H, KV, D, L, window): one key, a few, one chunk, a chunk boundary + 1, many chunks; GQA groups of
    // 1, 3, 5, 7 and 8; windows shorter than L (rows before the window are NaN, as are rows >= L, so a
    // kernel reading them fails).
    let cases = [
        (1, 8, 8, 128, 1, None),
        (2, 12, 4, 128, 7, None),
        (2, 12, 4, 128, 7, Some(3)),
        (1, 10, 2, 64, 64, None),
        (1, 10, 2, 64, 64, Some(40)),
        (2, 7, 1, 80, 513, None),
        (2, 7, 1, 80, 513, Some(257)),
        (1, 32, 4, 128, 4096, None),
        (1, 32, 4, 128, 4096, Some(1000)),
    ];
    for &(b, h, kv, d, len, window) in &cases {
        let cap = len + 5;
        let start = window_start(len, window);
        let q0 = rng.vec(b * h * d, 1.0);
        let mut k0 = rng.vec(b * kv * cap * d, 1.0);
        let mut v0 = rng.vec(b * kv * cap * d, 1.0);
        for (i, (kx, vx)) in k0.iter_mut().zip(v0.iter_mut()).enumerate() {
            let j = (i / d) % cap;
            if j < start || j >= len {
                *kx = f32::NAN;
                *vx = f32::NAN;
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            if dtype == DType::F16 && len != 64 && len != 513 {
                continue;
            }
            let budget = match dtype {
                DType::F32 => DECODE_ATTN_NMSE_F32,
                DType::F16 => DECODE_ATTN_NMSE_F16,
                _ => DECODE_ATTN_NMSE_BF16,
            };
            let w = window.map_or(String::new(), |w| format!(" w={w}"));
            let case = format!("B={b} H={h} KV={kv} D={d} L={len}{w}");
            let (q, k, v) = (
                rounded(&q0, dtype)?,
                rounded(&k0, dtype)?,
                rounded(&v0, dtype)?,
            );
            let r = (|| {
                fn go<T: crate::common::Elem>(
                    q: &[f32],
                    k: &[f32],
                    v: &[f32],
                    dims: (usize, usize, usize, usize, usize),
                    len: usize,
                    window: Option<usize>,
                    scale: f32,
                ) -> Vec<f32> {
                    let c = |x: &[f32]| x.iter().map(|&a| T::of(a)).collect::<Vec<T>>();
                    decode_attention_reference::<T>(&c(q), &c(k), &c(v), dims, len, window, scale)
                        .iter()
                        .map(|x| x.f32())
                        .collect()
                }
                let dims = (b, h, kv, cap, d);
                let want = match dtype {
                    DType::F32 => go::<f32>(&q, &k, &v, dims, len, window, scale),
                    DType::BF16 => go::<half::bf16>(&q, &k, &v, dims, len, window, scale),
                    _ => go::<half::f16>(&q, &k, &v, dims, len, window, scale),
                };
                let qt = upload(&q, &[b, h, 1, d], dtype, device)?;
                let kt = upload(&k, &[b, kv, cap, d], dtype, device)?;
                let vt = upload(&v, &[b, kv, cap, d], dtype, device)?;
                let (out, time_us) = timed(device, || {
                    decode_attention(&qt, &kt, &vt, len, window, scale)
                })?;
                Ok(Row {
                    op: "decode_attention",
                    case: case.clone(),
                    dtype,
                    nmse: nmse(&f32s(&out)?, &want),
                    budget,
                    time_us,
                    note: String::new(),
                })
            })();
            rows.push(row_or_error("decode_attention", case, dtype, budget, r));
        }
    }
    Ok(())
}

/// Quantizes `w [rows, k]` row by row: (qweight bytes, f16 params).
fn quantize(fmt: QFormat, w: &[f32], rows: usize, k: usize) -> (Vec<u8>, Vec<half::f16>) {
    let (kb, pr) = (
        fmt.row_bytes(k),
        fmt.params_shape(k).iter().product::<usize>(),
    );
    let mut q = vec![0u8; rows * kb];
    let mut p = vec![half::f16::ZERO; rows * pr];
    for r in 0..rows {
        quantize_row(
            fmt,
            &w[r * k..(r + 1) * k],
            &mut q[r * kb..(r + 1) * kb],
            &mut p[r * pr..(r + 1) * pr],
        );
    }
    (q, p)
}

fn qmatmul_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let fmts = [
        ("int8", QFormat::Int8),
        ("int4-g128", QFormat::Int4 { group: 128 }),
        ("int4-g32", QFormat::Int4 { group: 32 }),
    ];
    // (M, N, K, experts, offsets): dense (E = 0 means qmatmul) for decode, small and larger prefill with odd
    // N; grouped with an empty expert and an expert spanning several 8-row chunks; int8 K = 200 (not a
    // multiple of 16) takes the kernel's scalar path.
    // On CUDA, M = 64 and 513 (and the grouped 64-row case) take the tiled GEMM path, the rest GEMV.
    let shapes: [(usize, usize, usize, Vec<u32>); 8] = [
        (1, 129, 256, vec![]),
        (7, 257, 512, vec![]),
        (64, 67, 384, vec![]),
        (513, 130, 256, vec![]),
        (1, 33, 256, vec![0, 0, 1, 1]),
        (7, 129, 256, vec![0, 2, 2, 7]),
        (64, 65, 384, vec![0, 9, 9, 30, 64]),
        (7, 31, 200, vec![]),
    ];
    for (fname, fmt) in fmts {
        for (m, n, k, offsets) in &shapes {
            let (m, n, k) = (*m, *n, *k);
            if let QFormat::Int4 { group } = fmt {
                if k % group != 0 {
                    continue;
                }
            }
            let e = offsets.len().saturating_sub(1).max(1);
            let grouped = !offsets.is_empty();
            let w0 = rng.vec(e * n * k, 1.0 / (k as f32).sqrt());
            let (q, p) = quantize(fmt, &w0, e * n, k);
            let x0 = rng.vec(m * k, 1.0);
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dtype == DType::F16 && m != 7 {
                    continue;
                }
                let case = if grouped {
                    format!("{fname} grouped E={e} M={m} N={n} K={k}")
                } else {
                    format!("{fname} M={m} N={n} K={k}")
                };
                let budget = match dtype {
                    DType::F32 => QMATMUL_NMSE_F32,
                    DType::F16 => QMATMUL_NMSE_F16,
                    _ => QMATMUL_NMSE_BF16,
                };
                let r = (|| {
                    let mut qdims = if grouped { vec![e, n] } else { vec![n] };
                    let mut pdims = qdims.clone();
                    qdims.push(fmt.row_bytes(k));
                    pdims.extend(fmt.params_shape(k));
                    let run = |dev: &Device| -> Result<(Tensor, Tensor, Tensor)> {
                        Ok((
                            upload(&x0, &[m, k], dtype, dev)?,
                            Tensor::from_slice(&q, qdims.as_slice(), dev)?,
                            Tensor::from_slice(&p, pdims.as_slice(), dev)?,
                        ))
                    };
                    let call = |x: &Tensor, qt: &Tensor, pt: &Tensor| {
                        if grouped {
                            qmatmul_grouped(x, qt, pt, offsets, fmt)
                        } else {
                            qmatmul(x, qt, pt, fmt)
                        }
                    };
                    let (xc, qc, pc) = run(&Device::Cpu)?;
                    let want = f32s(&call(&xc, &qc, &pc)?)?;
                    let (xt, qt, pt) = run(device)?;
                    let (out, time_us) = timed(device, || call(&xt, &qt, &pt))?;
                    Ok(Row {
                        op: "qmatmul",
                        case: case.clone(),
                        dtype,
                        nmse: nmse(&f32s(&out)?, &want),
                        budget,
                        time_us,
                        note: String::new(),
                    })
                })();
                rows.push(row_or_error("qmatmul", case, dtype, budget, r));
            }
        }
    }
    Ok(())
}

fn qmatmul_moe_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let fmts = [
        ("int8", QFormat::Int8),
        ("int4-g128", QFormat::Int4 { group: 128 }),
        ("int4-g32", QFormat::Int4 { group: 32 }),
    ];
    // (tokens, top-k, E, used, N_out, K, block, gather): decode over many experts, a prefill with idle experts
    // and rows spanning several 8-row chunks, padding, the un-gathered (down projection) form, and int8 with
    // K = 200 (scalar path).
    let cases = [
        (
            1usize, 8usize, 64usize, 64usize, 96usize, 256usize, 1usize, true,
        ),
        (7, 2, 8, 5, 129, 256, 1, true),
        (64, 8, 256, 256, 40, 128, 1, true),
        (64, 2, 8, 6, 33, 384, 16, false),
        (513, 4, 16, 16, 72, 128, 1, true),
        (7, 2, 8, 8, 31, 200, 1, true),
    ];
    for (fname, fmt) in fmts {
        for &(n_tok, k_top, e, pool, n, k, block, gather) in &cases {
            if let QFormat::Int4 { group } = fmt {
                if k % group != 0 {
                    continue;
                }
            }
            let ids = rng.ids(n_tok, k_top, pool);
            let d = dispatch_reference(&ids, k_top, e, block)?;
            let r = d.row_token.len();
            let x_rows = if gather { n_tok } else { r };
            let x0 = rng.vec(x_rows * k, 1.0);
            let w0 = rng.vec(e * n * k, 1.0 / (k as f32).sqrt());
            let (q, p) = quantize(fmt, &w0, e * n, k);
            let mut pdims = vec![e, n];
            pdims.extend(fmt.params_shape(k));
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                if dtype == DType::F16 && n_tok != 7 {
                    continue;
                }
                for path in [ExpertPath::Gemv, ExpertPath::Gemm] {
                    let case = format!(
                        "{path:?} {fname} N={n_tok} k={k_top} E={e} O={n} K={k} B={block}{}",
                        if gather { "" } else { " rows" }
                    );
                    let budget = match dtype {
                        DType::F32 => QMATMUL_NMSE_F32,
                        DType::F16 => QMATMUL_NMSE_F16,
                        _ => QMATMUL_NMSE_BF16,
                    };
                    let r = (|| {
                        let run = |dev: &Device| -> Result<[Tensor; 6]> {
                            Ok([
                                upload(&x0, &[x_rows, k], dtype, dev)?,
                                Tensor::from_slice(&d.row_token, r, dev)?,
                                Tensor::from_slice(&d.counts, e, dev)?,
                                Tensor::from_slice(&d.offsets, e + 1, dev)?,
                                Tensor::from_slice(&q, (e, n, fmt.row_bytes(k)), dev)?,
                                Tensor::from_slice(&p, pdims.as_slice(), dev)?,
                            ])
                        };
                        let call = |t: &[Tensor; 6]| {
                            crate::qmatmul_moe(
                                &t[0],
                                gather.then_some(&t[1]),
                                &t[2],
                                &t[3],
                                &t[4],
                                &t[5],
                                fmt,
                                Some(path),
                            )
                        };
                        let want = f32s(&call(&run(&Device::Cpu)?)?)?;
                        let dt = run(device)?;
                        let (out, time_us) = timed(device, || call(&dt))?;
                        Ok(Row {
                            op: "qmatmul_moe",
                            case: case.clone(),
                            dtype,
                            nmse: nmse(
                                &live_rows(&f32s(&out)?, &d.row_token, n),
                                &live_rows(&want, &d.row_token, n),
                            ),
                            budget,
                            time_us,
                            note: String::new(),
                        })
                    })();
                    rows.push(row_or_error("qmatmul_moe", case, dtype, budget, r));
                }
            }
        }
    }
    Ok(())
}

/// Combine is specified to match its reference bit for bit in f32 (ordered f32 sum, no FMA), so the budget
/// only absorbs nothing but a changed rounding mode.
const COMBINE_NMSE: f64 = 1e-12;

fn combine_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    // (T, A, H, padding rows): decode with top-8, prefill top-2 at a large H, odd H with padding rows (NaN,
    // never read), T = 513; every 5th token has one choice with weight 0 whose row is NaN.
    let cases = [
        (1usize, 8usize, 129usize, 0usize),
        (7, 2, 4096, 0),
        (64, 8, 255, 16),
        (513, 4, 136, 3),
    ];
    for &(t, a, h, pad) in &cases {
        let r = t * a + pad;
        let mut x0 = rng.vec(r * h, 1.0);
        // A random permutation of the live rows as slot_of.
        let mut perm: Vec<u32> = (0..(t * a) as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let mut w0: Vec<f32> = (0..t * a).map(|_| 0.5 * (rng.f32() + 1.0)).collect();
        for tok in (0..t).step_by(5) {
            if a > 1 {
                w0[tok * a + a - 1] = 0.0;
                let row = perm[tok * a + a - 1] as usize;
                x0[row * h..(row + 1) * h].fill(f32::NAN);
            }
        }
        for row in t * a..r {
            x0[row * h..(row + 1) * h].fill(f32::NAN);
        }
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let case = format!("T={t} k={a} H={h} pad={pad}");
            let r2 = (|| {
                let run = |dev: &Device| -> Result<[Tensor; 3]> {
                    Ok([
                        upload(&x0, &[r, h], dtype, dev)?,
                        Tensor::from_slice(&perm, (t, a), dev)?,
                        Tensor::from_slice(&w0, (t, a), dev)?,
                    ])
                };
                let [xc, sc, wc] = run(&Device::Cpu)?;
                let want = f32s(&crate::moe_combine(&xc, &sc, &wc)?)?;
                let [xt, st, wt] = run(device)?;
                let (out, time_us) = timed(device, || crate::moe_combine(&xt, &st, &wt))?;
                Ok(Row {
                    op: "combine",
                    case: case.clone(),
                    dtype,
                    nmse: nmse(&f32s(&out)?, &want),
                    budget: COMBINE_NMSE,
                    time_us,
                    note: String::new(),
                })
            })();
            rows.push(row_or_error("combine", case, dtype, COMBINE_NMSE, r2));
        }
    }
    Ok(())
}

// ---- the ops against candle's composite ops ----------------------------------------------------------
// Independent of the references: every op family computed with plain candle-core tensor ops (softmax,
// arg-sort, gather, matmul, index_select...) in f32 on the CPU, compared with the op on `device` (on the
// CPU: the reference). This is what `cargo test` checks the references with; on a GPU it is one more check.

/// f32 composite vs op: only the summation order differs.
const VS_CANDLE_NMSE: f64 = 1e-10;

fn vs_candle_row(case: &str, r: Result<(f64, f64, String)>) -> Row {
    match r {
        Ok((nmse, time_us, note)) => Row {
            op: "vs_candle",
            case: case.to_string(),
            dtype: DType::F32,
            nmse,
            budget: VS_CANDLE_NMSE,
            time_us,
            note,
        },
        Err(e) => row_or_error(
            "vs_candle",
            case.to_string(),
            DType::F32,
            VS_CANDLE_NMSE,
            Err(e),
        ),
    }
}

/// softmax over the last dim with candle-core ops.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(candle_core::D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}

fn silu(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&(x.neg()?.exp()? + 1.0)?)
}

fn vs_candle_cases(device: &Device, rng: &mut Rng, rows: &mut Vec<Row>) -> Result<()> {
    let cpu = Device::Cpu;
    let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &cpu);

    // route: softmax, top-k by arg-sort, renormalised weights.
    let (n, e, k) = (64usize, 16usize, 4usize);
    let logits = rng.vec(n * e, 4.0);
    let r = (|| {
        let p = softmax_last(&t(&logits, &[n, e])?)?;
        let ids = p.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
        let w = p.gather(&ids, 1)?;
        let w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        let lt = upload(&logits, &[n, e], DType::F32, device)?;
        let router = Router::Softmax { norm_p: Some(1.0) };
        let ((gi, gw), us) = timed(device, || moe_route(&lt, router, k, None))?;
        let same = gi.to_device(&cpu)?.flatten_all()?.to_vec1::<u32>()?
            == ids.flatten_all()?.to_vec1::<u32>()?;
        Ok((
            nmse(&f32s(&gw)?, &f32s(&w)?),
            us,
            if same {
                String::new()
            } else {
                "ids differ".into()
            },
        ))
    })();
    rows.push(vs_candle_row(
        &format!("route softmax-renorm N={n} E={e} k={k}"),
        r,
    ));

    // experts: per expert index_select + matmul + silu * up + matmul, vs moe_experts (live rows).
    let (n, k, e, h, f) = (7usize, 2usize, 8usize, 129usize, 37usize);
    let ids = rng.ids(n, k, e);
    let d = dispatch_reference(&ids, k, e, 1)?;
    let (x0, gu0, dn0) = (
        rng.vec(n * h, 1.0),
        rng.vec(e * 2 * f * h, 0.1),
        rng.vec(e * h * f, 0.2),
    );
    let r = (|| {
        let (x, gu, dn) = (
            t(&x0, &[n, h])?,
            t(&gu0, &[e, 2 * f, h])?,
            t(&dn0, &[e, h, f])?,
        );
        let mut want = vec![0f32; d.row_token.len() * h];
        for ex in 0..e {
            let (lo, c) = (d.offsets[ex] as usize, d.counts[ex] as usize);
            if c == 0 {
                continue;
            }
            let rows_t = Tensor::from_slice(&d.row_token[lo..lo + c], c, &cpu)?;
            let xe = x.index_select(&rows_t, 0)?;
            let g = xe.matmul(&gu.get(ex)?.t()?)?;
            let act = (silu(&g.narrow(1, 0, f)?)? * g.narrow(1, f, f)?)?;
            let y: Vec<f32> = act.matmul(&dn.get(ex)?.t()?)?.flatten_all()?.to_vec1()?;
            want[lo * h..(lo + c) * h].copy_from_slice(&y);
        }
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (xt, gt, dt) = (
            dev(&x0, &[n, h])?,
            dev(&gu0, &[e, 2 * f, h])?,
            dev(&dn0, &[e, h, f])?,
        );
        let rt = Tensor::from_slice(&d.row_token, d.row_token.len(), device)?;
        let ct = Tensor::from_slice(&d.counts, e, device)?;
        let ot = Tensor::from_slice(&d.offsets, e + 1, device)?;
        let (out, us) = timed(device, || moe_experts(&xt, &rt, &ct, &ot, &gt, &dt, None))?;
        Ok((
            nmse(
                &live_rows(&f32s(&out)?, &d.row_token, h),
                &live_rows(&want, &d.row_token, h),
            ),
            us,
            String::new(),
        ))
    })();
    rows.push(vs_candle_row(
        &format!("experts N={n} k={k} E={e} H={h} F={f}"),
        r,
    ));

    // combine: index_select the slots' rows, weight, sum over the k choices.
    let (tk, a, h) = (64usize, 4usize, 136usize);
    let mut perm: Vec<u32> = (0..(tk * a) as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let (y0, w0) = (rng.vec(tk * a * h, 1.0), rng.vec(tk * a, 1.0));
    let r = (|| {
        let y = t(&y0, &[tk * a, h])?;
        let sel = y
            .index_select(&Tensor::from_slice(&perm, tk * a, &cpu)?, 0)?
            .reshape((tk, a, h))?;
        let want = sel.broadcast_mul(&t(&w0, &[tk, a, 1])?)?.sum(1)?;
        let yt = upload(&y0, &[tk * a, h], DType::F32, device)?;
        let st = Tensor::from_slice(&perm, (tk, a), device)?;
        let wt = Tensor::from_slice(&w0, (tk, a), device)?;
        let (out, us) = timed(device, || crate::moe_combine(&yt, &st, &wt))?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(&format!("combine T={tk} k={a} H={h}"), r));

    // add + RMSNorm.
    let (tn, h, eps) = (7usize, 1000usize, 1e-5f32);
    let (x0, r0) = (rng.vec(tn * h, 2.0), rng.vec(tn * h, 2.0));
    let w0: Vec<f32> = (0..h).map(|_| 1.0 + 0.5 * rng.f32()).collect();
    let r = (|| {
        let sum = (t(&x0, &[tn, h])? + t(&r0, &[tn, h])?)?;
        let var = sum.sqr()?.mean_keepdim(1)?;
        let want = sum
            .broadcast_div(&(var + eps as f64)?.sqrt()?)?
            .broadcast_mul(&t(&w0, &[h])?)?;
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (xt, rt, wt) = (dev(&x0, &[tn, h])?, dev(&r0, &[tn, h])?, dev(&w0, &[h])?);
        let ((hs, out), us) = timed(device, || add_rms_norm(&xt, &rt, &wt, eps))?;
        let n1 = nmse(&f32s(&out)?, &f32s(&want)?).max(nmse(&f32s(&hs)?, &f32s(&sum)?));
        Ok((n1, us, String::new()))
    })();
    rows.push(vs_candle_row(&format!("add_rms_norm T={tn} H={h}"), r));

    // qmatmul: the dequantized weight through candle's matmul.
    let (m, nn, kk) = (7usize, 65usize, 256usize);
    let fmt = QFormat::Int4 { group: 32 };
    let (q, p) = quantize(fmt, &rng.vec(nn * kk, 0.06), nn, kk);
    let x0 = rng.vec(m * kk, 1.0);
    let r = (|| {
        let mut wd = vec![0f32; nn * kk];
        let (kb, pr) = (
            fmt.row_bytes(kk),
            fmt.params_shape(kk).iter().product::<usize>(),
        );
        for row in 0..nn {
            crate::qmatmul::dequantize_row(
                fmt,
                &q[row * kb..][..kb],
                &p[row * pr..][..pr],
                &mut wd[row * kk..][..kk],
            );
        }
        let want = t(&x0, &[m, kk])?.matmul(&t(&wd, &[nn, kk])?.t()?)?;
        let xt = upload(&x0, &[m, kk], DType::F32, device)?;
        let qt = Tensor::from_slice(&q, (nn, kb), device)?;
        let mut pdims = vec![nn];
        pdims.extend(fmt.params_shape(kk));
        let pt = Tensor::from_slice(&p, pdims.as_slice(), device)?;
        let (out, us) = timed(device, || qmatmul(&xt, &qt, &pt, fmt))?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(
        &format!("qmatmul int4-g32 M={m} N={nn} K={kk}"),
        r,
    ));

    // QK-norm (per head, before RoPE) + rotate-half RoPE + the head transpose.
    let (b, tq, hh, dd, pos, eps) = (2usize, 5usize, 3usize, 64usize, 9usize, 1e-6f32);
    let half = dd / 2;
    let x0 = rng.vec(b * tq * hh * dd, 2.0);
    let w0: Vec<f32> = (0..dd).map(|_| 1.0 + 0.3 * rng.f32()).collect();
    let (c0, s0): (Vec<f32>, Vec<f32>) = (0..(pos + tq) * half)
        .map(|i| {
            let ang = (i / half) as f32 * 10000f32.powf(-((i % half) as f32) / half as f32);
            (ang.cos(), ang.sin())
        })
        .unzip();
    let r = (|| {
        let x = t(&x0, &[b, tq, hh, dd])?;
        let var = x.sqr()?.mean_keepdim(3)?;
        let xn = x
            .broadcast_div(&(var + eps as f64)?.sqrt()?)?
            .broadcast_mul(&t(&w0, &[dd])?)?;
        let xn = xn.transpose(1, 2)?.contiguous()?; // [B, H, T, D]
        let cos = t(&c0, &[pos + tq, half])?.narrow(0, pos, tq)?;
        let sin = t(&s0, &[pos + tq, half])?.narrow(0, pos, tq)?;
        let (x1, x2) = (xn.narrow(3, 0, half)?, xn.narrow(3, half, half)?);
        let want = Tensor::cat(
            &[
                (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?,
                (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?,
            ],
            3,
        )?;
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (xt, wt) = (dev(&x0, &[b, tq, hh, dd])?, dev(&w0, &[dd])?);
        let (ct, stt) = (dev(&c0, &[pos + tq, half])?, dev(&s0, &[pos + tq, half])?);
        let norm = Some(crate::HeadNorm {
            weight: &wt,
            eps,
            after_rope: false,
        });
        let (out, us) = timed(device, || {
            crate::qk_norm_rope(&xt, norm, &ct, &stt, pos, false)
        })?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(
        &format!("qk_norm_rope B={b} T={tq} H={hh} D={dd} pos={pos}"),
        r,
    ));

    // Decode attention: GQA over the first L rows of a [B, KV, CAP, D] cache, as matmul + softmax.
    let (b, h, kv, d, cap, len) = (2usize, 8usize, 2usize, 64usize, 300usize, 257usize);
    let scale = 1.0 / (d as f32).sqrt();
    let (q0, k0, v0) = (
        rng.vec(b * h * d, 1.0),
        rng.vec(b * kv * cap * d, 1.0),
        rng.vec(b * kv * cap * d, 1.0),
    );
    let r = (|| {
        let g = h / kv;
        let heads: Vec<u32> = (0..h as u32).map(|i| i / g as u32).collect();
        let heads = Tensor::from_slice(&heads, h, &cpu)?;
        let kc = t(&k0, &[b, kv, cap, d])?
            .narrow(2, 0, len)?
            .contiguous()?
            .index_select(&heads, 1)?; // [B, H, L, D]
        let vc = t(&v0, &[b, kv, cap, d])?
            .narrow(2, 0, len)?
            .contiguous()?
            .index_select(&heads, 1)?;
        let s = (t(&q0, &[b, h, 1, d])?.matmul(&kc.t()?)? * scale as f64)?;
        let want = softmax_last(&s)?.matmul(&vc)?;
        let dev = |v: &[f32], s: &[usize]| upload(v, s, DType::F32, device);
        let (qt, kt, vt) = (
            dev(&q0, &[b, h, 1, d])?,
            dev(&k0, &[b, kv, cap, d])?,
            dev(&v0, &[b, kv, cap, d])?,
        );
        let (out, us) = timed(device, || {
            crate::decode_attention(&qt, &kt, &vt, len, None, scale)
        })?;
        Ok((nmse(&f32s(&out)?, &f32s(&want)?), us, String::new()))
    })();
    rows.push(vs_candle_row(
        &format!("decode_attention B={b} H={h} KV={kv} D={d} L={len}"),
        r,
    ));
    Ok(())
}
