//! Timing of prefill and decode through [`Model::forward`], and the machine's own ceilings
//! (read bandwidth, matmul peak) when no figure is given.
//!
//! A result is read back to the host (argmax ids) before the clock is read, and on CUDA the
//! device is synchronized first, so asynchronous work is never timed as done.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use crate::error::Result;
use crate::model::kv_cache::KvCache;
use crate::model::{Model, SeqStep, Trace};
use crate::runtime::graph::GraphDecoder;

/// Median, 10th and 90th percentile of samples (nearest rank on the sorted samples).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| -> f64 {
            if s.is_empty() {
                return f64::NAN;
            }
            let i = (p * (s.len() - 1) as f64).round() as usize;
            s[i.min(s.len() - 1)]
        };
        let median = if s.is_empty() {
            f64::NAN
        } else if s.len() % 2 == 1 {
            s[s.len() / 2]
        } else {
            (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
        };
        Stat {
            median,
            p10: q(0.1),
            p90: q(0.9),
            samples: samples.to_vec(),
        }
    }
}

/// One timed generation: prefill of `[B, P]`, then `gen` decode steps of `[B, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSample {
    pub prefill_s: f64,
    /// All decode steps together.
    pub decode_s: f64,
    /// Mean over decode steps and MoE layers of the distinct experts the step's B tokens chose.
    pub experts_touched: Option<f64>,
    /// Bytes of the KV cache allocated for the run.
    pub kv_bytes: usize,
    /// moe-kernels launches of the timed decode steps (0 where the ops ran their CPU references),
    /// a CUDA graph replay counted as one.
    pub decode_launches: u64,
    /// The moe-kernels entry points the decode steps launch, sorted (recorded in the untimed
    /// replay of `RunHow::count_experts`; empty without it, or where the ops ran their CPU
    /// references).
    pub decode_entries: Vec<String>,
    /// CUDA graph replays among the timed decode steps (`RunHow::graph`).
    pub graph_replays: u64,
    /// The nodes of the last decode-step graph captured (`RunHow::graph` on CUDA).
    pub graph_nodes: Option<crate::runtime::graph::NodeCensus>,
    /// The greedy ids the timed run read back, step by step (prefill's, then each decode step's):
    /// `(gen + 1) x B`, what `--baseline` compares token for token.
    pub tokens: Vec<u32>,
}

fn sync(device: &Device) -> Result<()> {
    Ok(device.synchronize()?)
}

/// Deterministic prompt ids in `1..vocab` (never all zeros): `batch` rows of `len`.
pub fn prompt_ids(vocab: usize, batch: usize, len: usize, seed: u64) -> Vec<u32> {
    let mut s = seed ^ 0x5851_F42D_4C95_7F2D;
    (0..batch * len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + ((s >> 33) % (vocab.max(2) as u64 - 1)) as u32
        })
        .collect()
}

/// Distinct experts per MoE layer in one forward's trace of `batch` tokens.
fn distinct_experts(t: &Trace) -> Option<f64> {
    let layers: Vec<usize> = t
        .router_ids
        .iter()
        .filter(|ids| !ids.is_empty())
        .map(|ids| {
            let mut v = ids.clone();
            v.sort_unstable();
            v.dedup();
            v.len()
        })
        .collect();
    (!layers.is_empty()).then(|| layers.iter().sum::<usize>() as f64 / layers.len() as f64)
}

/// One step of `caches.len()` sequences, each with its own cache, through
/// [`Model::forward_batch`] (the ragged batch `moe-run serve`'s continuous batching runs):
/// `inputs[s]` are sequence s's new ids. Returns each sequence's greedy next id, read back in one
/// device-to-host copy.
fn batch_step(
    model: &Model,
    caches: &mut [KvCache],
    inputs: &[&[u32]],
    trace: Option<&mut Trace>,
) -> Result<Vec<u32>> {
    let mut steps: Vec<SeqStep> = caches
        .iter_mut()
        .zip(inputs)
        .map(|(cache, ids)| SeqStep { ids, cache })
        .collect();
    let logits = model.forward_batch(&mut steps, trace)?; // [B, V]
    let next = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
    Ok(crate::model::host::read_vec::<u32>(&next)?)
}

