//! The CPU reference of the INT8 / INT4 weight-only matmul (`moe_kernels::qmatmul` on CPU tensors: rayon over
//! output features), at decode (M = 1) and prefill (M = 128) shapes, against candle's f32 matmul on the
//! dequantized weights. Run: `cargo bench --bench qmatmul_cpu` (criterion reports medians). This replaces the
//! ignored `qmatmul_cpu_timing` unit test: speed lives in benchmarks.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use moe_kernels::qmatmul::{dequantize_row, quantize_row, QFormat};

/// Deterministic weights in [-0.5, 0.5).
fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("qmatmul_cpu");
    g.sample_size(20);
    for fmt in [QFormat::Int8, QFormat::Int4 { group: 128 }] {
        for (m, n, k) in [(1, 3072, 768), (1, 768, 1536), (128, 3072, 768)] {
            let w = lcg(n * k, 1);
            let pshape = fmt.params_shape(k);
            let (kb, pr) = (fmt.row_bytes(k), pshape.iter().product::<usize>());
            let mut q = vec![0u8; n * kb];
            let mut p = vec![f16::ZERO; n * pr];
            let mut deq = vec![0f32; n * k];
            for row in 0..n {
                let (qs, ps) = (row * kb..(row + 1) * kb, row * pr..(row + 1) * pr);
                quantize_row(
                    fmt,
                    &w[row * k..(row + 1) * k],
                    &mut q[qs.clone()],
                    &mut p[ps.clone()],
                );
                dequantize_row(fmt, &q[qs], &p[ps], &mut deq[row * k..(row + 1) * k]);
            }
            let x = Tensor::from_vec(lcg(m * k, 2), (m, k), &dev).unwrap();
            let qt = Tensor::from_vec(q, (n, kb), &dev).unwrap();
            let pt = Tensor::from_vec(p, [&[n][..], &pshape].concat(), &dev).unwrap();
            let wt = Tensor::from_vec(deq, (n, k), &dev).unwrap();
            let id = format!("{fmt:?} M={m} N={n} K={k}");
            g.throughput(Throughput::Elements((m * n * k) as u64));
            g.bench_with_input(BenchmarkId::new("moe-kernels", &id), &(), |b, _| {
                b.iter(|| moe_kernels::qmatmul(&x, &qt, &pt, fmt).unwrap())
            });
            g.bench_with_input(
                BenchmarkId::new("candle f32 dequantized", &id),
                &(),
                |b, _| b.iter(|| x.matmul(&wt.t().unwrap()).unwrap()),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
