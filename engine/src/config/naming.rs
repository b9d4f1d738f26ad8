//! Each family's published tensor names, as data: one [`Naming`] per checkpoint layout, chosen by
//! the family table ([`super::FAMILIES`]). The loader (`loader/naming.rs`) reads any of them into
//! the canonical layout of the tensor spec (`spec::tensors`); nothing else knows these names.

/// How a family names its attention projections.
pub enum AttnNames {
    /// `{q,k,v,o}` projection names without `.weight` (biases are `.bias`).
    Separate {
        q: &'static str,
        k: &'static str,
        v: &'static str,
        o: &'static str,
    },
    /// One `[q+2kv, H]` projection (DBRX `Wqkv`), names without `.weight`.
    Fused { qkv: &'static str, o: &'static str },
}

/// How a family names its routed experts.
pub enum ExpertNames {
    /// `{prefix}.{e}.{gate|up|down}.weight`, each `[F, H]` / `[F, H]` / `[H, F]`.
    PerExpert {
        prefix: &'static str,
        gate: &'static str,
        up: &'static str,
        down: &'static str,
    },
    /// DBRX: `w1`, `v1`, `w2` each `[E*F, H]` (no `.weight`); expert e is rows e*F..(e+1)*F and
    /// `w2` is the down projection transposed.
    Fused {
        w1: &'static str,
        v1: &'static str,
        w2: &'static str,
    },
    /// Llama-4, gpt-oss: one tensor per projection (no `.weight`), transposed: `gate_up [E, H,
    /// 2F]` (columns 0..F the gate, F..2F up; with `interleaved`, even columns the gate, odd
    /// up) and `down [E, F, H]`; biases (gpt-oss) `{gate_up}_bias [E, 2F]`, `{down}_bias [E,
    /// H]`; MXFP4 as published (gpt-oss) `{name}_blocks [E, out, in/32, 16]` and
    /// `{name}_scales [E, out, in/32]`, not transposed.
    Stacked {
        gate_up: &'static str,
        down: &'static str,
        interleaved: bool,
    },
}

/// Where one family keeps each weight. Layer names are relative to `{layer_prefix}{i}.`.
/// MLA's projections have fixed names (every DeepSeek checkpoint uses the same ones).
pub struct Naming {
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    pub layer_prefix: &'static str,
    pub attn_norm: &'static str,
    pub ffn_norm: &'static str,
    pub attn: AttnNames,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    pub router: &'static str,
    pub experts: ExpertNames,
    /// Shared-expert MLP prefix (`{shared}.{gate,up,down}_proj`) and its sigmoid gate.
    pub shared: &'static str,
    pub shared_gate: &'static str,
    /// Dense-layer MLP prefix (`{dense}.{gate,up,down}_proj`).
    pub dense: &'static str,
    /// The selection bias of sigmoid routers (`[E]`, f32).
    pub score_bias: &'static str,
    /// The router's bias (gpt-oss, `[E]`).
    pub router_bias: &'static str,
    /// The attention sinks (gpt-oss, `[heads]`).
    pub sinks: &'static str,
    /// Prefixes of checkpoint tensors this build does not read (a multimodal checkpoint's other
    /// towers): left in the file, said once on stderr.
    pub unread: &'static [&'static str],
}

const LLAMA_ATTN: AttnNames = AttnNames::Separate {
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.o_proj",
};

const QWEN_EXPERTS: ExpertNames = ExpertNames::PerExpert {
    prefix: "mlp.experts",
    gate: "gate_proj",
    up: "up_proj",
    down: "down_proj",
};

/// Qwen2/3-MoE, OLMoE (and the DeepSeek family's MoE parts).
pub const QWEN: Naming = Naming {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    layer_prefix: "model.layers.",
    attn_norm: "input_layernorm.weight",
    ffn_norm: "post_attention_layernorm.weight",
    attn: LLAMA_ATTN,
    q_norm: "self_attn.q_norm.weight",
    k_norm: "self_attn.k_norm.weight",
    router: "mlp.gate.weight",
    experts: QWEN_EXPERTS,
    shared: "mlp.shared_expert",
    shared_gate: "mlp.shared_expert_gate.weight",
    dense: "mlp",
    score_bias: "mlp.gate.e_score_correction_bias",
    router_bias: "mlp.gate.bias",
    sinks: "self_attn.sinks",
    unread: &[],
};

/// DeepSeek-V2/V3 and dots.llm1.
pub const DEEPSEEK: Naming = Naming {
    shared: "mlp.shared_experts",
    ..QWEN
};

pub const MIXTRAL: Naming = Naming {
    router: "block_sparse_moe.gate.weight",
    experts: ExpertNames::PerExpert {
        prefix: "block_sparse_moe.experts",
        gate: "w1",
        up: "w3",
        down: "w2",
    },
    ..QWEN
};

pub const HUNYUAN: Naming = Naming {
    q_norm: "self_attn.query_layernorm.weight",
    k_norm: "self_attn.key_layernorm.weight",
    router: "mlp.gate.wg.weight",
    shared: "mlp.shared_mlp",
    ..QWEN
};

pub const DBRX: Naming = Naming {
    embed: "transformer.wte.weight",
    final_norm: "transformer.norm_f.weight",
    lm_head: "lm_head.weight",
    layer_prefix: "transformer.blocks.",
    attn_norm: "norm_attn_norm.norm_1.weight",
    ffn_norm: "norm_attn_norm.norm_2.weight",
    attn: AttnNames::Fused {
        qkv: "norm_attn_norm.attn.Wqkv",
        o: "norm_attn_norm.attn.out_proj",
    },
    router: "ffn.router.layer.weight",
    experts: ExpertNames::Fused {
        w1: "ffn.experts.mlp.w1",
        v1: "ffn.experts.mlp.v1",
        w2: "ffn.experts.mlp.w2",
    },
    ..QWEN
};

/// Llama-4's language model (`llama4_text`).
pub const LLAMA4: Naming = Naming {
    router: "feed_forward.router.weight",
    experts: ExpertNames::Stacked {
        gate_up: "feed_forward.experts.gate_up_proj",
        down: "feed_forward.experts.down_proj",
        interleaved: false,
    },
    shared: "feed_forward.shared_expert",
    dense: "feed_forward",
    ..QWEN
};

/// The language model inside a multimodal `llama4` checkpoint (`language_model.` before the
/// text model's names; the vision tower's tensors are not read).
pub const LLAMA4_MULTIMODAL: Naming = Naming {
    embed: "language_model.model.embed_tokens.weight",
    final_norm: "language_model.model.norm.weight",
    lm_head: "language_model.lm_head.weight",
    layer_prefix: "language_model.model.layers.",
    unread: &["vision_model.", "multi_modal_projector."],
    ..LLAMA4
};

/// gpt-oss.
pub const GPT_OSS: Naming = Naming {
    router: "mlp.router.weight",
    router_bias: "mlp.router.bias",
    experts: ExpertNames::Stacked {
        gate_up: "mlp.experts.gate_up_proj",
        down: "mlp.experts.down_proj",
        interleaved: true,
    },
    ..QWEN
};
