//! Hugging Face `config.json` -> [`ModelConfig`], the one description of a model that the loader,
//! the decoder and the cost model read. Each family has one file here that maps its field names
//! onto this struct; differences between architectures are data, never separate forward passes.

// User input reaches this module: no unwrap/expect/panic/unchecked indexing outside tests
// (checked by `cargo clippy`; a proven-safe exception carries its own `allow` and reason).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod dbrx;
mod deepseek;
mod fields;
mod gpt_oss;
mod hunyuan;
mod llama4;
mod mixtral;
pub mod naming;
mod olmoe;
mod qwen_moe;
pub mod registry;

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

pub use naming::Naming;

pub(crate) use fields::Fields;
pub use fields::{MAX_FIELD, MAX_LAYERS, MAX_PARAMS};

/// One supported architecture: the `model_type` values that select it, how its config.json
/// parses and how its checkpoint names its tensors.
pub struct Family {
    /// The `model_type` every config of this family carries once parsed.
    pub model_type: &'static str,
    /// Other spellings of `model_type` that select this family (read as `model_type`).
    pub aliases: &'static [&'static str],
    /// config.json -> [`ModelConfig`] (its `model_type` is set from this row).
    parse: fn(&Value, &Path) -> Result<ModelConfig>,
    /// The checkpoint's tensor names (read by the loader).
    pub naming: &'static Naming,
}

/// THE `model_type` table: parsing, checkpoint naming and the supported list all come from it,
/// so a family is added here once.
pub const FAMILIES: &[Family] = &[
    Family {
        model_type: "mixtral",
        aliases: &[],
        parse: mixtral::parse,
        naming: &naming::MIXTRAL,
    },
    Family {
        model_type: "dbrx",
        aliases: &[],
        parse: dbrx::parse,
        naming: &naming::DBRX,
    },
    Family {
        model_type: "qwen3_moe",
        aliases: &[],
        parse: |raw, path| qwen_moe::parse(raw, path, qwen_moe::Variant::Qwen3),
        naming: &naming::QWEN,
    },
    Family {
        model_type: "qwen2_moe",
        aliases: &[],
        parse: |raw, path| qwen_moe::parse(raw, path, qwen_moe::Variant::Qwen2),
        naming: &naming::QWEN,
    },
    Family {
        model_type: "olmoe",
        aliases: &[],
        parse: olmoe::parse,
        naming: &naming::QWEN,
    },
    Family {
        model_type: "hunyuan_v1_moe",
        // The release-time remote-code spelling; both load with the same names.
        aliases: &["hunyuan"],
        parse: hunyuan::parse,
        naming: &naming::HUNYUAN,
    },
    Family {
        model_type: "deepseek_v2",
        aliases: &[],
        parse: |raw, path| deepseek::parse(raw, path, deepseek::Variant::V2),
        naming: &naming::DEEPSEEK,
    },
    Family {
        model_type: "deepseek_v3",
        aliases: &[],
        parse: |raw, path| deepseek::parse(raw, path, deepseek::Variant::V3),
        naming: &naming::DEEPSEEK,
    },
    Family {
        model_type: "dots1",
        aliases: &[],
        parse: |raw, path| deepseek::parse(raw, path, deepseek::Variant::Dots1),
        naming: &naming::DEEPSEEK,
    },
    Family {
        model_type: "glm4_moe",
        aliases: &[],
        parse: |raw, path| deepseek::parse(raw, path, deepseek::Variant::Glm4Moe),
        naming: &naming::DEEPSEEK,
    },
    Family {
        model_type: "gpt_oss",
        aliases: &[],
        parse: gpt_oss::parse,
        naming: &naming::GPT_OSS,
    },
    Family {
        model_type: "llama4_text",
        aliases: &[],
        parse: |raw, path| llama4::parse(raw, path, false),
        naming: &naming::LLAMA4,
    },
    Family {
        model_type: "llama4",
        aliases: &[],
        parse: |raw, path| llama4::parse(raw, path, true),
        naming: &naming::LLAMA4_MULTIMODAL,
    },
];

