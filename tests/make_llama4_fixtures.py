#!/usr/bin/env python3
"""Generate tiny random Llama-4 (llama4_text) checkpoints plus Hugging Face reference outputs.

Companion of tests/make_fixtures.py (Mixtral): same directory layout, same
expected.json schema, same "reload from disk in f32, eager kernels" rule. Llama-4's
mechanisms, each exercised by both fixtures unless said otherwise:

- top-1 router: the top logit chosen, its sigmoid multiplying the expert's INPUT, the
  expert outputs summed unweighted, plus an always-on shared expert;
- fused, transposed expert tensors as published: feed_forward.experts.gate_up_proj
  [E, H, 2F] (gate columns first) and down_proj [E, F, H];
- RoPE on adjacent pairs (transformers' complex view) on the layers no_rope_layers flags
  with 1; every no_rope_layer_interval-th layer (here layer 3 of 4) has no RoPE, attends
  globally and scales its queries by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1
  (floor_scale 4 here, so the scale changes within the prompt; the release's 8192 would
  leave it at 1 for any tiny test);
- chunked attention (attention_chunk_size 8) on the RoPE layers: the 12-token prompt and
  16 generated tokens cross three chunk boundaries;
- llama4-scout: every layer MoE, 8 experts, use_qk_norm (weightless RMS norm of q and k
  per head after RoPE, on RoPE layers only), llama3 RoPE scaling (factor 16,
  low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings 16: the
  head's frequencies fall in all three llama3 bands);
- llama4-maverick: interleave_moe_layer_step 2 (layers 0 and 2 dense of width
  intermediate_size_mlp, 1 and 3 MoE), 16 experts, no QK-norm, no RoPE scaling.

How to run (repository root, CPU only, under a minute):

    pip install torch transformers==5.25.0 safetensors numpy
    python tests/make_llama4_fixtures.py                      # both fixtures
    python tests/make_llama4_fixtures.py --only llama4-scout
    python tests/make_llama4_fixtures.py --custom --family llama4-maverick --out /tmp/l4 \
        --seed 5 [--hidden 48 --layers 8 --experts 6 --chunk 5 --nope-interval 2 ...]

Every reference is cross-checked before it is written: sdpa against eager attention,
HF's cached greedy decoding against re-running the whole sequence every step.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import transformers
from transformers import Llama4ForCausalLM, Llama4TextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_search import generate  # noqa: E402
from make_fixtures import (  # noqa: E402  (shared helpers of the Mixtral generator)
    DTYPES,
    MIN_DISTINCT_GREEDY,
    MIN_MARGIN,
    MIN_ROUTER_GAP,
    greedy,
    greedy_no_cache,
    make_prompt,
    read_safetensors_dir,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"


@dataclass(frozen=True)
class Spec:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 4
    experts: int = 8
    top_k: int = 1
    ffn: int = 32  # intermediate_size: routed and shared expert width
    dense_ffn: int = 96  # intermediate_size_mlp: dense layers
    moe_step: int = 1  # interleave_moe_layer_step
    vocab: int = 288
    chunk: int = 8
    nope_interval: int = 4
    qk_norm: bool = True
    llama3: tuple | None = (16.0, 1.0, 4.0, 16)  # factor, low, high, original max pos
    floor_scale: int = 4
    attn_scale: float = 0.5
    rope_theta: float = 500000.0
    max_pos: int = 128
    prompt_len: int = 12
    dtype: str = "float32"


FIXTURES = {
    "llama4-scout": Spec(),
    "llama4-maverick": Spec(experts=16, moe_step=2, qk_norm=False, llama3=None, vocab=300),
}
DEFAULT_SEEDS = {"llama4-scout": 8100, "llama4-maverick": 8200}


def moe_layers(s: Spec) -> list[int]:
    return list(range(s.moe_step - 1, s.layers, s.moe_step))


def make_config(s: Spec) -> Llama4TextConfig:
    rope = {"rope_type": "default", "rope_theta": s.rope_theta}
    if s.llama3:
        f, lo, hi, orig = s.llama3
        rope = {"rope_type": "llama3", "rope_theta": s.rope_theta, "factor": f,
                "low_freq_factor": lo, "high_freq_factor": hi,
                "original_max_position_embeddings": orig}
    return Llama4TextConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
        intermediate_size_mlp=s.dense_ffn, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        max_position_embeddings=s.max_pos, rms_norm_eps=1e-5, num_local_experts=s.experts,
        num_experts_per_tok=s.top_k, interleave_moe_layer_step=s.moe_step,
        use_qk_norm=s.qk_norm, no_rope_layer_interval=s.nope_interval,
        attention_chunk_size=s.chunk, attn_temperature_tuning=True,
        floor_scale=s.floor_scale, attn_scale=s.attn_scale, rope_parameters=rope,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
    )


def init_std(name: str, shape: tuple[int, ...], hidden: int) -> tuple[float, float]:
    """(mean, std) for one parameter, keyed on its in-memory name."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, 3.0 / math.sqrt(hidden)
    if name.endswith("router.weight"):
        return 0.0, 2.0 / math.sqrt(hidden)
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        return 0.0, 1.0 / math.sqrt(shape[1])  # [E, in, out]
    return 0.0, 1.0 / math.sqrt(shape[-1])


