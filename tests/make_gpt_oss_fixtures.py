#!/usr/bin/env python3
"""Generate tiny random gpt-oss checkpoints plus Hugging Face reference outputs.

Companion of tests/make_fixtures.py (Mixtral) with the same expected.json schema and
the same "reload from disk in f32, eager attention" rule. gpt-oss's mechanisms, all in
both fixtures:

- attention sinks: a learned logit per head (here N(0, 1)) joins every softmax's
  denominator and is dropped;
- q/k/v/o biases, explicit head_dim, layer_types alternating sliding (window 6: the
  12-token prompt and 16 generated tokens cross it) and full attention;
- YaRN RoPE with truncate false (factor 4 over original_max_position_embeddings 32);
- the router: a linear with bias, top-k (2 of 8) of its logits softmaxed;
- experts with biases and the clamped SwiGLU (clamp(up, ±limit) + 1) * g' *
  sigmoid(1.702 g'), g' = min(gate, limit), with swiglu_limit 1.5 so that the clamps
  act on these random activations (the release's 7 would never clamp here);
- gate_up_proj [E, H, 2F] transposed with interleaved columns (gate = 0::2, up = 1::2),
  as published.

Fixtures:
  gpt-oss        the experts dense (f32), as save_pretrained writes them.
  gpt-oss-mxfp4  the same architecture with its experts stored as published in MXFP4:
                 mlp.experts.{gate_up,down}_proj_blocks [E, out, in/32, 16] u8 (low nibble
                 = even element, E2M1) and _scales [E, out, in/32] u8 (E8M0, 2^(s-127)),
                 config.json quantization_config {"quant_method": "mxfp4"}. The reference
                 is the model holding the dequantized values (exact in f32); transformers'
                 own MXFP4 loader (dequantizing on a CPU without triton kernels) is checked to
                 read the written blocks to the same logits.

How to run (repository root, CPU only, under a minute):

    pip install torch transformers==5.25.0 safetensors numpy accelerate
    python tests/make_gpt_oss_fixtures.py                     # both fixtures
    python tests/make_gpt_oss_fixtures.py --custom --out /tmp/go --seed 3 [--mxfp4 \\
        --hidden 96 --experts 6 --top-k 3 --window 4 --limit 3.0 --layers 3 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import GptOssConfig, GptOssForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_search import generate  # noqa: E402
from make_fixtures import (  # noqa: E402  (shared helpers of the Mixtral generator)
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
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@dataclass(frozen=True)
class Spec:
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    ffn: int = 32
    vocab: int = 272
    window: int = 6
    limit: float = 1.5
    yarn_factor: float = 4.0
    yarn_orig: int = 32
    rope_theta: float = 150000.0
    max_pos: int = 128
    prompt_len: int = 12
    mxfp4: bool = False
    dtype: str = "float32"


FIXTURES = {"gpt-oss": Spec(), "gpt-oss-mxfp4": Spec(mxfp4=True, vocab=260)}
DEFAULT_SEEDS = {"gpt-oss": 9100, "gpt-oss-mxfp4": 9200}


def make_config(s: Spec) -> GptOssConfig:
    return GptOssConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim, num_local_experts=s.experts, num_experts_per_tok=s.top_k,
        sliding_window=s.window, swiglu_limit=s.limit, max_position_embeddings=s.max_pos,
        rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
        rope_parameters={"rope_type": "yarn", "rope_theta": s.rope_theta, "factor": s.yarn_factor,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": s.yarn_orig},
    )


def init_std(name: str, shape: tuple[int, ...], hidden: int) -> tuple[float, float]:
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name == "lm_head.weight":
        return 0.0, 3.0 / math.sqrt(hidden)
    if name.endswith("router.weight"):
        return 0.0, 2.0 / math.sqrt(hidden)
    if name.endswith("sinks"):
        return 0.0, 1.0
    if name.endswith("bias"):
        return 0.0, 0.3
    if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        return 0.0, 1.0 / math.sqrt(shape[1])  # [E, in, out]
    return 0.0, 1.0 / math.sqrt(shape[-1])


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, out, in] f32 -> (blocks [E, out, in/32, 16] u8, scales [E, out, in/32] u8, the
    dequantized [E, out, in]). OCP MX: shared exponent floor(log2(amax)) - 2 per 32 values,
    each value rounded to the nearest E2M1 magnitude."""
    e, o, i = w.shape
    g = w.reshape(e, o, i // 32, 32)
    amax = g.abs().amax(dim=-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-30))) - 2,
                      torch.full_like(amax, -127.0)).clamp(-127, 127)
    x = g / torch.pow(2.0, exp)
    mags = torch.tensor(FP4[:8])
    code = (x.abs().unsqueeze(-1) - mags).abs().argmin(dim=-1)  # nearest magnitude (ties: lower)
    code = code + 8 * ((x < 0) & (code > 0)).long()
    deq = torch.tensor(FP4)[code] * torch.pow(2.0, exp)
    code = code.to(torch.uint8)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous()
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks, scales, deq.reshape(e, o, i)


