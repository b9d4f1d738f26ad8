#!/usr/bin/env python3
"""Train tiny-kjv: a small real Mixtral-architecture MoE on the King James Bible.

This is the model moe-run embeds as its default. Everything is CPU-only and
deterministic for a given seed and thread count.

Setup (Debian/Ubuntu; the text is public domain, package `bible-kjv` in main):

    apt-get update && apt-get install -y bible-kjv
    pip install torch transformers==5.23.0 safetensors numpy tokenizers

Run (from the repository root; 24 minutes on a 2-core machine shared with builds):

    time python tests/train_tiny_kjv.py

Quick pipeline check / throughput measurement (writes into /tmp, not the repo):

    python tests/train_tiny_kjv.py --steps 30 --log-every 5 --eval-every 15 \
        --model-out /tmp/tkjv/model --fixture-out /tmp/tkjv/fixture
    python tests/train_tiny_kjv.py --bench --steps 40 --log-every 10 --eval-every 20  # no files

What it does:
  1. Text: `bible -f "Gen1:1-Rev22:21"` prints one verse per line as
     "Ge1:1 In the beginning ...". The "Book C:V " reference is stripped; each
     chapter becomes one document: its verses joined by "\n".
     Validation split: a seeded random 5% of the 1189 chapters (--split-seed,
     default 0; the split does not depend on --seed). Everything else trains.
  2. Tokenizer: byte-level BPE (tokenizers library), vocab 4096, trained on the
     training chapters only. Specials <unk>=0 <s>=1 </s>=2; the post-processor
     prepends <s>. Every document is encoded as <s> text </s> and the documents
     are concatenated into one token stream per split.
  3. Model: MixtralForCausalLM (transformers), trained from HF's default init
     with AdamW (f32 master weights, bf16 autocast for the training
     forward/backward), linear warmup + cosine decay, grad clip 1.0, on windows of
     --ctx tokens cut from the training stream (each epoch: a fresh random
     offset, non-overlapping windows, shuffled). Loss = next-token CE +
     router_aux_loss_coef * HF's Mixtral load-balancing loss
     (output_router_logits=True).
  4. Writes the checkpoint in standard HF layout (published per-expert tensor
     names, verified) plus tokenizer files and TRAINING.md to --model-out
     (default engine/assets/tiny-kjv), and the parity fixture expected.json +
     heldout.txt to --fixture-out (default tests/fixtures/tiny-kjv). The
     expected outputs are computed from the checkpoint reloaded from disk with
     dtype=float32, exactly as tests/make_fixtures.py does (whose helpers this
     script imports).
"""

from __future__ import annotations

import os
import time

T_START = time.time()
# On a shared 2-core machine (parallel builds), OpenMP's default spin-waiting makes a 2-thread
# torch run 3-4x slower than 1 thread; passive waiting removes most of that. Must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (checkpoint writer/verifier, HF reference helpers)

REPO_ROOT = Path(__file__).resolve().parent.parent
BOS, EOS = 1, 2
FIXTURE_PROMPT = "And God said"
FIXTURE_NEW_TOKENS = 32
SAMPLE_PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd"]
N_VERSES, N_CHAPTERS = 31102, 1189

# "Ge1:1 In the beginning ..." / "1Chr3:4 ..." / "SSol2:1 ..."
VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def load_kjv() -> list[tuple[str, str]]:
    """[(\"Ge 1\", chapter text)] for all 1189 chapters, verse references stripped."""
    if shutil.which("bible") is None:
        raise SystemExit("`bible` not found: apt-get update && apt-get install -y bible-kjv")
    raw = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    chapters: list[tuple[str, list[str]]] = []
    n = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = VERSE_RE.match(line)
        assert m, f"unexpected line: {line!r}"
        book, ch, _verse, text = m.groups()
        key = f"{book} {ch}"
        if not chapters or chapters[-1][0] != key:
            chapters.append((key, []))
        chapters[-1][1].append(" ".join(text.split()))  # normalise internal whitespace
        n += 1
    assert n == N_VERSES and len(chapters) == N_CHAPTERS, (n, len(chapters))
    return [(k, "\n".join(v)) for k, v in chapters]


