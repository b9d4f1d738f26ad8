#!/usr/bin/env python3
"""Generate tiny random Mixtral checkpoints plus Hugging Face reference outputs.

These are the parity fixtures for moe-run's Rust engine. Every fixture is a
directory in the standard Hugging Face layout (config.json, safetensors
weights with the *published* per-expert tensor names, optional sharding
index) plus `expected.json`, which holds what transformers computes from
those exact files.

How to run (from the repository root, CPU only, takes well under a minute):

    pip install torch transformers==5.23.0 safetensors numpy tokenizers
    python tests/make_fixtures.py                    # rewrite tests/fixtures/*
    python tests/make_fixtures.py --only mixtral-swa # rewrite one fixture
    python tests/make_fixtures.py --out /tmp/fx --seed 7   # other seeds/dir

Fresh checkpoints the committed tests never saw (for the Rust side and for
outside checkers):

    python tests/make_fixtures.py --custom --out /tmp/fresh --seed 123 \
        --hidden 72 --heads 5 --kv-heads 1 --head-dim 16 --experts 6 \
        --top-k 3 --ffn 40 --layers 3 --vocab 301 [--sliding-window W] [--tie]

Fixtures (tests/fixtures/<name>/):

  mixtral-base  H=64, 4 heads / 2 kv heads (head_dim 16 implied, config has
                "head_dim": null), 2 layers, 8 experts top-2, F=96, vocab 320,
                rope_theta 1e4, no sliding window, untied, one
                model.safetensors in f32. Also ships a real byte-level BPE
                tokenizer (tokenizer.json, tokenizer_config.json,
                generation_config.json) and tokenizer_expected.json with a
                few encode/decode pairs. The general "does the forward match"
                fixture.
  mixtral-swa   H=64, 4 heads / 1 kv head (MQA), 3 layers, 8 experts top-2,
                F=64, vocab 256, sliding_window 5 with a 12-token prompt, so
                the window cuts keys both in prefill and in every decode step.
                Sharded (>= 3 files) + model.safetensors.index.json. config.json
                is rewritten in the LEGACY published form (top-level
                "rope_theta": 1e6, "rope_scaling": null, "torch_dtype", no
                "rope_parameters"/"head_dim"), as real Mixtral repos have it.
  mixtral-odd   H=72, 5 heads / 1 kv head, explicit head_dim 16 (q_proj is
                [80, 72], i.e. heads*head_dim != H), 3 layers, 6 experts top-3,
                F=40, vocab 301 (odd), tie_word_embeddings (no lm_head.weight
                in the file), v5 "rope_parameters" config form, theta 1e4.
  mixtral-bf16  Same weights and prompt as mixtral-base, stored as bfloat16.
  mixtral-f16   Same weights and prompt as mixtral-base, stored as float16.
                For both, the expected outputs are HF's forward of the 16-bit
                file loaded with dtype=float32 (the upcast is exact), so they
                test the on-disk-dtype -> f32 conversion, not 16-bit math.

expected.json schema (T = prompt length, L = layers, k = top-k):
  prompt_ids      [T] ints in [3, vocab)   (0..2 are <unk>/<s>/</s>)
  logits          [T][vocab] f32 logits of one full-prompt forward
  greedy_ids      [16] tokens from model.generate(do_sample=False, use_cache=True,
                  max_new_tokens=16, min_new_tokens=16) with EOS disabled
  greedy_margins  [16] top1 - top2 raw logit at each greedy step
  router_ids      [L][T][k] top-k expert ids per layer/position, in descending
                  router probability order (prompt forward)
  router_weights  [L][T][k] the matching renormalised weights
  dtype_on_disk, transformers_version, torch_version, seed

How the numbers are made non-degenerate: HF's default init (std 0.02) gives
near-zero logits and routing that barely depends on the input, which would
let a broken engine pass. Every parameter is overwritten from a seeded
generator: linear matrices N(0, 1/sqrt(in_features)), lm_head N(0, 3/sqrt(H)),
router N(0, 2/sqrt(H)), embeddings N(0, 1) (N(0, 2/sqrt(H)) when tied to the
lm_head), RMSNorm weights 1 + N(0, 0.1).
Seeds are searched upward from the requested one until every greedy margin
is > 1e-3, the k-th/(k+1)-th router probability gap at every prompt
position is > 1e-4 (so f32 noise cannot flip an expert choice), and at
least min(6, E) distinct experts are used, and the greedy continuation has at
least 6 distinct tokens (random models love repetition loops, which would let
a decode path that ignores its KV cache pass); the chosen seed is recorded.

The expected outputs are always computed from a model RELOADED from the
written files (from_pretrained, dtype=float32), with eager attention and
eager experts, and cross-checked against HF's defaults (sdpa + grouped_mm)
and against a cache-free greedy loop.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

NEW_TOKENS = 16
MIN_MARGIN = 1e-3  # greedy top1-top2 logit gap the Rust side can reproduce in f32
MIN_ROUTER_GAP = 1e-4  # gap between the k-th and (k+1)-th router probability
MIN_DISTINCT_GREEDY = 6  # distinct tokens among the 16 greedy ones
MAX_SEED_TRIES = 500
FIRST_PROMPT_ID = 3  # ids 0, 1, 2 are <unk>, <s>, </s>

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Spec:
    """One tiny Mixtral checkpoint to write."""

    hidden: int
    heads: int
    kv_heads: int
    layers: int
    experts: int
    top_k: int
    ffn: int
    vocab: int
    head_dim: int | None = None  # None: derived as hidden // heads (config says null)
    sliding_window: int | None = None
    tie: bool = False
    rope_theta: float = 10000.0
    max_pos: int = 128
    prompt_len: int = 12
    dtype: str = "float32"  # dtype written to disk
    shards: int = 1  # >1: at least this many shard files + model.safetensors.index.json
    legacy_config: bool = False  # rewrite config.json in the pre-v5 published form
    tokenizer: bool = False  # ship a trained byte-level BPE tokenizer


BASE = Spec(hidden=64, heads=4, kv_heads=2, layers=2, experts=8, top_k=2, ffn=96, vocab=320,
            prompt_len=12, tokenizer=True)

FIXTURES: dict[str, Spec] = {
    "mixtral-base": BASE,
    "mixtral-swa": Spec(hidden=64, heads=4, kv_heads=1, layers=3, experts=8, top_k=2, ffn=64,
                        vocab=256, sliding_window=5, rope_theta=1e6, prompt_len=12, shards=3,
                        legacy_config=True),
    "mixtral-odd": Spec(hidden=72, heads=5, kv_heads=1, head_dim=16, layers=3, experts=6, top_k=3,
                        ffn=40, vocab=301, tie=True, prompt_len=12),
    # Same seed => same weights and prompt as mixtral-base; only the on-disk dtype differs.
    "mixtral-bf16": replace(BASE, dtype="bfloat16", tokenizer=False),
    "mixtral-f16": replace(BASE, dtype="float16", tokenizer=False),
}
# Fixtures whose seed must be the same as mixtral-base's (they share its weights).
SAME_WEIGHTS_AS_BASE = ("mixtral-bf16", "mixtral-f16")
DEFAULT_SEEDS = {"mixtral-base": 1000, "mixtral-swa": 2000, "mixtral-odd": 3000}


# --------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------

def make_config(spec: Spec) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_pos,
        sliding_window=spec.sliding_window,
        tie_word_embeddings=spec.tie,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def init_std(name: str, shape: tuple[int, ...], hidden: int, tied: bool) -> tuple[float, float]:
    """(mean, std) for one parameter, keyed on its v5 in-memory name.

    In memory v5 fuses experts: mlp.experts.gate_up_proj [E, 2F, H] (in = H) and
    mlp.experts.down_proj [E, H, F] (in = F). Linear weights are [out, in].
    """
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0, 0.1
    if name == "model.embed_tokens.weight":
        # Tied: this matrix is also the lm_head. At N(0, 1) the logits have std ~sqrt(H)
        # and the token's own embedding dominates them, so greedy just repeats the last
        # input token. 2/sqrt(H) gives logits std ~2 and far fewer repetition loops.
        return 0.0, (2.0 / math.sqrt(hidden) if tied else 1.0)
    if name == "lm_head.weight":
        return 0.0, 3.0 / math.sqrt(hidden)
    if name.endswith("mlp.gate.weight"):  # router [E, H]
        return 0.0, 2.0 / math.sqrt(hidden)
    # Every other parameter is a (possibly batched) linear matrix: last dim is in_features.
    return 0.0, 1.0 / math.sqrt(shape[-1])


def build_model(spec: Spec, seed: int) -> MixtralForCausalLM:
    """Random f32 Mixtral with seeded, larger-than-default weights."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(make_config(spec)).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() de-duplicates, so a tied lm_head is not drawn twice
        # (it stays the embedding matrix).
        for name, p in model.named_parameters():
            mean, std = init_std(name, tuple(p.shape), spec.hidden, spec.tie)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)
    if spec.tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