/// The family a `model_type` (or one of its aliases) selects.
pub fn family(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.model_type == model_type || f.aliases.contains(&model_type))
}

/// Every `model_type` this build understands, aliases after their family's name.
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| std::iter::once(f.model_type).chain(f.aliases.iter().copied()))
        .collect()
}

/// Everything the engine needs to know about a decoder-only MoE transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family's HF `model_type`, e.g. "mixtral" (an alias such as "hunyuan" reads as its
    /// family's name): selects the checkpoint naming through [`family`].
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm: NormKind,
    pub attn: AttnConfig,
    /// Multi-head latent attention (DeepSeek-V2/V3) instead of GQA; `None` for GQA models.
    pub mla: Option<MlaConfig>,
    pub rope: RopeConfig,
    /// Each query sees at most this many keys (itself included), or all earlier keys if `None`.
    pub sliding_window: Option<usize>,
    /// The layers the window applies to (one flag per layer); `None`: every layer.
    pub window_layers: Option<Vec<bool>>,
    /// The window is Llama-4's chunked attention: a query at p sees the keys of its own chunk,
    /// `floor(p / W) * W ..= p`, instead of the last W positions. Either way a windowed layer's
    /// cache is a ring of W positions.
    pub chunked_window: bool,
    /// Layers without RoPE (Llama-4's NoPE layers), and how their queries are scaled.
    pub nope: Option<NoRope>,
    /// The checkpoint stores the routed experts in MXFP4 as published (gpt-oss's
    /// `quantization_config.quant_method` "mxfp4": `*_blocks` and `*_scales`); they are loaded
    /// and run in that format whatever `--quant` says.
    pub experts_mxfp4: bool,
    pub tie_word_embeddings: bool,
    /// One entry per decoder layer: what its feed-forward block is.
    pub layers: Vec<FfnKind>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// y = x / sqrt(mean(x^2) + eps) * w, computed in f32.
    Rms { eps: f64 },
    /// y = (x - mean) / sqrt(var + eps) * w, computed in f32, no bias (DBRX).
    LayerNorm { eps: f64 },
}

impl NormKind {
    pub fn eps(&self) -> f64 {
        match *self {
            NormKind::Rms { eps } | NormKind::LayerNorm { eps } => eps,
        }
    }
}

/// What the attention block does besides plain GQA + RoPE. Order inside the block:
/// q/k/v projection (+ bias) -> `Whole` QK-norm -> clamp to ±clip_qkv -> split into heads ->
/// `PerHeadBeforeRope` QK-norm -> RoPE -> `PerHeadAfterRope` QK-norm.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttnConfig {
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to [-c, c] (DBRX, OLMoE).
    pub clip_qkv: Option<f64>,
    /// q/k/v projections carry a bias (Qwen2-MoE).
    pub qkv_bias: bool,
    /// The output projection carries a bias (gpt-oss).
    pub o_bias: bool,
    /// A learned logit per head joins each softmax's denominator and is dropped (gpt-oss's
    /// attention sinks, `self_attn.sinks [heads]`).
    pub sinks: bool,
}

/// DeepSeek's multi-head latent attention. Per head, q and k are `qk_nope_head_dim` (no
/// position) + `qk_rope_head_dim` (RoPE, one key part shared by all heads); v is `v_head_dim`.
/// The KV cache holds only the compressed latent (`kv_lora_rank`) and the shared rope key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlaConfig {
    /// Low-rank query (`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`), or a plain `q_proj` if `None`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

