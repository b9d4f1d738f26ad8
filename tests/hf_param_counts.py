#!/usr/bin/env python3
"""Parameter counts as Hugging Face transformers sees them, for `moe-run analyze`'s parity test.

For every `configs/*.json`, every `tests/fixtures/*/config.json` and the real DeepSeek-V2-Lite,
DeepSeek-V3 and dots.llm1 configs in `../shared/reference-configs/` (unless configs/ holds an
identical copy; skipped if that folder is absent), build the model on the meta device (no memory, no
weights) and record:

  total_params   = sum of numel over model.parameters()   (tied weights once; buffers such as
                   DeepSeek-V3's e_score_correction_bias and RoPE inv_freq are not parameters)
  active_params  = total_params - sum over MoE layers of (E - k) x per_expert_params, where
                   per_expert_params = numel of the layer's experts module / E, read off the HF
                   module (v5 fuses experts into [E, 2F, H] + [E, H, F]; DBRX into [E*F, H] x 3)
                   and k is the layer's top-k (read off its router/MoE block)
  input_embedding_params = numel of get_input_embeddings().weight
  tied = whether the lm_head weight *is* the input embedding tensor

Config translations (the only ones; each is recorded in the entry's "note"):
  * model_type "hunyuan" (Hunyuan-A13B's release-time remote-code config) has no native class;
    it is rewritten to `hunyuan_v1_moe` fields: head_dim = attention_head_dim; the native class
    uses one `intermediate_size` for the routed experts and for the shared MLP, so we require
    moe_intermediate_size[i] == intermediate_size and num_shared_expert[i] == 1 for all layers
    (true for A13B) and keep moe_topk / num_experts as given.
  * model_type "llama4" (a multimodal checkpoint's config) is counted as its language model
    only: its `text_config` as `llama4_text` (Llama4ForCausalLM), as moe-run loads it.
  * `auto_map` (remote code) and `quantization_config` (DeepSeek-V3's FP8 block format, which
    does not change the parameter count) are dropped.

Usage: python tests/hf_param_counts.py [--out tests/fixtures/param_counts.json]
(pip install torch transformers==5.25.0; CPU only, runs in seconds.)
"""

import argparse
import glob
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Real configs of families the engine is being extended to (DeepSeek MLA, dots.llm1); their
# HF counts are recorded so the Rust test checks them as soon as the parser lands.
EXTRA_REFERENCE_CONFIGS = [
    "../shared/reference-configs/deepseek-v2-lite.json",
    "../shared/reference-configs/deepseek-v3.json",
    "../shared/reference-configs/dots-llm1-inst.PARTIAL.json",
]
TOP_K_ATTRS = ("top_k", "moe_top_k", "num_experts_per_tok", "topk")


def translate(raw: dict) -> tuple[dict, list[str]]:
    """Returns an HF-native config dict and the notes on what was changed."""
    d = dict(raw)
    notes = []
    for key in ("auto_map", "quantization_config"):
        if key in d:
            d.pop(key)
            notes.append(f"dropped {key}")
    if d.get("model_type") == "llama4":
        d = dict(d["text_config"])
        d["model_type"] = "llama4_text"
        notes.append("multimodal llama4: the language model only (text_config as llama4_text)")
    if d.get("model_type") == "hunyuan":
        layers = d["num_hidden_layers"]
        ffn = d["intermediate_size"]

        def per_layer(key, default):
            v = d.get(key, default)
            return v if isinstance(v, list) else [v] * layers

        moe_ffn = per_layer("moe_intermediate_size", ffn)
        shared = per_layer("num_shared_expert", 1)
        if any(f != ffn for f in moe_ffn) or any(s != 1 for s in shared):
            sys.exit("hunyuan config: the native class needs expert width == intermediate_size "
                     "and one shared expert per layer")
        d = {k: v for k, v in d.items() if not k.startswith(("vit", "anyres"))}
        d["model_type"] = "hunyuan_v1_moe"
        d["head_dim"] = d.pop("attention_head_dim", d.get("head_dim"))
        for key in ("moe_intermediate_size", "num_shared_expert", "use_mla", "use_cla",
                    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim"):
            d.pop(key, None)
        notes.append("remote-code model_type 'hunyuan' translated to hunyuan_v1_moe fields "
                     "(head_dim = attention_head_dim; expert and shared width = "
                     "intermediate_size, as moe_intermediate_size and num_shared_expert=1 say)")
    return d, notes


def top_k_near(model: torch.nn.Module, experts_name: str, fallback) -> int:
    """The top-k of the MoE block holding `experts_name`: an attribute of the block or of one
    of its direct children (the router), else the config value."""
    parent_name = experts_name.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_name)
    for mod in [parent, *parent.children()]:
        for attr in TOP_K_ATTRS:
            v = getattr(mod, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    if fallback is None:
        sys.exit(f"no top-k found near {experts_name}")
    return fallback


def count(config_path: str) -> dict:
    with open(os.path.join(ROOT, config_path)) as f:
        raw = json.load(f)
    d, notes = translate(raw)
    cfg = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())

    inactive = 0
    moe_layers = []
    cfg_k = getattr(cfg, "num_experts_per_tok", None)
    for name, mod in model.named_modules():
        if not type(mod).__name__.endswith("Experts"):
            continue
        n_exp = getattr(mod, "num_experts", None)
        if not isinstance(n_exp, int):
            sys.exit(f"{config_path}: {name} has no integer num_experts")
        numel = sum(p.numel() for p in mod.parameters())
        assert numel % n_exp == 0, (name, numel, n_exp)
        per_expert = numel // n_exp
        k = top_k_near(model, name, cfg_k if isinstance(cfg_k, int) else None)
        inactive += (n_exp - k) * per_expert
        moe_layers.append({"experts": n_exp, "top_k": k, "per_expert_params": per_expert})

    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    # Compact per-layer record: identical consecutive layers merged.
    merged = []
    for layer in moe_layers:
        if merged and all(merged[-1][k] == layer[k] for k in layer):
            merged[-1]["layers"] += 1
        else:
            merged.append({"layers": 1, **layer})
    entry = {
        "config": config_path,
        "model_type": raw.get("model_type"),
        "hf_class": type(model).__name__,
        "total_params": total,
        "active_params": total - inactive,
        "input_embedding_params": emb.numel(),
        "tied_word_embeddings": tied,
        "moe_layers": merged,
    }
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/param_counts.json"))
    args = ap.parse_args()
    paths = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs/*.json")))
    paths += sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests/fixtures/*/config.json")))
    # Reference configs not (yet) copied into configs/ verbatim.
    in_configs = {open(os.path.join(ROOT, p), "rb").read() for p in paths if p.startswith("configs/")}
    paths += [p for p in EXTRA_REFERENCE_CONFIGS
              if os.path.exists(os.path.join(ROOT, p))
              and open(os.path.join(ROOT, p), "rb").read() not in in_configs]
    entries = []
    for p in paths:
        e = count(p)
        print(f"{p:60} {e['hf_class']:28} total {e['total_params']:>16,} active {e['active_params']:>16,}")
        entries.append(e)
    doc = {
        "generated_by": "tests/hf_param_counts.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "definition": "total = sum(p.numel() for p in model.parameters()) on the meta device "
                      "(tied once, buffers excluded); active = total - sum over MoE layers of "
                      "(E - top_k) * per_expert_params",
        "models": entries,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(args.out, ROOT)} ({len(entries)} models)")


if __name__ == "__main__":
    main()
