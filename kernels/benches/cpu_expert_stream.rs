//! The CPU expert kernel (`moe_kernels::cpu::experts`) at a decode step on Mixtral-8x7B's expert shapes
//! (H 4096, F 14336, top-2 of 8), per format and kernel level, next to the streaming read bandwidth of the
//! same pool measured in the same run: the share of it that the kernel reaches is the number the CPU
//! path's design is judged by. Weights are random (speed does not depend on values); each call takes the
//! next pair of experts, so the weights come from memory, not from a cache the previous call filled.
//!
//! Run: `cargo bench -p moe-kernels --bench cpu_expert_stream` (`RAYON_NUM_THREADS` sets the threads;
//! `EXPERT_SHAPE=H,F` another shape; `EXPERT_CALLS` the timed calls). Prints medians.

use std::time::Instant;

use half::f16;
use moe_kernels::cpu::{experts, Level, Mat, Rows};
use moe_kernels::qformat::QFormat;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Random bytes from a 64-bit LCG.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 56) as u8
        })
        .collect()
}

/// Storage of one format: packed bytes (or bf16 bits) and f16 params (u8 exponents for MXFP4).
struct Store {
    fmt: Option<QFormat>,
    q: Vec<u8>,
    p: Vec<f16>,
    e: Vec<u8>,
}

impl Store {
    fn new(fmt: Option<QFormat>, rows: usize, k: usize, seed: u64) -> Store {
        let mut e = Vec::new();
        let (q, p) = match fmt {
            None => {
                // bf16 of small normal-ish values: exponent bytes near 0x3c.
                let mut b = bytes(2 * rows * k, seed);
                b.iter_mut()
                    .skip(1)
                    .step_by(2)
                    .for_each(|v| *v = 0x3c | (*v & 0x81));
                (b, Vec::new())
            }
            Some(QFormat::Mxfp4) => {
                // Exponents 118..=121: scales 2^-9..2^-6, weights of the size gpt-oss's are.
                let pr: usize = QFormat::Mxfp4.params_shape(k).iter().product();
                e = bytes(rows * pr, seed + 7)
                    .iter()
                    .map(|b| 118 + b % 4)
                    .collect();
                (bytes(rows * QFormat::Mxfp4.row_bytes(k), seed), Vec::new())
            }
            Some(f) => {
                let pr: usize = f.params_shape(k).iter().product();
                let p = (0..rows * pr)
                    .map(|i| f16::from_f32(if i % 2 == 0 { 0.01 } else { 8.0 }))
                    .collect();
                (bytes(rows * f.row_bytes(k), seed), p)
            }
        };
        Store { fmt, q, p, e }
    }

    /// Bytes stored: weights and params.
    fn bytes(&self) -> usize {
        self.q.len() + 2 * self.p.len() + self.e.len()
    }

    fn mat(&self, rows: usize, k: usize) -> Mat<'_> {
        match self.fmt {
            None => Mat {
                // SAFETY: bf16 is two bytes with no invalid bit patterns; the Vec<u8> outlives the view.
                data: Rows::Bf16(unsafe {
                    std::slice::from_raw_parts(
                        self.q.as_ptr() as *const half::bf16,
                        self.q.len() / 2,
                    )
                }),
                rows,
                k,
            },
            Some(QFormat::Mxfp4) => Mat::quant(QFormat::Mxfp4, &self.q, &self.e, rows, k),
            Some(f) => Mat::quant(f, &self.q, &self.p, rows, k),
        }
    }
}

fn main() {
    let (h, f) = std::env::var("EXPERT_SHAPE")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once(',')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .unwrap_or((4096usize, 14336usize));
    let calls: usize = std::env::var("EXPERT_CALLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let (e, top_k) = (8usize, 2usize);
    let bw = moe_kernels::cpu::read_bandwidth_gb_s(1 << 30);
    println!(
        "threads {}, H {h}, F {f}, {e} experts top-{top_k}; streaming read {bw:.1} GB/s",
        rayon::current_num_threads()
    );
    let levels = [Level::detect(), Level::default_for_cpu(), Level::Portable];
    let formats = [
        ("bf16", None),
        ("int8", Some(QFormat::Int8)),
        ("int4:32", Some(QFormat::Int4 { group: 32 })),
        ("int4:128", Some(QFormat::Int4 { group: 128 })),
        ("mxfp4", Some(QFormat::Mxfp4)),
    ];
    for (name, fmt) in formats {
        let gu = Store::new(fmt, e * 2 * f, h, 1);
        let dn = Store::new(fmt, e * h, f, 2);
        let (gum, dnm) = (gu.mat(e * 2 * f, h), dn.mat(e * h, f));
        let per_call = (gu.bytes() + dn.bytes()) / e * top_k;
        let x: Vec<f32> = bytes(h, 3)
            .iter()
            .map(|&b| b as f32 / 128.0 - 1.0)
            .collect();
        let mut seen = Vec::new();
        for level in levels {
            if seen.contains(&level) {
                continue;
            }
            seen.push(level);
            let (mut xg, mut act, mut out) = (Vec::new(), Vec::new(), vec![0f32; top_k * h]);
            let times: Vec<f64> = (0..calls + 2)
                .map(|i| {
                    let g = i % (e / top_k);
                    let offsets: Vec<u32> = (0..=e)
                        .map(|j| (j.clamp(g * top_k, g * top_k + top_k) - g * top_k) as u32)
                        .collect();
                    let t = Instant::now();
                    experts::experts(
                        level,
                        &x,
                        h,
                        &vec![0; top_k],
                        &offsets,
                        &gum,
                        &dnm,
                        &Default::default(),
                        &mut xg,
                        &mut act,
                        &mut out,
                    );
                    t.elapsed().as_secs_f64()
                })
                .skip(2)
                .collect();
            let t = median(times);
            let gbs = per_call as f64 / t / 1e9;
            println!(
                "{name:>9} {:>9}: {:7.2} ms/call  {gbs:6.1} GB/s  {:5.1}% of read bandwidth",
                level.name(),
                t * 1e3,
                100.0 * gbs / bw
            );
        }
    }
}