/// Llama-4's global layers without position embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct NoRope {
    /// One flag per layer: `true` = this layer applies no RoPE (and no QK-norm).
    pub layers: Vec<bool>,
    /// Attention temperature tuning on those layers: a query at position p is multiplied by
    /// `ln(1 + floor((p + 1) / floor_scale)) * attn_scale + 1`.
    pub temperature: Option<AttnTemperature>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnTemperature {
    pub floor_scale: f64,
    pub attn_scale: f64,
}

impl AttnTemperature {
    /// The query scale at position `p`.
    pub fn scale(&self, p: usize) -> f64 {
        ((p as f64 + 1.0) / self.floor_scale).floor().ln_1p() * self.attn_scale + 1.0
    }
}

/// Which earlier keys a query of one layer sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Span {
    /// Every earlier key.
    Full,
    /// The last `w` positions (itself included).
    Sliding(usize),
    /// The keys of its own chunk of `c` positions (Llama-4).
    Chunked(usize),
}

impl Span {
    /// The first key position a query at `p` sees (it sees every key from there to `p`).
    pub fn first_visible(self, p: usize) -> usize {
        match self {
            Span::Full => 0,
            Span::Sliding(w) => (p + 1).saturating_sub(w),
            Span::Chunked(c) => p - p % c,
        }
    }
}

/// RMSNorm on queries and keys, with the same eps as the model's norms.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum QkNorm {
    #[default]
    None,
    /// Over the whole q `[heads*hd]` and k `[kv*hd]` projections, before the head split (OLMoE).
    Whole,
    /// Per head over hd, before RoPE (Qwen3-MoE, dots.llm1).
    PerHeadBeforeRope,
    /// Per head over hd, after RoPE (HunYuan).
    PerHeadAfterRope,
    /// Per head over hd, after RoPE, without weights (Llama-4's L2 norm `x / sqrt(mean(x^2) +
    /// eps)`), on the layers that apply RoPE.
    UnitAfterRope,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Rotate adjacent pairs (x0,x1),(x2,x3).. (DeepSeek MLA) instead of the two halves.
    pub interleaved: bool,
    /// Rotate only the first `d` dims of each head, the rest pass through (GLM's
    /// `partial_rotary_factor`); `None`: all of them.
    pub rotary_dim: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF "linear").
    Linear {
        factor: f64,
    },
    /// Llama 3.1: frequencies whose wavelength exceeds `original_max_position /
    /// low_freq_factor` divided by `factor`, those under `original_max_position /
    /// high_freq_factor` kept, a smooth ramp between (HF "llama3").
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: usize,
    },
    /// YaRN: frequencies interpolated by `factor` outside the band [beta_slow, beta_fast]
    /// rotations over `original_max_position` tokens, and cos/sin scaled by the attention
    /// factor (see [`RopeScaling::attention_factor`]).
    Yarn {
        factor: f64,
        original_max_position: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        /// An explicit `attention_factor` from the config.
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

/// YaRN's magnitude correction 0.1 * m * ln(scale) + 1 (1 for scale <= 1).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl RopeScaling {
    /// The factor transformers multiplies cos and sin by.
    pub fn attention_factor(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                attention_factor,
                ..
            } => match (attention_factor, mscale, mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, ma)
                }
                _ => yarn_mscale(factor, 1.0),
            },
            _ => 1.0,
        }
    }

    /// DeepSeek's extra softmax scale for MLA under YaRN: mscale(factor, mscale_all_dim)^2.
    pub fn mla_softmax_scale(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim: Some(ma),
                ..
            } if ma != 0.0 => yarn_mscale(factor, ma).powi(2),
            _ => 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FfnKind {
    /// A dense SwiGLU MLP of width `intermediate`.
    Dense {
        intermediate: usize,
    },
    Moe(MoeConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Width F of one routed expert's SwiGLU MLP.
    pub expert_ffn: usize,
    pub router: RouterKind,
    /// The router weight stays f32 and sees f32 activations (HunYuan's `wg`).
    pub router_f32: bool,
    /// Always-on experts added to the routed output.
    pub shared: Option<SharedExperts>,
    /// The routing weight scales the expert's *input* and the outputs are summed unweighted
    /// (Llama-4, top-1 only), instead of weighting the outputs.
    pub scale_input: bool,
    /// The sigmoid router's selection bias is a checkpoint tensor (`e_score_correction_bias`);
    /// without one (Llama-4) it is zero.
    pub correction_bias: bool,
    /// The experts' activation between gate_up and down.
    pub act: ExpertAct,
    /// The router and both expert projections carry biases (gpt-oss).
    pub biases: bool,
}

/// What an expert computes from its gate and up projections `g`, `u`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ExpertAct {
    /// `silu(g) * u`.
    #[default]
    SwiGlu,
    /// gpt-oss: `g' = min(g, limit)`, `u' = clamp(u, -limit, limit)`, `(u' + 1) * g' *
    /// sigmoid(alpha * g')`.
    ClampedSwiGlu { alpha: f64, limit: f64 },
}