def make_prompt(spec: Spec, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(FIRST_PROMPT_ID, spec.vocab, size=spec.prompt_len)]


# --------------------------------------------------------------------------------------
# Writing and verifying the checkpoint files
# --------------------------------------------------------------------------------------

def published_names(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a published Mixtral checkpoint holds."""
    H, F, E, V = spec.hidden, spec.ffn, spec.experts, spec.vocab
    hd = spec.head_dim or H // spec.heads
    q, kv = spec.heads * hd, spec.kv_heads * hd
    names = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not spec.tie:
        names["lm_head.weight"] = (V, H)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = (H,)
        names[p + "post_attention_layernorm.weight"] = (H,)
        names[p + "self_attn.q_proj.weight"] = (q, H)
        names[p + "self_attn.k_proj.weight"] = (kv, H)
        names[p + "self_attn.v_proj.weight"] = (kv, H)
        names[p + "self_attn.o_proj.weight"] = (H, q)
        names[p + "block_sparse_moe.gate.weight"] = (E, H)
        for e in range(E):
            names[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (F, H)  # gate
            names[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (F, H)  # up
            names[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (H, F)  # down
    return names


def read_safetensors_dir(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    files = sorted(f.name for f in path.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for k in f.keys():
                assert k not in tensors, f"{k} appears in two shards"
                tensors[k] = f.get_tensor(k)
    return tensors, files


def published_state_dict(model: MixtralForCausalLM, spec: Spec) -> dict[str, torch.Tensor]:
    """Un-fuse v5's in-memory experts into the published per-expert names (fallback writer)."""
    F = spec.ffn
    out = {}
    for name, t in model.state_dict().items():
        if spec.tie and name == "lm_head.weight":
            continue
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, H]: rows 0..F gate (w1), F..2F up (w3)
            base = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{base}{e}.w1.weight"] = t[e, :F].clone()
                out[f"{base}{e}.w3.weight"] = t[e, F:].clone()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, F]
            base = name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{base}{e}.w2.weight"] = t[e].clone()
        else:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t.clone()
    return out


