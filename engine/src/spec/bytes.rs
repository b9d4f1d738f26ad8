//! Bytes of weights at each precision, KV cache bytes and FLOPs per token, exactly, from the
//! tensor inventory ([`super::counts::tensor_inventory`]).
//!
//! Weight formats (what `--precision` means here):
//! - fp32: 4 bytes per element, every tensor.
//! - bf16: 2 bytes per element (a router kept in f32 stays 4).
//! - int8: per-output-channel symmetric: a linear `[N, K]` is N x K int8 + N 16-bit scales.
//! - int4: groups of 128 along K (the input dim), asymmetric: N x ceil(K/2) bytes of packed
//!   nibbles + N x ceil(K/128) x (16-bit scale + 16-bit zero).
//!
//! In int8 / int4 only the big linear weights are quantized; embeddings, norms, biases,
//! routers, lm_head and MLA's kv_b_proj stay 16-bit: [`storage`] is that one rule.
//! Activations and the KV cache stay bf16 under int8 / int4 (weight-only formats), f32 under
//! fp32.

use serde::Serialize;

use super::counts::{expert_params, Component, TensorGroup, TensorKind, MLA_KV_B};
use super::tensors::{layer_tensors, Class, TensorSpec};
use crate::config::{FfnKind, ModelConfig};

/// Weight precision of the model as a whole (see the module doc for the exact formats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp32,
    Bf16,
    Int8,
    /// INT4 in groups of `group` weights along K (128 by default: [`Precision::INT4`]).
    Int4 {
        group: usize,
    },
    /// INT8 weights with an f32 compute dtype: the unquantized tensors (embeddings, norms,
    /// routers, lm_head, MLA kv_b) and the KV cache are f32 (what `--quant int8 --dtype f32`
    /// holds). Not one of analyze's columns ([`Precision::ALL`]).
    Int8F32,
    /// INT4 weights with an f32 compute dtype (see [`Precision::Int8F32`]).
    Int4F32 {
        group: usize,
    },
    /// bf16 (or f16) linear and expert weights -- the tensors int8/int4 would quantize -- with an
    /// f32 compute dtype: the rest and the KV cache f32 (`--dtype f32 --weight-dtype bf16`).
    Bf16F32,
    /// MXFP4 (OCP): 4-bit E2M1 weights and one 8-bit exponent per 32 along K, 4.25 bits per weight.
    Mxfp4,
    /// MXFP4 weights with an f32 compute dtype (see [`Precision::Int8F32`]).
    Mxfp4F32,
}

/// Serialized as its name (`"int4"`, `"int4:32"`, ...).
impl Serialize for Precision {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// int4 group size along the input dimension.
pub const INT4_GROUP: usize = 128;

impl Precision {
    /// INT4 at the default group of 128.
    pub const INT4: Precision = Precision::Int4 { group: INT4_GROUP };

    /// How the engine holds a model computed in `dtype` with weight quantization `quant`: the
    /// one rule, used by the loader's fit check, bench and analyze alike (f16 is costed as
    /// bf16: same bytes; int4 at its own group size).
    pub fn of(dtype: candle_core::DType, quant: Option<crate::quant::QFormat>) -> Precision {
        Precision::with_weights(dtype, None, quant)
    }

    /// [`Precision::of`] with `--weight-dtype` (`weight_dtype`, `None` = `dtype`): 16-bit linears
    /// under f32 compute are [`Precision::Bf16F32`].
    pub fn with_weights(
        dtype: candle_core::DType,
        weight_dtype: Option<candle_core::DType>,
        quant: Option<crate::quant::QFormat>,
    ) -> Precision {
        use crate::quant::QFormat;
        let f32 = dtype == candle_core::DType::F32;
        let w16 = weight_dtype.is_some_and(|w| w.size_in_bytes() == 2);
        match (quant, f32) {
            (None, true) if w16 => Precision::Bf16F32,
            (Some(QFormat::Int8), true) => Precision::Int8F32,
            (Some(QFormat::Int4 { group }), true) => Precision::Int4F32 { group },
            (Some(QFormat::Int8), false) => Precision::Int8,
            (Some(QFormat::Int4 { group }), false) => Precision::Int4 { group },
            (Some(QFormat::Mxfp4), true) => Precision::Mxfp4F32,
            (Some(QFormat::Mxfp4), false) => Precision::Mxfp4,
            (None, true) => Precision::Fp32,
            (None, false) => Precision::Bf16,
        }
    }

