//! `bench --sweep experts|topk|batch` on a small random Mixtral-shaped model:
//! - experts: E varies at fixed top-k and expert width; decode time should stay flat (the
//!   bytes read per token do not change) while weight memory grows linearly;
//! - topk: k varies at fixed E; time should follow the active bytes;
//! - batch: B varies; each step reads the distinct experts E(1-(1-k/E)^B) per layer.
//!
//! Every point is measured and printed next to the cost model's prediction.

use candle_core::{DType, Device};
use serde::Serialize;

use super::measure::Stat;
use super::{env, predict, random, timed_runs, BenchArgs, Env, Sourced};
use crate::analysis::bytes::weight_bytes;
use crate::analysis::counts::tensor_inventory;
use crate::analysis::roofline::expected_experts_touched;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepKind {
    Experts,
    Topk,
    Batch,
}

impl SweepKind {
    pub fn name(self) -> &'static str {
        match self {
            SweepKind::Experts => "experts",
            SweepKind::Topk => "topk",
            SweepKind::Batch => "batch",
        }
    }

    pub fn default_points(self) -> Vec<usize> {
        self.series(match self {
            SweepKind::Experts => 5,
            SweepKind::Topk => 4,
            SweepKind::Batch => 6,
        })
    }

    /// The first `n` values of this sweep's doubling series (experts 2, 4, 8..; topk and
    /// batch 1, 2, 4..).
    pub fn series(self, n: usize) -> Vec<usize> {
        let first = match self {
            SweepKind::Experts => 2,
            SweepKind::Topk | SweepKind::Batch => 1,
        };
        (0..n).map(|i| first << i).collect()
    }

    /// The values to sweep from `--points`: none gives the default series; a single number N
    /// is a count, the first N values of the series (`--points 3` is three points, not the one
    /// point 3); two or more numbers are swept exactly as given.
    pub fn points(self, given: Option<&[usize]>) -> Result<Vec<usize>> {
        let points = match given {
            None => self.default_points(),
            Some([]) => Vec::new(),
            Some(&[n]) if n > MAX_COUNT => {
                return Err(Error::Input(format!(
                    "--points {n}: a single number is a count of points (at most {MAX_COUNT}); \
                     give the values as a comma list, e.g. --points 2,{n}"
                )))
            }
            Some(&[n]) => self.series(n),
            Some(v) => v.to_vec(),
        };
        if points.is_empty() || points.contains(&0) {
            return Err(Error::Input("--points must be positive integers".into()));
        }
        Ok(points)
    }
}

/// Most points a single `--points N` may ask for (the series doubles each point).
const MAX_COUNT: usize = 16;

/// One sweep point.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    /// The swept value (E, k or B).
    pub value: usize,
    pub experts: usize,
    pub top_k: usize,
    pub batch: usize,
    /// Decode tokens/s (B tokens per step) over the runs.
    pub decode_tokens_per_s: Stat,
    /// Median seconds per decode step, measured.
    pub step_s: f64,
    /// Roofline seconds per decode step: max(bytes / bandwidth, FLOPs / peak).
    pub predicted_step_s: f64,
    pub predicted_bytes_per_step: f64,
    pub bound: String,
    pub pct_of_roofline: f64,
    pub experts_touched_measured: Option<f64>,
    pub experts_touched_predicted: f64,
    pub weight_bytes_measured: u64,
    pub weight_bytes_predicted: u64,
    pub prefill_tokens_per_s: Stat,
    /// With `--cuda-graph`: CUDA graph replays per decoded token over the timed runs (a replay
    /// decodes the point's B tokens; the rest of the steps warmed up, were captured or ran eagerly).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graph_replays_per_token: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub env: Env,
    pub sweep: SweepKind,
    /// The fixed shape of the model, e.g. "2 layers, H=512, F=1024, vocab 1024".
    pub base: String,
    pub prompt_len: usize,
    pub gen: usize,
    pub runs: usize,
    /// `--cuda-graph`: decode steps replayed as CUDA graphs where they could be.
    pub cuda_graph: bool,
    pub bandwidth_gb_s: Sourced,
    pub peak_tflops: Sourced,
    pub rows: Vec<SweepRow>,
}

/// A Mixtral-shaped config: `layers` MoE layers of `experts` SwiGLU experts of width `ffn`,
/// 8 query heads and 2 KV heads of H/8.
pub fn small_mixtral(
    layers: usize,
    hidden: usize,
    ffn: usize,
    experts: usize,
    top_k: usize,
    vocab: usize,
) -> Result<ModelConfig> {
    let heads = 8;
    if !hidden.is_multiple_of(heads) || !(hidden / heads).is_multiple_of(2) {
        return Err(Error::Input(format!(
            "--hidden {hidden} must be a multiple of 16 (8 heads of even size)"
        )));
    }
    let json = serde_json::json!({
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "max_position_embeddings": 4096,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false
    });
    ModelConfig::from_json_str(&json.to_string(), "small-mixtral".as_ref())
}