/// `gen` greedy decode steps from the ids `next` (one per sequence). Untraced, each step's ids are
/// appended to `tokens`; with `on_trace` every step is traced (which reads each MoE layer's
/// routing to the host) and the trace handed over.
fn decode_steps(
    model: &Model,
    caches: &mut [KvCache],
    mut next: Vec<u32>,
    gen: usize,
    mut on_trace: Option<&mut dyn FnMut(&Trace)>,
    tokens: &mut Vec<u32>,
) -> Result<()> {
    let mut trace = Trace::default();
    for _ in 0..gen {
        let tr = on_trace.is_some().then_some(&mut trace);
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<&[u32]> = inputs.iter().map(|t| &t[..]).collect();
        next = batch_step(model, caches, &inputs, tr)?;
        match on_trace.as_mut() {
            Some(f) => f(&trace),
            None => tokens.extend_from_slice(&next),
        }
    }
    Ok(())
}

/// Prefill `ids` (`batch` rows), then `gen` greedy decode steps; times both. Each row is its own
/// sequence with its own KV cache, all advanced together in one forward pass per step (the
/// serving engine's batch). The timed steps read back only the sampled ids (what generation
/// does). With `count_experts`, the same steps run once more untimed with a routing trace (which
/// reads every MoE layer's routing to the host) to count the distinct experts per step.
/// How [`run_once`] runs beyond its shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunHow {
    /// Count the distinct experts per step too (an untimed traced replay of the steps).
    pub count_experts: bool,
    /// Batch 1: decode through [`GraphDecoder`] (CUDA graph replays where possible).
    pub graph: bool,
}

pub fn run_once(
    model: &Model,
    ids: &[u32],
    batch: usize,
    gen: usize,
    how: RunHow,
) -> Result<RunSample> {
    let count_experts = how.count_experts;
    let dev = model.device().clone();
    let p = ids.len() / batch.max(1);
    let prompts: Vec<&[u32]> = ids.chunks(p.max(1)).take(batch).collect();
    let mut caches = (0..batch)
        .map(|_| model.new_cache(1, p + gen))
        .collect::<candle_core::Result<Vec<_>>>()?;
    sync(&dev)?;
    let t0 = Instant::now();
    let next = batch_step(model, &mut caches, &prompts, None)?;
    let mut tokens = next.clone();
    sync(&dev)?;
    let prefill_s = t0.elapsed().as_secs_f64();

    let launched = moe_kernels::launch::launched();
    let (mut graph_replays, mut graph_nodes) = (0, None);
    let t1 = Instant::now();
    if how.graph {
        // On the emulator, the stand-in backend (replays re-run the captured pass): the
        // launch count of graph mode without a GPU.
        let mut g = GraphDecoder::new(model);
        let mut ids = next.clone();
        for _ in 0..gen {
            let logits = g.step_batch(model, &mut caches, &ids)?;
            // One row of logits per sequence; one read of the B sampled ids per step.
            let v = logits.dim(candle_core::D::Minus1)?;
            let am = logits.reshape(((), v))?.argmax(1)?;
            ids = crate::model::host::read_vec::<u32>(&am)?;
            tokens.extend_from_slice(&ids);
        }
        (graph_replays, graph_nodes) = (g.replays, g.nodes);
    } else {
        decode_steps(model, &mut caches, next.clone(), gen, None, &mut tokens)?;
    }
    sync(&dev)?;
    let decode_s = t1.elapsed().as_secs_f64();
    let decode_launches = moe_kernels::launch::launched() - launched;

    let (mut touched, mut steps) = (0.0, 0usize);
    let mut decode_entries = Vec::new();
    if count_experts {
        // The same greedy steps again from the prompt's cache state, traced and untimed; the
        // moe-kernels entry points they launch are recorded on the way.
        caches.iter_mut().for_each(KvCache::reset);
        batch_step(model, &mut caches, &prompts, None)?;
        let (res, plans) = moe_kernels::launch::record(|| {
            decode_steps(
                model,
                &mut caches,
                next,
                gen,
                Some(&mut |t| {
                    if let Some(d) = distinct_experts(t) {
                        touched += d;
                        steps += 1;
                    }
                }),
                &mut Vec::new(),
            )
        });
        res?;
        let names: std::collections::BTreeSet<&str> = plans
            .iter()
            .flat_map(|p| p.launches.iter().map(|l| l.entry.as_str()))
            .collect();
        decode_entries = names.into_iter().map(String::from).collect();
    }
    Ok(RunSample {
        decode_entries,
        decode_launches,
        graph_replays,
        graph_nodes,
        prefill_s,
        decode_s,
        experts_touched: (steps > 0).then(|| touched / steps as f64),
        kv_bytes: caches.iter().map(KvCache::bytes).sum(),
        tokens,
    })
}