def split_chapters(n: int, frac: float, seed: int) -> list[int]:
    """Sorted indices of the validation chapters (seeded random `frac` of them)."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(n), k=round(frac * n)))


def train_tokenizer(texts: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    assert [tok.token_to_id(s) for s in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return tok


def to_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """<s> doc </s> for every document, concatenated."""
    out: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        out.append(BOS)
        out.extend(enc.ids)
        out.append(EOS)
    return torch.tensor(out, dtype=torch.long)


def epoch_windows(stream: torch.Tensor, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """[N, ctx+1] non-overlapping windows from a random offset, in random order."""
    off = int(torch.randint(0, ctx + 1, (1,), generator=gen))
    n = (len(stream) - off) // (ctx + 1)
    w = stream[off: off + n * (ctx + 1)].view(n, ctx + 1)
    return w[torch.randperm(n, generator=gen)]


def eval_windows(stream: torch.Tensor, ctx: int) -> torch.Tensor:
    """[N, ctx+1] windows with stride ctx, so every token after the first is predicted once."""
    starts = range(0, len(stream) - ctx - 1 + 1, ctx)
    return torch.stack([stream[s: s + ctx + 1] for s in starts])


# --------------------------------------------------------------------------------------
# Model / training
# --------------------------------------------------------------------------------------

def make_config(a: argparse.Namespace) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=None,
        num_local_experts=a.experts,
        num_experts_per_tok=a.top_k,
        max_position_embeddings=a.ctx,
        sliding_window=None,
        tie_word_embeddings=a.tie,
        rope_parameters={"rope_type": "default", "rope_theta": float(a.rope_theta)},
        rms_norm_eps=1e-5,
        router_aux_loss_coef=a.aux_coef,
        router_jitter_noise=0.0,
        output_router_logits=False,  # training passes output_router_logits=True explicitly
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
    )


def param_counts(cfg: MixtralConfig) -> dict[str, int]:
    H, F_, E, V, L, k = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts,
                         cfg.vocab_size, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    hd = cfg.head_dim or H // cfg.num_attention_heads
    attn = H * cfg.num_attention_heads * hd * 2 + H * cfg.num_key_value_heads * hd * 2
    expert = 3 * H * F_
    per_layer_dense = attn + E * H + 2 * H  # attention + router + 2 norms
    emb = V * H
    head = 0 if cfg.tie_word_embeddings else V * H
    total = emb + head + H + L * (per_layer_dense + E * expert)
    active = emb + head + H + L * (per_layer_dense + k * expert)
    return {"total": total, "active_per_token": active, "experts_total": L * E * expert,
            "experts_active": L * k * expert, "attention": L * attn, "embedding": emb,
            "lm_head": head, "non_embedding_active": active - emb - head}


def lr_at(step: int, a: argparse.Namespace) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, windows: torch.Tensor, bs: int, want_load: bool = False):
    """Mean next-token CE over all windows; optionally per-layer top-k expert counts and
    router statistics."""
    model.eval()
    cfg = model.config
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    tot, n = 0.0, 0
    counts = torch.zeros(cfg.num_hidden_layers, E, dtype=torch.long)
    top1p = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    ent = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    for i in range(0, len(windows), bs):
        w = windows[i: i + bs]
        out = model(input_ids=w[:, :-1], use_cache=False, output_router_logits=want_load)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                               w[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        n += w[:, 1:].numel()
        if want_load:
            for layer, rl in enumerate(out.router_logits):
                p = torch.softmax(rl.float(), dim=-1)
                idx = torch.topk(p, k, dim=-1).indices
                counts[layer] += torch.bincount(idx.reshape(-1), minlength=E)
                top1p[layer] += p.max(dim=-1).values.double().sum()
                ent[layer] += -(p * torch.log(p.clamp_min(1e-12))).sum(-1).double().sum()
    model.train()
    res = {"loss": tot / n, "tokens": n}
    if want_load:
        res.update(counts=counts, mean_top1_prob=(top1p / n).tolist(), mean_entropy=(ent / n).tolist())
    return res


def train(a: argparse.Namespace, cfg: MixtralConfig, train_stream: torch.Tensor,
          val_win: torch.Tensor, train_eval_win: torch.Tensor) -> tuple[MixtralForCausalLM, list[dict]]:
    torch.manual_seed(a.seed)
    model = MixtralForCausalLM(cfg).to(torch.float32)
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation(a.experts_impl)
    model.train()

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(a.seed)
    windows, wi, epoch = epoch_windows(train_stream, a.ctx, gen), 0, 0
    history: list[dict] = []
    run_ce = run_aux = 0.0
    run_n = 0
    t0 = time.time()
    tokens_per_step = a.batch * a.ctx
    val_sub = val_win[: a.eval_windows]
    train_sub = train_eval_win[: a.eval_windows]
    for step in range(a.steps):
        if wi + a.batch > len(windows):
            windows, wi, epoch = epoch_windows(train_stream, a.ctx, gen), 0, epoch + 1
        w = windows[wi: wi + a.batch]
        wi += a.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast):
            out = model(input_ids=w[:, :-1], use_cache=False, output_router_logits=True)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), w[:, 1:].reshape(-1))
        loss = ce + a.aux_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        run_ce += ce.item()
        run_aux += out.aux_loss.item()
        run_n += 1
        last = step + 1 == a.steps
        if (step + 1) % a.log_every == 0 or last:
            el = time.time() - t0
            log(f"step {step + 1}/{a.steps} ep {epoch} lr {lr_at(step, a):.2e} "
                f"train_ce {run_ce / run_n:.4f} aux {run_aux / run_n:.3f} gnorm {gnorm:.2f} "
                f"{(step + 1) * tokens_per_step / el:.0f} tok/s")
            rec = {"step": step + 1, "epoch": epoch, "train_ce_running": run_ce / run_n,
                   "aux": run_aux / run_n, "elapsed_s": el}
            run_ce = run_aux = 0.0
            run_n = 0
            if (step + 1) % a.eval_every == 0 and not last:
                v = evaluate(model, val_sub, a.eval_batch)["loss"]
                t = evaluate(model, train_sub, a.eval_batch)["loss"]
                rec.update(val_loss_subset=v, train_loss_subset=t)
                log(f"  eval @ {step + 1}: train {t:.4f}  val {v:.4f} (ppl {math.exp(v):.1f}) "
                    f"[{len(val_sub)} windows each]")
            history.append(rec)
    train_time = time.time() - t0
    log(f"training done: {a.steps} steps, {a.steps * tokens_per_step} tokens "
        f"({a.steps * tokens_per_step / len(train_stream):.2f} epochs) in {train_time:.0f}s")
    model.eval()
    history.append({"train_time_s": train_time})
    return model, history


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------

def write_tokenizer_files(tok: Tokenizer, out: Path, ctx: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": ctx,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "transformers_version": transformers.__version__,
    }, indent=2) + "\n")


@torch.no_grad()
def greedy_n(model: MixtralForCausalLM, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """make_fixtures.greedy with n new tokens: HF generate (cached), EOS disabled,
    plus the top1 - top2 raw-logit margin at every step."""
    gc = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
        eos_token_id=None, pad_token_id=0, bos_token_id=BOS,
        output_logits=True, return_dict_in_generate=True,
    )
    model.generation_config.eos_token_id = None  # else generate() back-fills EOS=2
    ids = torch.tensor([prompt])
    res = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    new = res.sequences[0, len(prompt):].tolist()
    assert len(new) == n, new
    margins = []
    for step, lg in enumerate(res.logits):
        top2 = torch.topk(lg[0].float(), 2)
        assert top2.indices[0].item() == new[step], (step, top2.indices.tolist(), new[step])
        margins.append((top2.values[0] - top2.values[1]).item())
    return new, margins


@torch.no_grad()
def greedy_no_cache(model: MixtralForCausalLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(torch.argmax(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1])))
    return seq[len(prompt):]


@torch.no_grad()
def heldout_nll(model: MixtralForCausalLM, ids: list[int]) -> float:
    """Mean next-token NLL over ids[1:] given the prefix, one forward pass."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()