def save_checkpoint(model: MixtralForCausalLM, spec: Spec, out: Path) -> None:
    dtype = DTYPES[spec.dtype]
    m = copy.deepcopy(model).to(dtype)  # keep the f32 original intact
    total_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    if spec.shards > 1:
        # save_pretrained packs whole tensors greedily, so a limit of total/shards gives
        # at least `shards` files (possibly one more).
        shard = f"{total_bytes // spec.shards // 1000 + 1}KB"
        m.save_pretrained(out, max_shard_size=shard)
    else:
        m.save_pretrained(out, max_shard_size="1GB")

    expected = published_names(spec)
    tensors, files = read_safetensors_dir(out)
    if set(tensors) != set(expected):
        # save_pretrained did not write the published names: write them ourselves.
        print(f"  save_pretrained wrote non-published names; writing {out} by hand", file=sys.stderr)
        from safetensors.torch import save_file
        for f in files:
            (out / f).unlink()
        sd = {k: v.to(dtype).contiguous() for k, v in published_state_dict(model, spec).items()}
        assert spec.shards == 1, "hand-written sharding not implemented"
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        tensors, files = read_safetensors_dir(out)

    # Verify names, shapes and dtypes of what is on disk.
    assert set(tensors) == set(expected), sorted(set(tensors) ^ set(expected))
    for k, shape in expected.items():
        assert tuple(tensors[k].shape) == shape, (k, tuple(tensors[k].shape), shape)
        assert tensors[k].dtype == dtype, (k, tensors[k].dtype)
    if spec.shards > 1:
        assert len(files) >= spec.shards, files
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(expected)
        assert set(index["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"], files
        assert not (out / "model.safetensors.index.json").exists()

    # The bytes on disk must be exactly the (rounded) in-memory weights.
    ref = published_state_dict(model, spec)
    for k, t in tensors.items():
        assert torch.equal(t, ref[k].to(dtype)), k


def rewrite_config_legacy(out: Path) -> None:
    """Turn v5's config.json into the form published Mixtral repos use.

    v5 writes "rope_parameters": {"rope_type", "rope_theta"}, "dtype", and
    "head_dim": null. Mixtral-8x7B's config.json instead has a top-level
    "rope_theta", "rope_scaling": null, "torch_dtype", and no head_dim key.
    """
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    assert rope["rope_type"] == "default", rope
    if cfg.get("head_dim", 0) is None:
        del cfg["head_dim"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["rope_theta"] = float(rope["rope_theta"])
    cfg["rope_scaling"] = None
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Tokenizer (mixtral-base only)
# --------------------------------------------------------------------------------------

# Public-domain English (U.S. Declaration of Independence, 1776; U.S. Constitution
# preamble, 1787; Lincoln's Gettysburg Address, 1863) to train a tiny BPE on.
TOKENIZER_TEXT = """\
When in the Course of human events, it becomes necessary for one people to dissolve the
political bands which have connected them with another, and to assume among the powers of
the earth, the separate and equal station to which the Laws of Nature and of Nature's God
entitle them, a decent respect to the opinions of mankind requires that they should declare
the causes which impel them to the separation.
We hold these truths to be self-evident, that all men are created equal, that they are
endowed by their Creator with certain unalienable Rights, that among these are Life, Liberty
and the pursuit of Happiness. That to secure these rights, Governments are instituted among
Men, deriving their just powers from the consent of the governed, That whenever any Form of
Government becomes destructive of these ends, it is the Right of the People to alter or to
abolish it, and to institute new Government, laying its foundation on such principles and
organizing its powers in such form, as to them shall seem most likely to effect their Safety
and Happiness.
We the People of the United States, in Order to form a more perfect Union, establish Justice,
insure domestic Tranquility, provide for the common defence, promote the general Welfare, and
secure the Blessings of Liberty to ourselves and our Posterity, do ordain and establish this
Constitution for the United States of America.
Four score and seven years ago our fathers brought forth on this continent, a new nation,
conceived in Liberty, and dedicated to the proposition that all men are created equal.
Now we are engaged in a great civil war, testing whether that nation, or any nation so
conceived and so dedicated, can long endure. We are met on a great battle-field of that war.
We have come to dedicate a portion of that field, as a final resting place for those who here
gave their lives that that nation might live. It is altogether fitting and proper that we
should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- we can
not hallow -- this ground. The brave men, living and dead, who struggled here, have consecrated
it, far above our poor power to add or detract. The world will little note, nor long remember
what we say here, but it can never forget what they did here. It is for us the living, rather,
to be dedicated here to the unfinished work which they who fought here have thus far so nobly
advanced. It is rather for us to be here dedicated to the great task remaining before us --
that from these honored dead we take increased devotion to that cause for which they gave the
last full measure of devotion -- that we here highly resolve that these dead shall not have
died in vain -- that this nation, under God, shall have a new birth of freedom -- and that
government of the people, by the people, for the people, shall not perish from the earth.
"""

TOKENIZER_SAMPLES = [
    "We hold these truths to be self-evident.",
    "Four score and seven years ago",
    "  leading spaces, tabs\tand\nnewlines",
    "caf\u00e9 \u2014 na\u00efve \u00fcber \U0001F600",
    "",
]


def write_tokenizer(out: Path, vocab: int, max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is <unk>
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": transformers.__version__,
    }, indent=2) + "\n")

    # Reference encodings through transformers' loader (what a user of the repo would get).
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(out))
    samples = []
    for text in TOKENIZER_SAMPLES:
        ids = hf(text, add_special_tokens=True)["input_ids"]
        assert ids[0] == 1, ids
        assert ids == tok.encode(text).ids
        samples.append({
            "text": text,
            "ids_with_bos": ids,
            "ids_no_special": hf(text, add_special_tokens=False)["input_ids"],
            "decoded_skip_special": hf.decode(ids, skip_special_tokens=True),
        })
        assert samples[-1]["decoded_skip_special"] == text
    # One sample per line; non-ASCII text is \u-escaped (surrogate pairs for the emoji).
    body = ",\n".join("  " + json.dumps(x) for x in samples)
    (out / "tokenizer_expected.json").write_text('{"samples": [\n' + body + "\n]}\n")