/// GPU memory bandwidth from a device-to-device copy: best of several copies of a 1 GiB tensor,
/// counting the bytes read plus the bytes written, in GB/s (the CPU's ceiling is
/// [`read_bandwidth_gb_s`]).
pub fn device_copy_bandwidth_gb_s(device: &Device) -> Result<f64> {
    let n = 1usize << 28; // 2^28 f32 = 1 GiB
    let src = Tensor::zeros(n, DType::F32, device)?;
    let _ = src.copy()?; // warm-up
    sync(device)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let dst = src.copy()?;
        sync(device)?;
        std::hint::black_box(&dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (4 * n) as f64 / best / 1e9)
}

/// Matmul throughput of `device` in `dtype`: best of a few `[n, n] x [n, n]` products, TFLOPS.
pub fn matmul_peak_tflops(device: &Device, dtype: DType, n: usize) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?; // warm-up
    sync(device)?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        sync(device)?;
        std::hint::black_box(&c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e12)
}

/// Host read bandwidth: [`moe_kernels::cpu::read_bandwidth_gb_s`] over 256 MiB on the compute pool
/// (bytes read only: the ceiling of a kernel that streams weights once).
pub fn read_bandwidth_gb_s() -> f64 {
    moe_kernels::cpu::read_bandwidth_gb_s(256 << 20)
}

/// The CPU expert kernel alone at a decode step: one token through `top_k` experts (gate/up +
/// SwiGLU + down), median of 30 calls after 3 untimed, each call on the next group of `top_k`
/// experts of the next MoE layer, so that the weights come from memory and not from a cache the
/// previous call filled; the weight bytes of those experts over that time, in GB/s. `None` off the
/// CPU kernels or without MoE layers. Returns (GB/s, median seconds, bytes per call).
pub fn expert_stream(model: &Model) -> Result<Option<(f64, f64, u64)>> {
    // Layers split by a hybrid placement hold only their resident experts: left out.
    let blocks: Vec<_> = model.moe_blocks().filter(|b| b.host.is_none()).collect();
    let (Some(first), Some(level)) = (blocks.first(), model.plan().cpu_experts()) else {
        return Ok(None);
    };
    if !model.device().is_cpu() {
        return Ok(None);
    }
    let (e, k) = (first.cfg.num_experts, first.cfg.top_k);
    let h = model.cfg.hidden_size;
    let x = Tensor::randn(0f32, 1f32, (1, h), &Device::Cpu)?;
    let row_token = vec![0u32; k];
    // Every (layer, group of k experts); offsets give group g's experts one row each.
    let calls: Vec<(usize, Vec<u32>)> = (0..blocks.len())
        .flat_map(|b| {
            (0..e / k.max(1)).map(move |g| {
                let offsets = (0..=e)
                    .map(|i| i.clamp(g * k, g * k + k) as u32 - (g * k) as u32)
                    .collect();
                (b, offsets)
            })
        })
        .collect();
    let bytes = ((first.gate_up.bytes() + first.down.bytes()) / e * k) as u64;
    let mut times = Vec::new();
    for i in 0..33 {
        let (b, offsets) = &calls[i % calls.len()];
        let moe = blocks[*b];
        let t = Instant::now();
        let y = moe_kernels::cpu::moe_experts_cpu(
            level,
            &x,
            &row_token,
            offsets,
            moe.gate_up.kernel_ref(),
            moe.down.kernel_ref(),
        )?;
        std::hint::black_box(y);
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let t = Stat::of(&times).median;
    Ok(Some((bytes as f64 / t / 1e9, t, bytes)))
}