def pick_heldout(chapters: list[tuple[str, str]], val_idx: list[int], tok: Tokenizer,
                 max_tokens: int) -> tuple[str, str]:
    """The longest run of whole verses from the start of the first validation chapter whose
    encoding (with <s>) fits in max_tokens."""
    name, text = chapters[val_idx[0]]
    verses = text.split("\n")
    best = verses[0]
    for i in range(1, len(verses) + 1):
        cand = "\n".join(verses[:i])
        if len(tok.encode(cand).ids) > max_tokens:
            break
        best = cand
    return name, best


def write_fixture(a: argparse.Namespace, spec: mf.Spec, tok: Tokenizer, heldout: str,
                  out: Path) -> dict:
    model_dir = Path(a.model_out)
    model = mf.load(model_dir)  # eager attention + eager experts, dtype float32
    prompt = tok.encode(FIXTURE_PROMPT).ids
    assert prompt[0] == BOS
    logits, router_ids, router_w, router_gap = mf.prompt_forward(model, prompt)
    greedy_ids, margins = greedy_n(model, prompt, FIXTURE_NEW_TOKENS)
    held_ids = tok.encode(heldout).ids
    assert len(held_ids) <= a.ctx, len(held_ids)
    nll = heldout_nll(model, held_ids)

    # Cross-checks: HF's default kernels (sdpa + grouped_mm) and a cache-free greedy loop.
    fast = mf.load(model_dir, attn="sdpa", experts="grouped_mm")
    lg2, rid2, _, _ = mf.prompt_forward(fast, prompt)
    assert (lg2 - logits).abs().max().item() < 1e-4, (lg2 - logits).abs().max().item()
    assert rid2 == router_ids
    assert greedy_n(fast, prompt, FIXTURE_NEW_TOKENS)[0] == greedy_ids
    assert greedy_no_cache(mf.load(model_dir), prompt, FIXTURE_NEW_TOKENS) == greedy_ids
    assert abs(heldout_nll(fast, held_ids) - nll) < 1e-4

    exp = {
        "prompt": FIXTURE_PROMPT,
        "prompt_ids": prompt,
        "logits": logits.tolist(),
        "greedy_ids": greedy_ids,
        "greedy_margins": margins,
        "router_ids": router_ids,
        "router_weights": router_w,
        "dtype_on_disk": spec.dtype,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": a.seed,
        "heldout_nll": nll,
        "heldout_tokens": len(held_ids),
    }
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "heldout.txt").write_text(heldout)  # no trailing newline: tokenize the exact bytes
    with open(out / "expected.json", "w") as f:
        json.dump(exp, f)
        f.write("\n")
    exp["_router_gap"] = router_gap
    exp["_greedy_text"] = tok.decode(greedy_ids)
    exp["_heldout_ids"] = held_ids
    return exp