    pub const ALL: [Precision; 4] = [
        Precision::Fp32,
        Precision::Bf16,
        Precision::Int8,
        Precision::INT4,
    ];

    /// `fp32`, `bf16`, `int8`, `int4` (group 128) or `int4:G`, with `/f32` for f32 compute.
    pub fn name(self) -> String {
        let int4 = |group: usize| match group {
            INT4_GROUP => "int4".to_string(),
            g => format!("int4:{g}"),
        };
        match self {
            Precision::Fp32 => "fp32".into(),
            Precision::Bf16 => "bf16".into(),
            Precision::Int8 => "int8".into(),
            Precision::Int4 { group } => int4(group),
            Precision::Int8F32 => "int8/f32".into(),
            Precision::Int4F32 { group } => int4(group) + "/f32",
            Precision::Bf16F32 => "bf16/f32".into(),
            Precision::Mxfp4 => "mxfp4".into(),
            Precision::Mxfp4F32 => "mxfp4/f32".into(),
        }
    }

    /// One line on the format, for reports.
    pub fn format(self) -> String {
        match self {
            Precision::Fp32 => "4 B/elem".into(),
            Precision::Bf16 => "2 B/elem".into(),
            Precision::Int8 => "int8, one 16-bit scale per output row".into(),
            Precision::Int4 { group } => {
                format!("int4, group {group} along K, 16-bit scale + 16-bit zero")
            }
            Precision::Int8F32 => "int8 as above, unquantized tensors and KV in f32".into(),
            Precision::Int4F32 { .. } => "int4 as above, unquantized tensors and KV in f32".into(),
            Precision::Bf16F32 => {
                "2 B/elem linears and experts, other tensors and KV in f32".into()
            }
            Precision::Mxfp4 => "mxfp4, E2M1 + an 8-bit exponent per 32 along K".into(),
            Precision::Mxfp4F32 => "mxfp4 as above, unquantized tensors and KV in f32".into(),
        }
    }

    /// The seed articles' bytes per parameter: 4, 2, 1, 0.5.
    pub fn nominal_bytes(self) -> f64 {
        match self {
            Precision::Fp32 => 4.0,
            Precision::Bf16 | Precision::Bf16F32 => 2.0,
            Precision::Int8 | Precision::Int8F32 => 1.0,
            Precision::Int4 { .. } | Precision::Int4F32 { .. } => 0.5,
            // 4 + 8 / 32 bits.
            Precision::Mxfp4 | Precision::Mxfp4F32 => 4.25 / 8.0,
        }
    }

    /// Bytes of one KV cache / activation element under this weight format.
    pub fn kv_elem_bytes(self) -> u64 {
        match self {
            Precision::Fp32
            | Precision::Int8F32
            | Precision::Int4F32 { .. }
            | Precision::Bf16F32
            | Precision::Mxfp4F32 => 4,
            Precision::Bf16 | Precision::Int8 | Precision::Int4 { .. } | Precision::Mxfp4 => 2,
        }
    }

    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s))
    }
}

/// How a tensor is stored when the model is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// Takes the model's weight format (int8 / int4 when quantized).
    Quantized,
    /// Stays 16-bit under int8 / int4 (f32 under fp32).
    Keep16,
    /// Stays f32 always (a router the engine keeps in f32).
    KeepF32,
    /// MXFP4 as the checkpoint publishes it, whatever the precision (gpt-oss's experts).
    Mxfp4,
}

/// THE quantization rule: which tensors int8 / int4 apply to. Every linear weight of
/// attention, experts, shared experts and dense FFNs is quantized; the embedding (a lookup),
/// norms and biases (elementwise, tiny), routers (tiny and precision-sensitive: a flipped
/// top-k changes the expert) and lm_head (sensitive, and the logits' precision) stay 16-bit.
/// So does MLA's kv_b_proj: the absorbed decode multiplies by it per head from both sides
/// (q_nope W_uk and (P c) W_uv^T), so the engine holds it dense once for both MLA paths
/// (`model/mla.rs`); it is 0.15% of DeepSeek-V3's weights (1.0B of 671B).
/// A tensor the engine keeps in f32 (a router, the selection bias) stays f32.
pub fn storage(t: &TensorGroup) -> Storage {
    match (t.component, t.kind) {
        _ if t.f32 => Storage::KeepF32,
        (_, TensorKind::Linear { .. }) if t.mxfp4 => Storage::Mxfp4,
        (_, TensorKind::Lookup { .. } | TensorKind::Vector { .. }) => Storage::Keep16,
        (Component::Attention, _) if t.name == MLA_KV_B => Storage::Keep16,
        (Component::Router | Component::LmHead | Component::Embedding | Component::Norms, _) => {
            Storage::Keep16
        }
        (
            Component::Attention
            | Component::RoutedExperts
            | Component::SharedExperts
            | Component::DenseFfn,
            TensorKind::Linear { .. },
        ) => Storage::Quantized,
    }
}