/// Runs every point of the sweep.
pub fn sweep(a: &BenchArgs, kind: SweepKind) -> Result<SweepReport> {
    if a.prompt_len == 0 || a.gen == 0 || a.batch == 0 {
        return Err(Error::Input(
            "--prompt-len, --gen and --batch must be at least 1".into(),
        ));
    }
    let (device, emu_scope) = super::bench_device(a)?;
    let dtype = super::dtype_of(a, &device)?;
    let layers = a.layers.unwrap_or(2);
    let points = kind.points(a.points.as_deref())?;
    let (bw, peak) = super::ceilings(a, &device, dtype)?;
    let emu = emu_scope.is_some();
    let mut rows = Vec::with_capacity(points.len());
    for &v in &points {
        let (e, k, b) = match kind {
            SweepKind::Experts => (v, a.top_k.min(v), a.batch),
            SweepKind::Topk => (a.experts, v, a.batch),
            SweepKind::Batch => (a.experts, a.top_k, v),
        };
        if k > e {
            return Err(Error::Input(format!("top-k {k} exceeds {e} experts")));
        }
        let cfg = small_mixtral(layers, a.hidden, a.ffn, e, k, a.vocab)?;
        rows.push(point(
            a, &cfg, v, b, dtype, &device, emu, bw.value, peak.value,
        )?);
    }
    Ok(SweepReport {
        env: env(&device, dtype),
        sweep: kind,
        base: format!(
            "Mixtral-shaped, random weights (seed {}): {layers} layers, H={}, F={}, 8/2 heads, vocab {}; E={}, k={}, B={} unless swept",
            a.seed, a.hidden, a.ffn, a.vocab, a.experts, a.top_k, a.batch
        ),
        prompt_len: a.prompt_len,
        gen: a.gen,
        runs: a.runs.max(1),
        cuda_graph: a.cuda_graph,
        bandwidth_gb_s: bw,
        peak_tflops: peak,
        rows,
    })
}

#[allow(clippy::too_many_arguments)]
fn point(
    a: &BenchArgs,
    cfg: &ModelConfig,
    value: usize,
    batch: usize,
    dtype: DType,
    device: &Device,
    emu: bool,
    bw: f64,
    peak: f64,
) -> Result<SweepRow> {
    let quant = super::quant_of(a)?;
    let wdt = super::weight_dtype_of(a, dtype, device)?;
    let prec = super::precision_of(a, dtype, wdt)?;
    super::check_memory(a, cfg, "the sweep model", dtype, wdt, batch, device)?;
    let w = random::random_weights_as(cfg, a.seed, dtype, wdt, device, quant)?;
    let mut model = Model::new(cfg.clone(), w, dtype, device)?;
    if emu {
        model.set_exec_path(crate::model::ExecPath::Kernels);
    }
    let samples = timed_runs(&model, a, batch, a.cuda_graph)?;
    let ctx = (a.prompt_len + a.gen / 2) as u64;
    let pr = predict(cfg, prec, batch, 0, ctx, bw, peak);
    let decode = Stat::of(
        &samples
            .iter()
            .map(|s| (batch * a.gen) as f64 / s.decode_s)
            .collect::<Vec<_>>(),
    );
    let prefill = Stat::of(
        &samples
            .iter()
            .map(|s| (batch * a.prompt_len) as f64 / s.prefill_s)
            .collect::<Vec<_>>(),
    );
    let touched: Vec<f64> = samples.iter().filter_map(|s| s.experts_touched).collect();
    let (e, k) = match &cfg.layers[0] {
        crate::config::FfnKind::Moe(m) => (m.num_experts, m.top_k),
        _ => unreachable!("small_mixtral is all MoE"),
    };
    let step_s = batch as f64 / decode.median;
    let predicted_step_s = batch as f64 / pr.ceiling_tokens_per_s;
    Ok(SweepRow {
        value,
        experts: e,
        top_k: k,
        batch,
        pct_of_roofline: 100.0 * predicted_step_s / step_s,
        decode_tokens_per_s: decode,
        step_s,
        predicted_step_s,
        predicted_bytes_per_step: pr.bytes,
        bound: pr.bound.into(),
        experts_touched_measured: (!touched.is_empty())
            .then(|| touched.iter().sum::<f64>() / touched.len() as f64),
        experts_touched_predicted: expected_experts_touched(e, k, batch as u64),
        weight_bytes_measured: model.weight_bytes() as u64,
        weight_bytes_predicted: weight_bytes(&tensor_inventory(cfg), prec),
        prefill_tokens_per_s: prefill,
        cuda_graph_replays_per_token: a.cuda_graph.then(|| {
            let replays: u64 = samples.iter().map(|s| s.graph_replays).sum();
            replays as f64 / (samples.len() * batch * a.gen) as f64
        }),
    })
}