@torch.no_grad()
def samples(model_dir: Path, tok: Tokenizer, seed: int, n_new: int = 48) -> list[dict]:
    model = mf.load(model_dir, attn="sdpa", experts="grouped_mm")
    model.generation_config.eos_token_id = EOS
    res = []
    for p in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(p).ids])
        am = torch.ones_like(ids)
        g = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=n_new,
                           eos_token_id=EOS, pad_token_id=0)
        torch.manual_seed(seed)
        s = model.generate(ids, attention_mask=am, do_sample=True, temperature=0.8, top_p=0.95,
                           top_k=0, max_new_tokens=n_new, eos_token_id=EOS, pad_token_id=0)
        res.append({"prompt": p,
                    "greedy": tok.decode(g[0].tolist(), skip_special_tokens=True),
                    "sampled": tok.decode(s[0].tolist(), skip_special_tokens=True)})
    return res


def fmt_load_table(counts: torch.Tensor, top1: list[float], ent: list[float]) -> str:
    L, E = counts.shape
    head = "| layer | " + " | ".join(f"e{e}" for e in range(E)) + " | max/min | mean top-1 p | router entropy |"
    sep = "|" + "---|" * (E + 4)
    rows = [head, sep]
    for l in range(L):
        c = counts[l].tolist()
        tot = sum(c)
        cells = " | ".join(f"{x} ({100 * x / tot:.1f}%)" for x in c)
        mm = f"{max(c) / max(1, min(c)):.2f}"
        rows.append(f"| {l} | {cells} | {mm} | {top1[l]:.3f} | {ent[l]:.3f} |")
    return "\n".join(rows)