def build_model(s: Spec, seed: int) -> tuple[GptOssForCausalLM, dict]:
    """The model (with MXFP4-representable experts when s.mxfp4) and the packed expert tensors."""
    torch.manual_seed(seed)
    model = GptOssForCausalLM(make_config(s)).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    packed = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean, std = init_std(name, tuple(p.shape), s.hidden)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)
            if s.mxfp4 and (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
                blocks, scales, deq = mxfp4_quantize(p.transpose(1, 2).contiguous())
                p.copy_(deq.transpose(1, 2))
                packed[name + "_blocks"] = blocks
                packed[name + "_scales"] = scales
    model.eval()
    return model, packed


def save_checkpoint(model, packed: dict, s: Spec, out: Path) -> None:
    model.save_pretrained(out, max_shard_size="1GB")
    tensors, files = read_safetensors_dir(out)
    assert files == ["model.safetensors"], files
    state = model.state_dict()
    for k, t in tensors.items():
        assert torch.equal(t, state[k].to(t.dtype)), k
    want = {"model.layers.0.mlp.experts.gate_up_proj": (s.experts, s.hidden, 2 * s.ffn),
            "model.layers.0.mlp.experts.gate_up_proj_bias": (s.experts, 2 * s.ffn),
            "model.layers.0.mlp.experts.down_proj": (s.experts, s.ffn, s.hidden),
            "model.layers.0.self_attn.sinks": (s.heads,),
            "model.layers.0.mlp.router.bias": (s.experts,)}
    for k, shape in want.items():
        assert tuple(tensors[k].shape) == shape, (k, tensors[k].shape)
    if s.mxfp4:
        for k in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            del tensors[k]
        tensors.update(packed)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"] = {
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                       "model.embed_tokens", "lm_head"],
            "quant_method": "mxfp4"}
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gc = out / "generation_config.json"
    if gc.exists():
        gc.unlink()


def load(path: Path) -> GptOssForCausalLM:
    m = GptOssForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


@torch.no_grad()
def prompt_forward(model, s: Spec, prompt: list[int]):
    captured: dict[int, tuple] = {}

    def hook(i):
        def h(_m, _inp, out):
            captured[i] = (out[0].float(), out[1].float(), out[2])  # logits, scores, indices
        return h

    handles = [layer.mlp.router.register_forward_hook(hook(i))
               for i, layer in enumerate(model.model.layers)]
    out = model(input_ids=torch.tensor([prompt]), use_cache=False)
    for hd in handles:
        hd.remove()
    ids, weights, gaps, clamped = [], [], [], 0
    for i in range(s.layers):
        logits, scores, idx = captured[i]
        top = torch.topk(logits, s.top_k + 1, dim=-1)
        assert torch.equal(top.indices[:, :s.top_k], idx)
        gaps.append((top.values[:, s.top_k - 1] - top.values[:, s.top_k]).min().item())
        ids.append(idx.tolist())
        weights.append(scores.tolist())
    return out.logits[0].float(), ids, weights, min(gaps)


@torch.no_grad()
def clamp_fraction(model, s: Spec, prompt: list[int]) -> float:
    """Share of the prompt's gate/up values (over every layer's chosen experts) beyond ±limit."""
    seen, total = [0], [0]

    def hook(m, args, kwargs):
        x, idx = args[0], args[1]
        for e in idx.unique().tolist():
            tok = (idx == e).any(dim=-1)
            gu = x[tok] @ m.gate_up_proj[e] + m.gate_up_proj_bias[e]
            seen[0] += (gu.abs() > s.limit).sum().item()
            total[0] += gu.numel()

    hs = [l.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True) for l in model.model.layers]
    model(input_ids=torch.tensor([prompt]), use_cache=False)
    for h in hs:
        h.remove()
    return seen[0] / total[0]