/// Shared experts: one SwiGLU MLP of width `ffn` (several shared experts are one wider MLP).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedExperts {
    pub ffn: usize,
    /// Scaled per token by sigmoid(x g^T) with a `[1, H]` gate (Qwen2-MoE); else added as is.
    pub sigmoid_gate: bool,
}

/// How a MoE layer routes: one enum, defined beside the route kernel that implements it (the
/// kernel's CPU reference is its specification), used as is by the config and the model.
pub use moe_kernels::route::Router as RouterKind;

impl ModelConfig {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Which keys the queries of layer `i` see.
    pub fn span_of(&self, i: usize) -> Span {
        match (self.window_of(i), self.chunked_window) {
            (None, _) => Span::Full,
            (Some(w), false) => Span::Sliding(w),
            (Some(c), true) => Span::Chunked(c),
        }
    }

    /// Whether layer `i` applies RoPE.
    pub fn rope_on(&self, i: usize) -> bool {
        self.nope
            .as_ref()
            .is_none_or(|n| !n.layers.get(i).copied().unwrap_or(false))
    }

    /// The window (or chunk) of layer `i`, if it has one: its cache keeps that many positions.
    pub fn window_of(&self, i: usize) -> Option<usize> {
        self.sliding_window.filter(|_| {
            self.window_layers
                .as_ref()
                .is_none_or(|v| v.get(i).copied().unwrap_or(false))
        })
    }

    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Value = serde_json::from_str(text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let Some(obj) = raw.as_object() else {
            return Err(Error::config(path, "config.json is not a JSON object"));
        };
        let model_type = match obj.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            _ => {
                return Err(Error::config(
                    path,
                    "config.json has no string field \"model_type\"",
                ))
            }
        };
        let Some(family) = family(&model_type) else {
            return Err(Error::UnsupportedModelType {
                path: path.to_path_buf(),
                model_type,
                supported: supported_model_types(),
            });
        };
        let cfg = ModelConfig {
            model_type: family.model_type.to_string(),
            ..(family.parse)(&raw, path)?
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// An over-estimate of the parameter count, in f64 so that it cannot overflow (the exact
    /// count is `analysis::counts`, which [`MAX_PARAMS`] keeps in range).
    fn approx_params(&self) -> f64 {
        let f = |n: usize| n as f64;
        let (h, hd) = (f(self.hidden_size), f(self.head_dim));
        let attn = match &self.mla {
            None => h * hd * f(2 * self.num_heads + 2 * self.num_kv_heads),
            Some(m) => {
                let q_head = f(m.qk_nope_head_dim) + f(m.qk_rope_head_dim);
                let q = match m.q_lora_rank {
                    Some(r) => f(r) * (h + f(self.num_heads) * q_head),
                    None => h * f(self.num_heads) * q_head,
                };
                q + h * (f(m.kv_lora_rank) + f(m.qk_rope_head_dim))
                    + f(m.kv_lora_rank)
                        * f(self.num_heads)
                        * (f(m.qk_nope_head_dim) + f(m.v_head_dim))
                    + f(self.num_heads) * f(m.v_head_dim) * h
            }
        };
        let ffn: f64 = self
            .layers
            .iter()
            .map(|l| match l {
                FfnKind::Dense { intermediate } => 3.0 * h * f(*intermediate),
                FfnKind::Moe(m) => {
                    f(m.num_experts) * (3.0 * h * f(m.expert_ffn) + h)
                        + m.shared.map_or(0.0, |s| 3.0 * h * f(s.ffn) + h)
                }
            })
            .sum();
        2.0 * f(self.vocab_size) * h + f(self.num_layers()) * (attn + 4.0 * h) + ffn
    }

    /// Internal consistency checks that every family must pass.
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::config(path, msg));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("num_hidden_layers", self.layers.len()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if let Some(m) = &self.mla {
            for (name, v) in [
                ("kv_lora_rank", m.kv_lora_rank),
                ("v_head_dim", m.v_head_dim),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ] {
                if v == 0 {
                    return bad(format!("{name} must be positive"));
                }
            }
            if !m.qk_rope_head_dim.is_multiple_of(2) {
                return bad(format!(
                    "qk_rope_head_dim ({}) must be even for RoPE",
                    m.qk_rope_head_dim
                ));
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive or null".into());
        }
        if let Some(n) = self
            .nope
            .as_ref()
            .filter(|n| n.layers.len() != self.num_layers())
        {
            return bad(format!(
                "no_rope_layers has {} entries for {} layers",
                n.layers.len(),
                self.num_layers()
            ));
        }
        if let Some(v) = self
            .window_layers
            .as_ref()
            .filter(|v| v.len() != self.num_layers())
        {
            return bad(format!(
                "layer_types has {} entries for {} layers",
                v.len(),
                self.num_layers()
            ));
        }
        for (i, ffn) in self.layers.iter().enumerate() {
            match ffn {
                FfnKind::Dense { intermediate } if *intermediate == 0 => {
                    return bad(format!("layer {i}: intermediate size must be positive"))
                }
                FfnKind::Moe(m) if m.num_experts == 0 || m.expert_ffn == 0 => {
                    return bad(format!(
                        "layer {i}: experts and expert width must be positive"
                    ))
                }
                FfnKind::Moe(m) if m.scale_input && m.top_k != 1 => {
                    return bad(format!(
                        "layer {i}: router scores that scale the expert input are supported with num_experts_per_tok 1 only (found {})",
                        m.top_k
                    ))
                }
                FfnKind::Moe(m) if m.top_k == 0 || m.top_k > m.num_experts => {
                    return bad(format!(
                    "layer {i}: num_experts_per_tok ({}) must be in 1..={} (the number of experts)",
                    m.top_k, m.num_experts
                ))
                }
                _ => {}
            }
        }
        let params = self.approx_params();
        if params > MAX_PARAMS {
            return bad(format!(
                "describes about {params:.3e} parameters, more than any model's (limit {MAX_PARAMS:e})"
            ));
        }
        for &id in self.bos_token_id.iter().chain(&self.eos_token_ids) {
            if id as usize >= self.vocab_size {
                return bad(format!(
                    "special token id {id} is not below vocab_size {}",
                    self.vocab_size
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Qwen-style dense-layer rule: layer i is MoE iff it is not in `mlp_only_layers`, there are
/// experts, and (i + 1) is a multiple of `decoder_sparse_step`.
pub(crate) fn sparse_layer(
    i: usize,
    mlp_only_layers: &[usize],
    sparse_step: usize,
    num_experts: usize,
) -> bool {
    !mlp_only_layers.contains(&i)
        && num_experts > 0
        && sparse_step > 0
        && (i + 1).is_multiple_of(sparse_step)
}