impl TensorSpec {
    /// How this tensor is stored under int8 / int4: [`storage`] of its inventory entry.
    pub fn storage(&self) -> Storage {
        storage(&self.group())
    }
}

/// Bytes per element of a tensor that is not quantized: 4 under fp32 or if kept in f32, and
/// under f32 compute except the 16-bit linears of [`Precision::Bf16F32`]; else 2.
pub fn unquantized_elem_bytes(s: Storage, p: Precision) -> u64 {
    match (s, p) {
        (Storage::Quantized, Precision::Bf16F32) => 2,
        (Storage::KeepF32, _)
        | (
            _,
            Precision::Fp32
            | Precision::Int8F32
            | Precision::Int4F32 { .. }
            | Precision::Bf16F32
            | Precision::Mxfp4F32,
        ) => 4,
        _ => 2,
    }
}

fn plain_bytes(elems: u64, s: Storage, p: Precision) -> u64 {
    unquantized_elem_bytes(s, p) * elems
}

/// Bytes of one tensor of the group stored at precision `p` (see the module doc for formats).
pub fn tensor_bytes(t: &TensorGroup, p: Precision) -> u64 {
    let s = storage(t);
    match (s, p, t.kind) {
        (
            Storage::Quantized,
            Precision::Int8 | Precision::Int8F32,
            TensorKind::Linear { out, inp },
        ) => {
            // N x K int8 + N 16-bit scales.
            out as u64 * inp as u64 + 2 * out as u64
        }
        (
            Storage::Quantized,
            Precision::Int4 { group } | Precision::Int4F32 { group },
            TensorKind::Linear { out, inp },
        ) => {
            // Two nibbles per byte along K; per group a 16-bit scale and zero.
            let (n, k) = (out as u64, inp as u64);
            n * k.div_ceil(2) + n * k.div_ceil(group.max(1) as u64) * 4
        }
        (
            Storage::Quantized,
            Precision::Mxfp4 | Precision::Mxfp4F32,
            TensorKind::Linear { out, inp },
        )
        | (Storage::Mxfp4, _, TensorKind::Linear { out, inp }) => {
            // Two nibbles per byte along K; per 32 a one-byte exponent.
            let (n, k) = (out as u64, inp as u64);
            n * k.div_ceil(2) + n * k.div_ceil(32)
        }
        _ => plain_bytes(t.kind.numel(), s, p),
    }
}

/// Bytes of every stored weight at precision `p` (what must sit in GPU memory).
pub fn weight_bytes(inv: &[TensorGroup], p: Precision) -> u64 {
    inv.iter().map(|t| tensor_bytes(t, p) * t.stored).sum()
}

/// Weight bytes one decoded token reads at batch 1: every active tensor once (k experts per
/// MoE layer, not E), the lm_head (the embedding matrix if tied), and one row of the
/// embedding table (a lookup reads one row, not the table).
pub fn decode_weight_bytes(inv: &[TensorGroup], p: Precision) -> u64 {
    inv.iter()
        .map(|t| match t.kind {
            TensorKind::Lookup { cols, .. } => plain_bytes(cols as u64, storage(t), p),
            _ => tensor_bytes(t, p) * t.active,
        })
        .sum()
}

/// Bytes of one routed expert (gate, up, down) of an MoE layer at precision `p` (0 for a dense
/// layer): one matrix of each stacked expert tensor of the layer (and its biases, if any).
pub fn expert_bytes(cfg: &ModelConfig, layer: usize, p: Precision) -> u64 {
    let b = layer_tensors(cfg, layer)
        .iter()
        .filter(|t| matches!(t.class, Class::Experts { .. } | Class::ExpertBias { .. }))
        .map(|t| tensor_bytes(&t.group(), p))
        .sum();
    debug_assert!(
        p != Precision::Bf16
            || cfg.experts_mxfp4
            || match cfg.layers.get(layer) {
                Some(FfnKind::Moe(m)) => b == 2 * expert_params(m, cfg.hidden_size),
                _ => b == 0,
            }
    );
    b
}