def compute_expected(path: Path, s: Spec, seed: int, prompt: list[int]) -> dict:
    model = load(path)
    logits, router_ids, router_w, gap = prompt_forward(model, s, prompt)
    greedy_ids, margins = greedy(model, prompt)
    notes = {"family": "gpt_oss", "spec": asdict(s), "layer_types": model.config.layer_types,
             "yarn_attention_factor": 0.1 * math.log(s.yarn_factor) + 1,
             "clamped_gate_up_fraction": clamp_fraction(model, s, prompt),
             "min_router_logit_gap": gap}
    return {
        "prompt_ids": prompt, "logits": logits.tolist(), "greedy_ids": greedy_ids,
        "greedy_margins": margins, "router_ids": router_ids, "router_weights": router_w,
        "dtype_on_disk": "mxfp4 experts, float32 others" if s.mxfp4 else s.dtype,
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "seed": seed, "notes": notes, "_gap": gap, "_logits_std": logits.std().item(),
    }


def write_fixture(s: Spec, seed: int, out: Path) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model, packed = build_model(s, seed)
    prompt = make_prompt(s, seed)
    save_checkpoint(model, packed, s, out)
    if s.mxfp4:
        # The reference: the same model holding the dequantized experts, as a dense checkpoint.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            exp = compute_expected(Path(tmp), s, seed, prompt)
        # transformers' MXFP4 loader reads the written blocks to the same model.
        mx = load(out)
        lg = prompt_forward(mx, s, prompt)[0]
        exp["notes"]["transformers_mxfp4_loader_max_abs_logit_diff"] = (
            lg - torch.tensor(exp["logits"])).abs().max().item()
        assert exp["notes"]["transformers_mxfp4_loader_max_abs_logit_diff"] < 1e-4
        return exp
    return compute_expected(out, s, seed, prompt)


def acceptable(s: Spec, exp: dict) -> tuple[bool, str]:
    used = {e for layer in exp["router_ids"] for pos in layer for e in pos}
    m = min(exp["greedy_margins"])
    distinct = len(set(exp["greedy_ids"]))
    clamp = exp["notes"]["clamped_gate_up_fraction"]
    ok = (m > MIN_MARGIN and exp["_gap"] > MIN_ROUTER_GAP and len(used) >= min(6, s.experts)
          and distinct >= MIN_DISTINCT_GREEDY and clamp > 0.01)
    return ok, (f"min margin {m:.3g}, router gap {exp['_gap']:.3g}, experts used {len(used)}, "
                f"distinct greedy {distinct}, clamped {clamp:.3f}")


def cross_check(path: Path, s: Spec, exp: dict) -> None:
    prompt = exp["prompt_ids"]
    if s.mxfp4:
        return  # its reference came from a dense twin, checked against transformers' loader
    # (gpt-oss has no sdpa attention in transformers: eager is the only one to compare.)
    assert greedy_no_cache(load(path), prompt) == exp["greedy_ids"], "cached != uncached greedy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", choices=sorted(FIXTURES))
    ap.add_argument("--custom", action="store_true", help="write ONE fixture into --out itself")
    over = ap.add_argument_group("--custom overrides (default: the gpt-oss fixture's value)")
    for flag, typ in [("hidden", int), ("heads", int), ("kv-heads", int), ("head-dim", int),
                      ("layers", int), ("experts", int), ("top-k", int), ("ffn", int),
                      ("vocab", int), ("window", int), ("limit", float), ("yarn-factor", float),
                      ("yarn-orig", int), ("prompt-len", int)]:
        over.add_argument(f"--{flag}", type=typ, default=None)
    over.add_argument("--mxfp4", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    transformers.utils.logging.disable_progress_bar()
    changes = {f.name: getattr(args, f.name) for f in fields(Spec)
               if getattr(args, f.name, None) is not None}
    custom = replace(FIXTURES["gpt-oss"], **changes)
    generate(args, FIXTURES, DEFAULT_SEEDS, custom, write_fixture, acceptable, cross_check,
             lambda exp: f"router gap {exp['_gap']:.2e}")


if __name__ == "__main__":
    main()