# --------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------

def load(path: Path, attn: str = "eager", experts: str = "eager") -> MixtralForCausalLM:
    m = MixtralForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=attn, experts_implementation=experts
    )
    m.eval()
    return m


@torch.no_grad()
def prompt_forward(model: MixtralForCausalLM, prompt: list[int]):
    """Logits [T, V], per-layer router top-k ids / weights, and the smallest k-th vs (k+1)-th
    router probability gap, for one prompt forward."""
    captured = []

    def hook(_module, _inp, output):
        # MixtralTopKRouter.forward returns (router_logits, router_scores, router_indices):
        # softmax(logits.float()) -> topk (descending) -> divide by the top-k sum.
        captured.append(tuple(o.detach().clone() for o in output))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        ids = torch.tensor([prompt])
        out = model(input_ids=ids, use_cache=False, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    assert len(captured) == model.config.num_hidden_layers

    k = model.config.num_experts_per_tok
    router_ids, router_w, gaps = [], [], []
    for layer, (logits, scores, idx) in enumerate(captured):
        # Independent recomputation from output_router_logits, exactly as HF does it.
        rl = out.router_logits[layer]
        assert torch.equal(rl, logits)
        probs = torch.softmax(rl.float(), dim=-1)
        top_v, top_i = torch.topk(probs, k, dim=-1)
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
        assert torch.equal(top_i, idx) and torch.allclose(top_v, scores, rtol=0, atol=1e-7)
        sorted_p = torch.sort(probs, dim=-1, descending=True).values
        if k < probs.shape[-1]:
            gaps.append((sorted_p[:, k - 1] - sorted_p[:, k]).min().item())
        router_ids.append(idx.tolist())
        router_w.append(scores.float().tolist())
    return out.logits[0].float(), router_ids, router_w, min(gaps) if gaps else float("inf")


@torch.no_grad()
def greedy(model: MixtralForCausalLM, prompt: list[int]):
    """HF generate (cached), EOS disabled; returns new ids and top1-top2 raw-logit margins."""
    gc = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=True,
        eos_token_id=None, pad_token_id=0, bos_token_id=1,
        output_logits=True, return_dict_in_generate=True,
    )
    # generate() back-fills unset (None) fields from model.generation_config, so EOS has
    # to be removed there too, or eos_token_id=None above would silently become 2.
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    res = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    new = res.sequences[0, len(prompt):].tolist()
    assert len(new) == NEW_TOKENS, new
    margins = []
    for step, lg in enumerate(res.logits):  # raw (unprocessed) logits, [1, V] per step
        top2 = torch.topk(lg[0].float(), 2)
        # No logits processor interfered: the chosen token is the raw argmax.
        assert top2.indices[0].item() == new[step], (step, top2.indices.tolist(), new[step])
        margins.append((top2.values[0] - top2.values[1]).item())
    return new, margins