def write_training_md(path: Path, a: argparse.Namespace, cfg: MixtralConfig, pc: dict, info: dict) -> None:
    cmd = "time python tests/train_tiny_kjv.py" + ("" if not info["argv"] else " " + shlex.join(info["argv"]))
    running_aux = [h for h in info["history"] if "aux" in h][-1]["aux"]
    load = fmt_load_table(info["load"]["counts"], info["load"]["mean_top1_prob"], info["load"]["mean_entropy"])
    fx = info["fixture"]
    hist = [h for h in info["history"] if "val_loss_subset" in h]
    curve = "\n".join(f"| {h['step']} | {h['elapsed_s']:.0f} | {h['train_ce_running']:.3f} | "
                      f"{h['train_loss_subset']:.3f} | {h['val_loss_subset']:.3f} |" for h in hist)
    samp = "\n\n".join(
        f"**{s['prompt']}**\n\n- greedy: `{json.dumps(s['greedy'])[1:-1]}`\n"
        f"- sampled (T=0.8, top-p 0.95, torch seed {a.seed}): `{json.dumps(s['sampled'])[1:-1]}`"
        for s in info["samples"])
    md = f"""# tiny-kjv

A small Mixtral-architecture sparse MoE ({pc['total'] / 1e6:.2f} M parameters, 8 experts, top-2)
trained from scratch on the King James Bible (public domain; Debian package `bible-kjv`).
It is moe-run's built-in default model. Made by `tests/train_tiny_kjv.py`; the parity
fixture for it is `tests/fixtures/tiny-kjv/expected.json`.

## Command

```
apt-get update && apt-get install -y bible-kjv
{cmd}
```

Environment: torch {torch.__version__}, transformers {transformers.__version__}, tokenizers
{info['tokenizers_version']}, CPU only, `torch.set_num_threads({a.threads})`
({info['cpu']}), `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}`. The run is deterministic
for a given seed and thread count on a given CPU.

Wall time of the whole script (data, tokenizer, training, evaluation, writing and checking
the files, fixture, samples) on this machine: **{info['wall_s'] / 60:.1f} min** (training loop alone
{info['train_time_s'] / 60:.1f} min, {info['tok_per_s']:.0f} training tokens/s). The 2-core machine was
shared with concurrent Rust builds while this ran.

## Data

`bible -f "Gen1:1-Rev22:21"` prints one verse per line ("Ge1:1 In the beginning ...").
The "Book C:V " reference is stripped; each of the 1189 chapters is one document, its
verses joined by `\\n`, encoded as `<s> text </s>`; documents are concatenated into one
token stream per split.

- Validation split: a seeded random 5% of chapters ({info['n_val_chapters']} chapters,
  `random.Random({a.split_seed}).sample`, independent of the training seed), e.g.
  {', '.join(info['val_names'][:8])}, ...
- Train: {info['train_tokens']:,} tokens; validation: {info['val_tokens']:,} tokens.

## Tokenizer

Byte-level BPE, vocab {a.vocab}, trained with the `tokenizers` library on the training chapters
only. `ByteLevel(add_prefix_space=False)` pre-tokenizer (default GPT-2 regex) and decoder,
BPE model with `unk_token` `<unk>` (never produced: the 256 byte symbols are all in the vocab),
specials `<unk>`=0 `<s>`=1 `</s>`=2, `TemplateProcessing` post-processor `<s> $A`
(prepends BOS). `tokenizer_config.json`: `add_bos_token: true`, `add_eos_token: false`,
`model_max_length: {a.ctx}`. `generation_config.json`: `bos_token_id 1`, `eos_token_id 2`.
Newlines are ordinary byte tokens (`Ċ`); a chapter ends with `</s>`.

## Model

| | |
|---|---|
| architecture | `MixtralForCausalLM` (model_type `mixtral`) |
| hidden_size | {cfg.hidden_size} |
| num_hidden_layers | {cfg.num_hidden_layers} |
| attention heads / kv heads | {cfg.num_attention_heads} / {cfg.num_key_value_heads} (head_dim {cfg.hidden_size // cfg.num_attention_heads}) |
| experts (num_local_experts) / top-k | {cfg.num_local_experts} / {cfg.num_experts_per_tok} |
| expert intermediate_size | {cfg.intermediate_size} |
| vocab_size | {cfg.vocab_size} |
| max_position_embeddings (= training context) | {cfg.max_position_embeddings} |
| rope | default, theta {a.rope_theta:g} (`rope_parameters` in config.json) |
| rms_norm_eps | {cfg.rms_norm_eps} |
| sliding_window | none |
| tie_word_embeddings | {str(cfg.tie_word_embeddings).lower()} |
| dtype on disk | {a.dtype} (single `model.safetensors`, published per-expert names `model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`, router `block_sparse_moe.gate.weight`) |

Parameters: **{pc['total']:,} total**, **{pc['active_per_token']:,} active per token**
(embedding {pc['embedding']:,}; lm_head {pc['lm_head']:,}; attention {pc['attention']:,};
experts {pc['experts_total']:,} total / {pc['experts_active']:,} active; the rest is routers and norms).
Non-embedding active parameters: {pc['non_embedding_active']:,}.

## Training

| hyperparameter | value |
|---|---|
| seed | {a.seed} |
| steps | {a.steps} |
| batch | {a.batch} x {a.ctx} tokens = {a.batch * a.ctx} tokens/step |
| tokens seen | {a.steps * a.batch * a.ctx:,} ({info['epochs']:.2f} epochs) |
| optimizer | AdamW, betas (0.9, 0.95), eps 1e-8, weight decay {a.weight_decay} (matrices and embeddings; not norms) |
| learning rate | peak {a.lr:g}, linear warmup {a.warmup} steps, cosine to {a.min_lr_frac:g} x peak |
| grad clip | {a.clip} |
| init | HF default (normal, std 0.02) |
| router aux loss | HF Mixtral `load_balancing_loss_func`, `router_aux_loss_coef` {a.aux_coef} (value 2.0 = perfectly balanced, top-2) |
| router jitter / dropout | none |
| precision | float32 master weights and optimizer state; {'bf16 autocast' if a.autocast else 'float32'} for the training forward/backward; all evaluation in float32 |
| HF kernels while training | attention `sdpa`, experts `{a.experts_impl}` |

Loss curve (train running = mean training CE of the preceding {a.log_every} steps;
subset evals on the first {a.eval_windows} windows of each split):

| step | s | train (running) | train (subset) | val (subset) |
|---|---|---|---|---|
{curve}

## Result

Measured with the final weights on non-overlapping {a.ctx}-token windows, every token
predicted once:

- **validation loss {info['val_loss']:.4f}** (perplexity {math.exp(info['val_loss']):.2f}) over {info['val_eval_tokens']:,} tokens
- **train loss {info['train_loss']:.4f}** (perplexity {math.exp(info['train_loss']):.2f}) over {info['train_eval_tokens']:,} tokens
  (a fixed sample of {len(info['train_eval_idx'])} training windows)
- final running training CE (last {a.log_every} steps): {info['final_running']:.4f}
- the saved {a.dtype} checkpoint reloaded by HF in f32: validation loss {info['val_loss_saved']:.4f}

Per-layer expert load over the validation set (top-{cfg.num_experts_per_tok} assignments, each token counts
{cfg.num_experts_per_tok}x). "mean top-1 p" is the mean largest router probability (uniform would be
{1 / cfg.num_local_experts:.3f}); "router entropy" is the mean entropy of the router softmax in nats
(uniform would be {math.log(cfg.num_local_experts):.3f}):

{load}

HF's `load_balancing_loss_func` sums expert counts and router probabilities over all layers
before multiplying them, so it balances each expert index in total across layers rather than
within each layer: per-layer loads can stay skewed (as above) while the aux loss sits near its
balanced value 2.0 (last {a.log_every} training steps: {running_aux:.3f}).

## Samples (HF generate on the saved checkpoint, f32, max 48 new tokens, stops at `</s>`)

{samp}

## Parity fixture

`tests/fixtures/tiny-kjv/expected.json` (same schema as the other fixtures in `tests/fixtures`,
computed by HF from the files in this directory loaded with `dtype=float32`, eager kernels,
cross-checked against sdpa + grouped_mm and a cache-free greedy loop):

- prompt `{FIXTURE_PROMPT}` -> prompt_ids {fx['prompt_ids']} (with `<s>`)
- {FIXTURE_NEW_TOKENS} greedy tokens (KV cache, EOS disabled): `{json.dumps(fx['_greedy_text'])[1:-1]}`;
  smallest top1-top2 logit margin {min(fx['greedy_margins']):.4f}; smallest router k-th/(k+1)-th
  probability gap over the prompt {fx['_router_gap']:.2e}
- `heldout.txt`: {len(info['heldout'])} bytes, the first verses of validation chapter
  {info['heldout_name']} (no trailing newline; tokenized with `<s>`: {fx['heldout_tokens']} tokens, fits
  in one {a.ctx}-token window). `heldout_nll` = {fx['heldout_nll']:.5f} is HF's mean NLL over the
  {fx['heldout_tokens'] - 1} predicted tokens (positions 1..T-1) of one f32 forward; `heldout_tokens`
  counts the `<s>`.
"""
    path.write_text(md)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=192)
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=None, help="default: 5%% of steps")
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "grouped_mm"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="on-disk dtype; auto = float32 if the file fits in --max-mb, else bfloat16")
    ap.add_argument("--max-mb", type=float, default=16.0)
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the training forward/backward (f32 master weights); "
                         "about 2x faster on CPUs with avx512_bf16. Evaluation is always f32.")
    ap.add_argument("--bench", action="store_true", help="train, evaluate, print; write nothing")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--model-out", default=str(REPO_ROOT / "engine" / "assets" / "tiny-kjv"))
    ap.add_argument("--fixture-out", default=str(REPO_ROOT / "tests" / "fixtures" / "tiny-kjv"))
    a = ap.parse_args()
    if a.warmup is None:
        a.warmup = max(1, round(0.05 * a.steps))
    assert a.eval_every % a.log_every == 0

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    random.seed(a.seed)

    # ---- data + tokenizer
    chapters = load_kjv()
    val_idx = split_chapters(len(chapters), a.val_frac, a.split_seed)
    val_set = set(val_idx)
    train_texts = [t for i, (_, t) in enumerate(chapters) if i not in val_set]
    val_texts = [chapters[i][1] for i in val_idx]
    log(f"KJV: {len(chapters)} chapters, {sum(len(t) for _, t in chapters):,} chars; "
        f"val = {len(val_idx)} chapters")
    tok = train_tokenizer(train_texts, a.vocab)
    train_stream, val_stream = to_stream(tok, train_texts), to_stream(tok, val_texts)
    log(f"tokenizer: vocab {tok.get_vocab_size()}; train {len(train_stream):,} tokens, "
        f"val {len(val_stream):,} tokens ({sum(map(len, train_texts)) / len(train_stream):.2f} chars/token)")

    val_win = eval_windows(val_stream, a.ctx)
    all_train_win = eval_windows(train_stream, a.ctx)
    g = torch.Generator().manual_seed(a.split_seed)
    train_eval_idx = torch.randperm(len(all_train_win), generator=g)[: len(val_win)].sort().values
    train_eval_win = all_train_win[train_eval_idx]

    # ---- model
    cfg = make_config(a)
    pc = param_counts(cfg)
    dtype = a.dtype
    if dtype == "auto":
        dtype = "float32" if pc["total"] * 4 / 1e6 <= a.max_mb else "bfloat16"
    a.dtype = dtype
    log(f"params: total {pc['total']:,}, active/token {pc['active_per_token']:,} "
        f"(non-embedding active {pc['non_embedding_active']:,}); on disk {dtype} "
        f"~{pc['total'] * (4 if dtype == 'float32' else 2) / 1e6:.1f} MB")

    model, history = train(a, cfg, train_stream, val_win, train_eval_win)
    real = sum(p.numel() for p in model.parameters())
    assert real == pc["total"], (real, pc["total"])

    final_val = evaluate(model, val_win, a.eval_batch, want_load=True)
    final_train = evaluate(model, train_eval_win, a.eval_batch)
    log(f"FINAL  train loss {final_train['loss']:.4f} (ppl {math.exp(final_train['loss']):.2f})  "
        f"val loss {final_val['loss']:.4f} (ppl {math.exp(final_val['loss']):.2f})")
    print("per-layer expert load over the validation set (top-k counts):")
    print(fmt_load_table(final_val["counts"], final_val["mean_top1_prob"], final_val["mean_entropy"]),
          flush=True)
    if a.bench:
        return

    # ---- write checkpoint (save_pretrained + published-name verification from make_fixtures)
    model_dir = Path(a.model_out)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    spec = mf.Spec(hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, layers=a.layers,
                   experts=a.experts, top_k=a.top_k, ffn=a.ffn, vocab=a.vocab, tie=a.tie,
                   rope_theta=a.rope_theta, max_pos=a.ctx, dtype=dtype)
    mf.save_checkpoint(model, spec, model_dir)
    write_tokenizer_files(tok, model_dir, a.ctx)
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    log(f"wrote {model_dir} (model.safetensors {size_mb:.2f} MB)")

    # Reload through the standard loaders and check that nothing changed on the way.
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    for s in SAMPLE_PROMPTS + [val_texts[0][:300]]:
        assert hf_tok(s)["input_ids"] == tok.encode(s).ids
        assert hf_tok.decode(tok.encode(s).ids, skip_special_tokens=True) == s
    reloaded = mf.load(model_dir)
    disk = {k: v.to(mf.DTYPES[dtype]).to(torch.float32)
            for k, v in mf.published_state_dict(model, spec).items()}
    for k, v in mf.published_state_dict(reloaded, spec).items():
        assert torch.equal(v, disk[k]), k
    saved_val = evaluate(reloaded, val_win, a.eval_batch)["loss"] if dtype != "float32" else final_val["loss"]

    # ---- fixture
    held_name, heldout = pick_heldout(chapters, val_idx, tok, a.ctx)
    fx = write_fixture(a, spec, tok, heldout, Path(a.fixture_out))
    log(f"fixture: prompt {fx['prompt_ids']}, greedy {fx['greedy_ids']} = {fx['_greedy_text']!r}")
    log(f"fixture: min greedy margin {min(fx['greedy_margins']):.4f}, router gap {fx['_router_gap']:.2e}, "
        f"heldout {len(heldout)} bytes / {fx['heldout_tokens']} tokens, nll {fx['heldout_nll']:.4f}")
    if min(fx["greedy_margins"]) <= mf.MIN_MARGIN:
        log("WARNING: a greedy step is a near-tie (margin <= 1e-3)")
    if fx["_router_gap"] <= mf.MIN_ROUTER_GAP:
        log("WARNING: a router top-k choice on the prompt is a near-tie (gap <= 1e-4)")

    smp = samples(model_dir, tok, a.seed)
    for s in smp:
        print(json.dumps(s), flush=True)

    train_time = history[-1]["train_time_s"]
    running = [h for h in history if "train_ce_running" in h]
    info = {
        "argv": sys.argv[1:], "tokenizers_version": __import__("tokenizers").__version__,
        "cpu": f"{os.cpu_count()} logical CPUs",
        "history": history, "train_time_s": train_time,
        "tok_per_s": a.steps * a.batch * a.ctx / train_time,
        "n_val_chapters": len(val_idx), "val_names": [chapters[i][0] for i in val_idx],
        "train_tokens": len(train_stream), "val_tokens": len(val_stream),
        "epochs": a.steps * a.batch * a.ctx / len(train_stream),
        "val_loss": final_val["loss"], "val_eval_tokens": final_val["tokens"],
        "train_loss": final_train["loss"], "train_eval_tokens": final_train["tokens"],
        "train_eval_idx": train_eval_idx.tolist(), "final_running": running[-1]["train_ce_running"],
        "val_loss_saved": saved_val, "load": final_val, "samples": smp, "fixture": fx,
        "heldout": heldout, "heldout_name": held_name,
    }
    info["wall_s"] = time.time() - T_START
    write_training_md(model_dir / "TRAINING.md", a, cfg, pc, info)
    log(f"done in {info['wall_s'] / 60:.1f} min; wrote {model_dir / 'TRAINING.md'} and {a.fixture_out}")


if __name__ == "__main__":
    main()
