//! One Mixtral-shaped MoE layer (small dims: H 512, F 1024, 8 experts, top-2) on the CPU at
//! 1 token (decode) and 64 tokens (prefill), through the four stages as the model runs them, on both
//! execution paths: `candle` (the CPU default: host routing, candle matmuls) and `kernels` (the
//! moe-kernels ops, which on the CPU run their single-threaded references).
//! Run: `cargo bench --bench moe_layer`. Speed targets live here, never in unit tests.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use moe::config::{MoeConfig, RouterKind};
use moe::model::moe::{MoeBlock, MoeWeights};
use moe::model::PathPlan;

fn layer(h: usize, f: usize, e: usize, k: usize) -> MoeBlock {
    let dev = Device::Cpu;
    let r = |shape: &[usize], std: f64| Tensor::randn(0f32, std as f32, shape, &dev).unwrap();
    let cfg = MoeConfig {
        num_experts: e,
        top_k: k,
        expert_ffn: f,
        router: RouterKind::Softmax { norm_p: Some(1.0) },
        router_f32: false,
        shared: None,
        scale_input: false,
        correction_bias: false,
        act: Default::default(),
        biases: false,
    };
    let w = MoeWeights {
        router: r(&[e, h], 2.0 / (h as f64).sqrt()),
        gate_up: r(&[e, 2 * f, h], 1.0 / (h as f64).sqrt()).into(),
        down: r(&[e, h, f], 1.0 / (f as f64).sqrt()).into(),
        score_bias: None,
        shared: None,
        shared_gate: None,
        router_bias: None,
        gate_up_bias: None,
        down_bias: None,
    };
    MoeBlock::new(cfg, w).unwrap()
}

fn bench(c: &mut Criterion) {
    let (h, f, e, k) = (512, 1024, 8, 2);
    let block = layer(h, f, e, k);
    let mut g = c.benchmark_group("moe_layer_h512_f1024_e8_top2_f32");
    for tokens in [1usize, 64] {
        let x = Tensor::randn(0f32, 1.0, (1, tokens, h), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        g.throughput(Throughput::Elements(tokens as u64));
        for name in ["candle", "kernels"] {
            let plan = PathPlan::select(&Device::Cpu, Some(name)).unwrap();
            g.bench_with_input(BenchmarkId::new(name, tokens), &x, |b, x| {
                b.iter(|| block.forward(x, &plan).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