@torch.no_grad()
def greedy_no_cache(model: MixtralForCausalLM, prompt: list[int]) -> list[int]:
    """Re-run the whole sequence every step (no KV cache) as an independent check."""
    seq = list(prompt)
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
        seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):]


def compute_expected(path: Path, spec: Spec, seed: int, prompt: list[int]) -> dict:
    model = load(path)
    logits, router_ids, router_w, router_gap = prompt_forward(model, prompt)
    greedy_ids, margins = greedy(model, prompt)
    return {
        "prompt_ids": prompt,
        "logits": logits.tolist(),
        "greedy_ids": greedy_ids,
        "greedy_margins": margins,
        "router_ids": router_ids,
        "router_weights": router_w,
        "dtype_on_disk": spec.dtype,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": seed,
        # Not written to expected.json; used for seed selection and the summary line.
        "_router_gap": router_gap,
        "_logits_std": logits.std().item(),
    }


def acceptable(spec: Spec, exp: dict) -> tuple[bool, str]:
    used = {e for layer in exp["router_ids"] for pos in layer for e in pos}
    need = min(6, spec.experts)
    min_margin = min(exp["greedy_margins"])
    distinct = len(set(exp["greedy_ids"]))  # reject degenerate "repeat one token" continuations
    ok = (min_margin > MIN_MARGIN and exp["_router_gap"] > MIN_ROUTER_GAP and len(used) >= need
          and distinct >= MIN_DISTINCT_GREEDY)
    why = (f"min margin {min_margin:.3g}, router gap {exp['_router_gap']:.3g}, "
           f"experts used {len(used)}/{spec.experts}, distinct greedy ids {distinct}")
    return ok, why


