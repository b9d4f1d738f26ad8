//! `bench --baseline candle`: the same weights through candle-transformers' own Mixtral
//! (`candle_transformers::models::mixtral`), timed the same way (prefill of `[B, P]`, then
//! greedy decode steps, argmax read back before the clock), in the same process.
//!
//! Random weights are handed over under Mixtral's Hugging Face names as views of our
//! canonical tensors (fused qkv rows and stacked experts narrowed, no copy); the embedded
//! model is read from its safetensors bytes; a checkpoint directory (`--weights DIR`) is read
//! through our `Checkpoint` (single file or shards) only when the baseline runs, i.e. after our
//! timed runs and peak-RSS reading, so candle's copy of the weights is not charged to us.
//! Only `model_type: mixtral` can run there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::mixtral;
use serde::Serialize;

use super::measure::Stat;
use crate::config::{FfnKind, ModelConfig};
use crate::error::{Error, Result};
use crate::model::{AttnWeights, FfnWeights, ModelWeights, Weight};

/// Where candle's model gets its weights.
pub enum BaselineWeights {
    /// Tensors under Mixtral's HF names, already in the compute dtype.
    Tensors(HashMap<String, Tensor>),
    /// A Mixtral checkpoint directory, read by [`tensors_from_dir`] when the baseline runs.
    Dir(PathBuf),
    /// Quantized random weights, drawn again (the same values) and dequantized only when the
    /// baseline runs, so the dense copy never counts in our memory figures.
    Random {
        seed: u64,
        dtype: DType,
        quant: crate::quant::QFormat,
    },
}

/// Adds `lm_head.weight` as the embedding when the checkpoint ties them (candle's Mixtral
/// always reads `lm_head.weight`).
fn tie_lm_head(m: &mut HashMap<String, Tensor>) {
    if !m.contains_key("lm_head.weight") {
        if let Some(e) = m.get("model.embed_tokens.weight").cloned() {
            m.insert("lm_head.weight".into(), e);
        }
    }
}

/// The float tensors of a Mixtral checkpoint directory (`model.safetensors` or shards) in
/// `dtype`, skipping decoder layers >= `cfg.num_layers()` (`--layers N`).
pub fn tensors_from_dir(
    dir: &Path,
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    check(cfg)?;
    let ck = crate::loader::Checkpoint::open_dir(dir)?;
    let keep = |name: &str| match name.strip_prefix("model.layers.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_none_or(|i| i < cfg.num_layers()),
        None => true,
    };
    let mut m = HashMap::new();
    for name in ck.names().filter(|n| keep(n)) {
        let (st, shape, bytes) = ck.raw(name).expect("name listed by the checkpoint");
        let dt = match st {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::Input(format!(
                    "--baseline candle needs a dense float checkpoint; {name} in {} is {other:?}",
                    dir.display()
                )))
            }
        };
        let t = Tensor::from_raw_buffer(bytes, dt, &shape, device)?.to_dtype(dtype)?;
        m.insert(name.to_string(), t);
    }
    tie_lm_head(&mut m);
    Ok(m)
}

/// A Mixtral safetensors file's tensors in `dtype` (a tied lm_head added as the embedding,
/// since candle's Mixtral always reads `lm_head.weight`).
pub fn tensors_from_safetensors(
    bytes: &[u8],
    cfg: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    check(cfg)?;
    let mut m = candle_core::safetensors::load_buffer(bytes, device)?;
    for t in m.values_mut() {
        *t = t.to_dtype(dtype)?;
    }
    tie_lm_head(&mut m);
    Ok(m)
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    pub name: String,
    pub prefill_tokens_per_s: Stat,
    pub decode_tokens_per_s: Stat,
    /// candle's median time / ours, prefill (> 1: ours is faster).
    pub prefill_time_ratio_candle_over_ours: f64,
    /// candle's median time / ours, decode.
    pub decode_time_ratio_candle_over_ours: f64,
    /// Greedy ids (prefill's, then each decode step's, `(gen + 1) x B`) equal to ours, of those
    /// compared: the two engines timed the same work only if they agree (in f32 they should all).
    pub tokens_equal: usize,
    pub tokens_compared: usize,
}

/// The weight as candle's dense model needs it: itself, or a quantized weight dequantized (f32,
/// the baseline's dtype), so both engines compute with the same values.
fn dense(w: &Weight) -> Result<Tensor> {
    match w {
        Weight::Dense(t) => Ok(t.clone()),
        Weight::Quant(q) => Ok(q.dequantize(candle_core::DType::F32)?),
    }
}

/// `cfg` must be a plain Mixtral (candle's model has no other family).
pub fn check(cfg: &ModelConfig) -> Result<()> {
    if cfg.model_type != "mixtral" || cfg.mla.is_some() {
        return Err(Error::Input(format!(
            "--baseline candle exists only for Mixtral-family models (model_type \"mixtral\"): \
             it runs candle-transformers' mixtral::Model; this model's model_type is {:?}",
            cfg.model_type
        )));
    }
    Ok(())
}

/// candle-transformers 0.11's Mixtral runs in f32 only: its MoE block scales each expert's
/// output by routing weights it builds as an f32 tensor (`Tensor::new(&[f32])`), which fails
/// with "dtype mismatch in mul" against bf16/f16 activations.
pub fn check_dtype(dtype: DType) -> Result<()> {
    if dtype != DType::F32 {
        return Err(Error::Input(format!(
            "--baseline candle needs --dtype f32 (got {dtype:?}): candle-transformers 0.11's \
             mixtral::Model multiplies expert outputs by f32 routing weights and fails in bf16/f16"
        )));
    }
    Ok(())
}