def build_model(s: Spec, seed: int) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(make_config(s)).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = init_std(name, tuple(p.shape), s.hidden)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)
    model.eval()
    return model


def published_names(s: Spec) -> dict[str, tuple[int, ...]]:
    h, hd = s.hidden, s.head_dim
    out = {"model.embed_tokens.weight": (s.vocab, h), "model.norm.weight": (h,),
           "lm_head.weight": (s.vocab, h)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (s.heads * hd, h),
            p + "self_attn.k_proj.weight": (s.kv_heads * hd, h),
            p + "self_attn.v_proj.weight": (s.kv_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, s.heads * hd),
        })
        if i in moe_layers(s):
            out.update({
                p + "feed_forward.router.weight": (s.experts, h),
                p + "feed_forward.experts.gate_up_proj": (s.experts, h, 2 * s.ffn),
                p + "feed_forward.experts.down_proj": (s.experts, s.ffn, h),
                p + "feed_forward.shared_expert.gate_proj.weight": (s.ffn, h),
                p + "feed_forward.shared_expert.up_proj.weight": (s.ffn, h),
                p + "feed_forward.shared_expert.down_proj.weight": (h, s.ffn),
            })
        else:
            out.update({
                p + "feed_forward.gate_proj.weight": (s.dense_ffn, h),
                p + "feed_forward.up_proj.weight": (s.dense_ffn, h),
                p + "feed_forward.down_proj.weight": (h, s.dense_ffn),
            })
    return out


def save_checkpoint(model, s: Spec, out: Path) -> None:
    m = copy.deepcopy(model).to(DTYPES[s.dtype])
    m.save_pretrained(out, max_shard_size="1GB")
    tensors, files = read_safetensors_dir(out)
    assert files == ["model.safetensors"], files
    want = published_names(s)
    assert set(tensors) == set(want), sorted(set(tensors) ^ set(want))
    state = model.state_dict()
    for k, shape in want.items():
        assert tuple(tensors[k].shape) == shape, (k, tuple(tensors[k].shape), shape)
        assert torch.equal(tensors[k], state[k].to(tensors[k].dtype)), k
    gc = out / "generation_config.json"
    if gc.exists():  # only repeats bos/eos from config.json
        gc.unlink()


def load(path: Path, attn: str = "eager") -> Llama4ForCausalLM:
    # Llama-4's experts have one implementation (bmm over every expert): no experts_implementation.
    m = Llama4ForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    m.eval()
    return m


@torch.no_grad()
def prompt_forward(model, s: Spec, prompt: list[int]):
    """Logits [T, V], per-layer router ids / weights ([] for dense layers), min router gap."""
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def h(_m, _inp, out):
            captured[i] = out[1].detach().float()  # router logits [T, E]
        return h

    handles = [layer.feed_forward.router.register_forward_hook(hook(i))
               for i, layer in enumerate(model.model.layers) if i in moe_layers(s)]
    out = model(input_ids=torch.tensor([prompt]), use_cache=False)
    for hd in handles:
        hd.remove()
    ids, weights, gaps = [], [], []
    for i in range(s.layers):
        if i not in captured:
            ids.append([])
            weights.append([])
            continue
        lg = captured[i]
        top = torch.topk(lg, s.top_k + 1, dim=-1)
        gaps.append((top.values[:, s.top_k - 1] - top.values[:, s.top_k]).min().item())
        ids.append(top.indices[:, :s.top_k].tolist())
        weights.append(torch.sigmoid(top.values[:, :s.top_k]).tolist())
    return out.logits[0].float(), ids, weights, min(gaps)