def cross_check(path: Path, spec: Spec, exp: dict) -> None:
    """The same files through HF's default kernels and a cache-free greedy loop."""
    prompt = exp["prompt_ids"]
    ref = torch.tensor(exp["logits"])
    fast = load(path, attn="sdpa", experts="grouped_mm")
    lg, rid, _, _ = prompt_forward(fast, prompt)
    assert (lg - ref).abs().max().item() < 1e-4, (lg - ref).abs().max().item()
    assert rid == exp["router_ids"]
    assert greedy(fast, prompt)[0] == exp["greedy_ids"]
    assert greedy_no_cache(load(path), prompt) == exp["greedy_ids"]
    if spec.sliding_window is not None and spec.prompt_len > spec.sliding_window:
        # The window must actually change the answer, or the fixture tests nothing.
        full = load(path)
        full.config.sliding_window = None
        lg_full = full(input_ids=torch.tensor([prompt]), use_cache=False).logits[0]
        diff = (lg_full - ref)[spec.sliding_window:].abs().max().item()
        assert diff > 1e-2, f"sliding window has no effect ({diff})"
        assert (lg_full - ref)[: spec.sliding_window].abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def write_fixture(spec: Spec, seed: int, out: Path) -> dict:
    """Build, save, reload, compute. Returns the expected dict (with private keys)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = build_model(spec, seed)
    prompt = make_prompt(spec, seed)
    save_checkpoint(model, spec, out)
    if not spec.tokenizer and (out / "generation_config.json").exists():
        # save_pretrained's generation_config.json only repeats bos/eos from config.json.
        (out / "generation_config.json").unlink()

    if spec.legacy_config:
        # Prove the legacy config loads to the same model: v5-form logits == legacy-form logits.
        v5_logits = prompt_forward(load(out), prompt)[0]
        rewrite_config_legacy(out)
        cfg = MixtralConfig.from_pretrained(str(out))
        assert cfg.rope_parameters["rope_theta"] == spec.rope_theta, cfg.rope_parameters
        assert cfg.rope_parameters["rope_type"] == "default", cfg.rope_parameters
        assert torch.equal(prompt_forward(load(out), prompt)[0], v5_logits)

    if spec.tokenizer:
        write_tokenizer(out, spec.vocab, spec.max_pos)

    # The reloaded model holds exactly the on-disk values upcast to f32.
    reloaded = load(out)
    dtype = DTYPES[spec.dtype]
    disk = {k: v.to(dtype).to(torch.float32) for k, v in published_state_dict(model, spec).items()}
    for k, v in published_state_dict(reloaded, spec).items():
        assert torch.equal(v, disk[k]), k
    if spec.tie:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()

    return compute_expected(out, spec, seed, prompt)


def dump_expected(out: Path, exp: dict) -> None:
    public = {k: v for k, v in exp.items() if not k.startswith("_")}
    with open(out / "expected.json", "w") as f:
        json.dump(public, f)
        f.write("\n")


def search_seed(specs: dict[str, Spec], start: int, root: Path) -> tuple[int, dict[str, dict]]:
    """Smallest seed >= start where every spec in `specs` (same seed) passes acceptable()."""
    for seed in range(start, start + MAX_SEED_TRIES):
        results, ok_all = {}, True
        for name, spec in specs.items():
            exp = write_fixture(spec, seed, root / name)
            ok, why = acceptable(spec, exp)
            print(f"  {name} seed {seed}: {'ok' if ok else 'rejected'} ({why})")
            results[name] = exp
            if not ok:
                ok_all = False
                break
        if ok_all:
            return seed, results
    raise SystemExit(f"no acceptable seed in [{start}, {start + MAX_SEED_TRIES})")


def finish(name: str, spec: Spec, exp: dict, out: Path) -> None:
    cross_check(out, spec, exp)
    dump_expected(out, exp)
    size = sum(f.stat().st_size for f in out.iterdir())
    used = sorted({e for layer in exp["router_ids"] for pos in layer for e in pos})
    print(f"{name}: seed {exp['seed']}, logits std {exp['_logits_std']:.2f}, "
          f"min margin {min(exp['greedy_margins']):.4f}, router gap {exp['_router_gap']:.2e}, "
          f"experts used {used}, {size / 1e6:.2f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default tests/fixtures)")
    ap.add_argument("--seed", type=int, default=None, help="start of the seed search")
    ap.add_argument("--only", choices=sorted(FIXTURES),
                    help="write only this fixture (base, bf16 and f16 share weights: any of them rewrites all three)")
    ap.add_argument("--custom", action="store_true", help="write ONE fixture with the dims below into --out")
    ap.add_argument("--hidden", type=int, default=72)
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=40)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=301)
    ap.add_argument("--sliding-window", type=int, default=None)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="on-disk dtype (--custom)")
    ap.add_argument("--shards", type=int, default=1, help="number of safetensors shards (--custom)")
    args = ap.parse_args()

    torch.set_grad_enabled(False)

    if args.custom:
        spec = Spec(hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    layers=args.layers, experts=args.experts, top_k=args.top_k, ffn=args.ffn,
                    vocab=args.vocab, sliding_window=args.sliding_window, tie=args.tie,
                    rope_theta=args.rope_theta, prompt_len=args.prompt_len, dtype=args.dtype,
                    shards=args.shards, max_pos=max(128, args.prompt_len + NEW_TOKENS))
        assert spec.max_pos >= spec.prompt_len + NEW_TOKENS
        # Build in a temp dir then move, so --out holds exactly one fixture.
        with tempfile.TemporaryDirectory() as tmp:
            seed, res = search_seed({"custom": spec}, 0 if args.seed is None else args.seed, Path(tmp))
            finish("custom", spec, res["custom"], Path(tmp) / "custom")
            if args.out.exists():
                shutil.rmtree(args.out)
            shutil.copytree(Path(tmp) / "custom", args.out)
        print(f"wrote {args.out}")
        return

    names = [args.only] if args.only else list(FIXTURES)
    # mixtral-bf16 / mixtral-f16 share mixtral-base's seed, so they are searched together.
    groups: list[dict[str, Spec]] = []
    if any(n == "mixtral-base" or n in SAME_WEIGHTS_AS_BASE for n in names):
        groups.append({n: FIXTURES[n] for n in ("mixtral-base", *SAME_WEIGHTS_AS_BASE)})
    groups += [{n: FIXTURES[n]} for n in names if n != "mixtral-base" and n not in SAME_WEIGHTS_AS_BASE]

    args.out.mkdir(parents=True, exist_ok=True)
    for group in groups:
        first = next(iter(group))
        start = args.seed if args.seed is not None else DEFAULT_SEEDS[first]
        seed, results = search_seed(group, start, args.out)
        for name, spec in group.items():
            finish(name, spec, results[name], args.out / name)


if __name__ == "__main__":
    main()