/// KV cache bytes one token adds, over all layers, at `elem_bytes` per element.
/// GQA: 2 (K and V) x L x nkv x hd. MLA: L x (kv_lora_rank + qk_rope_head_dim): the latent and
/// the one shared rope key; per-head K and V are never stored.
pub fn kv_bytes_per_token(cfg: &ModelConfig, elem_bytes: u64) -> u64 {
    let l = cfg.num_layers() as u64;
    match cfg.mla {
        Some(m) => l * (m.kv_lora_rank + m.qk_rope_head_dim) as u64 * elem_bytes,
        None => 2 * l * (cfg.num_kv_heads * cfg.head_dim) as u64 * elem_bytes,
    }
}

/// Keys one decode step at position `context` attends to, summed over the layers: a layer with
/// a sliding window W sees `min(context, W)`, the others `context`. It is also the number of
/// (layer, position) entries a sequence of `context` tokens keeps in the KV cache, whose windowed
/// layers are rings of W positions.
pub fn layer_keys(cfg: &ModelConfig, context: u64) -> u64 {
    (0..cfg.num_layers())
        .map(|i| cfg.window_of(i).map_or(context, |w| context.min(w as u64)))
        .fold(0u64, u64::saturating_add)
}

/// KV bytes of one position in one layer.
fn kv_bytes_per_layer_token(cfg: &ModelConfig, elem_bytes: u64) -> u64 {
    kv_bytes_per_token(cfg, elem_bytes) / (cfg.num_layers() as u64).max(1)
}

/// KV cache bytes of one sequence of `context` tokens, as the engine allocates it: every
/// position, or in a layer with a sliding window W a ring of `min(context, W)` positions.
pub fn kv_bytes_per_sequence(cfg: &ModelConfig, context: u64, elem_bytes: u64) -> u64 {
    // Saturating: a huge context or batch reads as "more than any memory", never wraps.
    kv_bytes_per_layer_token(cfg, elem_bytes).saturating_mul(layer_keys(cfg, context))
}

/// KV bytes one decode step at position `context` reads.
pub fn kv_read_bytes(cfg: &ModelConfig, context: u64, elem_bytes: u64) -> u64 {
    kv_bytes_per_layer_token(cfg, elem_bytes).saturating_mul(layer_keys(cfg, context))
}

/// Attention-score FLOPs per token attending to `keys` keys, summed over layers.
/// GQA: q.k and p.v, 2 x hd each per head and key: 4 x L x nh x hd x keys.
/// MLA in the absorbed-latent form (W_UK folded into q, W_UV applied after, both counted as
/// kv_b_proj's per-token matmul): scores over kv_lora_rank + rope dims and p.latent over
/// kv_lora_rank: 2 x L x nh x (2 x kvr + dr) x keys.
pub fn attention_flops(cfg: &ModelConfig, keys: u64) -> u64 {
    let (l, nh) = (cfg.num_layers() as u64, cfg.num_heads as u64);
    match cfg.mla {
        Some(m) => 2 * l * nh * (2 * m.kv_lora_rank + m.qk_rope_head_dim) as u64 * keys,
        None => 4 * l * nh * cfg.head_dim as u64 * keys,
    }
}

/// FLOPs to decode one token at position `context`: 2 x active matmul parameters (lm_head
/// in, embedding lookup out) + the attention term over the attended keys.
pub fn decode_flops_per_token(cfg: &ModelConfig, matmul_active: u64, context: u64) -> u64 {
    2 * matmul_active + attention_flops_per_layer_key(cfg) * layer_keys(cfg, context)
}

/// [`attention_flops`] of one key in one layer.
fn attention_flops_per_layer_key(cfg: &ModelConfig) -> u64 {
    attention_flops(cfg, 1) / (cfg.num_layers() as u64).max(1)
}

/// Mean FLOPs per token of a causal prefill of `prompt` tokens: token i attends to i + 1 keys
/// (window-capped), so the attention term is averaged over the prompt.
pub fn prefill_flops_per_token(cfg: &ModelConfig, matmul_active: u64, prompt: u64) -> f64 {
    let keys: u64 = (1..=prompt).map(|i| layer_keys(cfg, i)).sum();
    let mean_keys = keys as f64 / prompt.max(1) as f64;
    2.0 * matmul_active as f64 + attention_flops_per_layer_key(cfg) as f64 * mean_keys
}