def compute_expected(path: Path, s: Spec, seed: int, prompt: list[int]) -> dict:
    model = load(path)
    logits, router_ids, router_w, gap = prompt_forward(model, s, prompt)
    greedy_ids, margins = greedy(model, prompt)
    cfg = model.config
    notes = {
        "family": "llama4_text",
        "spec": asdict(s),
        "moe_layers": cfg.moe_layers,
        "no_rope_layers (1 = RoPE)": cfg.no_rope_layers,
        "layer_types": cfg.layer_types,
        "query_scales_on_nope_layers": [
            math.log1p(math.floor((p + 1) / s.floor_scale)) * s.attn_scale + 1
            for p in range(len(prompt) + len(greedy_ids))],
        "min_router_logit_gap": gap,
    }
    return {
        "prompt_ids": prompt, "logits": logits.tolist(), "greedy_ids": greedy_ids,
        "greedy_margins": margins, "router_ids": router_ids, "router_weights": router_w,
        "dtype_on_disk": s.dtype, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "seed": seed, "notes": notes,
        "_gap": gap, "_logits_std": logits.std().item(),
    }


def acceptable(s: Spec, exp: dict) -> tuple[bool, str]:
    used = {e for layer in exp["router_ids"] for pos in layer for e in pos}
    need = min(6, s.experts)
    m = min(exp["greedy_margins"])
    distinct = len(set(exp["greedy_ids"]))
    ok = (m > MIN_MARGIN and exp["_gap"] > MIN_ROUTER_GAP and len(used) >= need
          and distinct >= MIN_DISTINCT_GREEDY)
    return ok, (f"min margin {m:.3g}, router gap {exp['_gap']:.3g}, experts used "
                f"{len(used)}/{s.experts}, distinct greedy {distinct}")


def write_fixture(s: Spec, seed: int, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = build_model(s, seed)
    prompt = make_prompt(s, seed)
    save_checkpoint(model, s, out)
    reloaded = load(out)
    state = model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k].to(DTYPES[s.dtype]).to(torch.float32)), k
    return compute_expected(out, s, seed, prompt)


def cross_check(path: Path, s: Spec, exp: dict) -> None:
    prompt = exp["prompt_ids"]
    ref = torch.tensor(exp["logits"])
    fast = load(path, attn="sdpa")
    lg, rid, _, _ = prompt_forward(fast, s, prompt)
    assert (lg - ref).abs().max().item() < 1e-4, (lg - ref).abs().max().item()
    assert rid == exp["router_ids"]
    assert greedy_no_cache(load(path), prompt) == exp["greedy_ids"], "cached != uncached greedy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=None, help="start of the seed search")
    ap.add_argument("--only", choices=sorted(FIXTURES))
    ap.add_argument("--custom", action="store_true", help="write ONE fixture into --out itself")
    ap.add_argument("--family", default="llama4-scout", choices=sorted(FIXTURES),
                    help="--custom preset")
    over = ap.add_argument_group("--custom overrides (default: the preset's value)")
    for flag, typ in [("hidden", int), ("heads", int), ("kv-heads", int), ("head-dim", int),
                      ("layers", int), ("experts", int), ("ffn", int), ("dense-ffn", int),
                      ("moe-step", int), ("vocab", int), ("chunk", int), ("nope-interval", int),
                      ("floor-scale", int), ("attn-scale", float), ("rope-theta", float),
                      ("prompt-len", int)]:
        over.add_argument(f"--{flag}", type=typ, default=None)
    over.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None)
    over.add_argument("--no-llama3", action="store_true", help="plain RoPE")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    transformers.utils.logging.disable_progress_bar()

    changes = {f.name: getattr(args, f.name) for f in fields(Spec)
               if getattr(args, f.name, None) is not None}
    if args.no_llama3:
        changes["llama3"] = None
    custom = replace(FIXTURES[args.family], **changes)
    generate(args, FIXTURES, DEFAULT_SEEDS, custom, write_fixture, acceptable, cross_check,
             lambda exp: f"router gap {exp['_gap']:.2e}")


if __name__ == "__main__":
    main()