/// Our canonical weights under Mixtral's HF names (views, no copies).
pub fn hf_tensors(cfg: &ModelConfig, w: &ModelWeights) -> Result<HashMap<String, Tensor>> {
    check(cfg)?;
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".to_string(), w.embed.clone());
    m.insert("model.norm.weight".to_string(), w.final_norm.clone());
    m.insert("lm_head.weight".to_string(), w.lm_head.clone());
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    for (i, l) in w.layers.iter().enumerate() {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        m.insert(p("input_layernorm.weight"), l.attn_norm.clone());
        m.insert(p("post_attention_layernorm.weight"), l.ffn_norm.clone());
        let AttnWeights::Gqa { qkv, o, .. } = &l.attn else {
            return Err(Error::Input("--baseline candle: GQA only".into()));
        };
        let qkv = dense(qkv)?;
        m.insert(p("self_attn.q_proj.weight"), qkv.narrow(0, 0, q)?);
        m.insert(p("self_attn.k_proj.weight"), qkv.narrow(0, q, kv)?);
        m.insert(p("self_attn.v_proj.weight"), qkv.narrow(0, q + kv, kv)?);
        m.insert(p("self_attn.o_proj.weight"), dense(o)?);
        let FfnWeights::Moe(moe) = &l.ffn else {
            return Err(Error::Input("--baseline candle: MoE layers only".into()));
        };
        m.insert(p("block_sparse_moe.gate.weight"), moe.router.clone());
        let (gu, dn) = (dense(&moe.gate_up)?, dense(&moe.down)?);
        let f = dn.dim(2)?;
        for e in 0..gu.dim(0)? {
            let x = |n: &str| p(&format!("block_sparse_moe.experts.{e}.{n}.weight"));
            let g = gu.get(e)?;
            m.insert(x("w1"), g.narrow(0, 0, f)?);
            m.insert(x("w3"), g.narrow(0, f, f)?);
            m.insert(x("w2"), dn.get(e)?);
        }
    }
    Ok(m)
}

fn candle_config(cfg: &ModelConfig) -> Result<mixtral::Config> {
    let FfnKind::Moe(moe) = &cfg.layers[0] else {
        return Err(Error::Input("--baseline candle: MoE layers only".into()));
    };
    let json = serde_json::json!({
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": moe.expert_ffn,
        "num_hidden_layers": cfg.num_layers(),
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm.eps(),
        "rope_theta": cfg.rope.theta,
        "sliding_window": cfg.sliding_window.unwrap_or(cfg.max_position_embeddings),
        "num_experts_per_tok": moe.top_k,
        "num_local_experts": moe.num_experts,
        "use_flash_attn": false,
    });
    serde_json::from_value(json).map_err(|e| Error::Input(format!("candle Mixtral config: {e}")))
}

/// Times candle's Mixtral on the same shapes; `ours` are our (prefill, decode) median times.
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &ModelConfig,
    weights: &BaselineWeights,
    dtype: DType,
    device: &Device,
    ids: &[u32],
    batch: usize,
    gen: usize,
    runs: usize,
    warmup: usize,
    ours: (f64, f64),
    our_tokens: &[u32],
) -> Result<BaselineReport> {
    check(cfg)?;
    check_dtype(dtype)?;
    let ccfg = candle_config(cfg)?;
    let read;
    let tensors = match weights {
        BaselineWeights::Tensors(m) => m,
        BaselineWeights::Dir(dir) => {
            read = tensors_from_dir(dir, cfg, dtype, device)?;
            &read
        }
        BaselineWeights::Random {
            seed,
            dtype: ours,
            quant,
        } => {
            let w = super::random::random_weights(cfg, *seed, *ours, device, Some(*quant))?;
            read = hf_tensors(cfg, &w)?;
            &read
        }
    };
    let vb = || -> Result<VarBuilder<'static>> {
        Ok(VarBuilder::from_tensors(tensors.clone(), dtype, device))
    };
    let p = ids.len() / batch;
    let input = Tensor::from_slice(ids, (batch, p), device)?;
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    let mut tokens = Vec::new();
    for r in 0..warmup + runs.max(1) {
        // candle's model keeps its KV cache inside; a fresh model per run (weights shared).
        let mut model = mixtral::Model::new(&ccfg, vb()?)?;
        device.synchronize()?;
        let t0 = Instant::now();
        let logits = model.forward(&input, 0)?;
        let mut next = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
        let mut run_tokens = next.flatten_all()?.to_vec1::<u32>()?;
        device.synchronize()?;
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for s in 0..gen {
            let logits = model.forward(&next, p + s)?;
            next = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?;
            run_tokens.extend(next.flatten_all()?.to_vec1::<u32>()?);
        }
        device.synchronize()?;
        let td = t1.elapsed().as_secs_f64();
        if r >= warmup {
            pre.push(tp);
            dec.push(td);
        }
        tokens = run_tokens;
    }
    let pre_t = Stat::of(&pre).median;
    let dec_t = Stat::of(&dec).median;
    let tps = |v: &[f64], n: usize| Stat::of(&v.iter().map(|t| n as f64 / t).collect::<Vec<_>>());
    Ok(BaselineReport {
        name: format!(
            "candle-transformers 0.11 mixtral::Model, dense {}",
            format!("{dtype:?}").to_lowercase()
        ),
        prefill_tokens_per_s: tps(&pre, batch * p),
        decode_tokens_per_s: tps(&dec, batch * gen),
        prefill_time_ratio_candle_over_ours: pre_t / ours.0,
        decode_time_ratio_candle_over_ours: dec_t / ours.1,
        tokens_equal: tokens
            .iter()
            .zip(our_tokens)
            .filter(|(a, b)| a == b)
            .count(),
        tokens_compared: tokens.len().max(our_tokens.len()),
    })
}
