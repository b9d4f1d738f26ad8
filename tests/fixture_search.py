"""Seed search and the write loop shared by the fixture generators of the newer families
(tests/make_llama4_fixtures.py, tests/make_gpt_oss_fixtures.py): a generator supplies how to
write one fixture, when its numbers are acceptable, how to cross-check it and a summary line."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from make_fixtures import MAX_SEED_TRIES, dump_expected


def search_seed(name: str, spec, start: int, root: Path, write: Callable, acceptable: Callable) -> dict:
    """The first seed from `start` whose fixture `acceptable` takes (written to root/name)."""
    for seed in range(start, start + MAX_SEED_TRIES):
        exp = write(spec, seed, root / name)
        ok, why = acceptable(spec, exp)
        print(f"  {name} seed {seed}: {'ok' if ok else 'rejected'} ({why})", flush=True)
        if ok:
            return exp
    raise SystemExit(f"no acceptable seed in [{start}, {start + MAX_SEED_TRIES})")


def generate(args, fixtures: dict, seeds: dict, custom_spec, write: Callable, acceptable: Callable,
             cross_check: Callable, summary: Callable) -> None:
    """`--custom`: one fixture of `custom_spec` into args.out itself; else every fixture (or
    `--only`) under args.out. Each is cross-checked, then its expected.json written."""

    def finish(name, spec, exp, out):
        cross_check(out, spec, exp)
        dump_expected(out, exp)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name}: seed {exp['seed']}, logits std {exp['_logits_std']:.2f}, min margin "
              f"{min(exp['greedy_margins']):.4f}, {summary(exp)}, {size / 1e6:.2f} MB", flush=True)

    if args.custom:
        with tempfile.TemporaryDirectory() as tmp:
            start = 0 if args.seed is None else args.seed
            exp = search_seed("custom", custom_spec, start, Path(tmp), write, acceptable)
            finish("custom", custom_spec, exp, Path(tmp) / "custom")
            if args.out.exists():
                shutil.rmtree(args.out)
            shutil.copytree(Path(tmp) / "custom", args.out)
        print(f"wrote {args.out}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name in [args.only] if args.only else list(fixtures):
        start = args.seed if args.seed is not None else seeds[name]
        exp = search_seed(name, fixtures[name], start, args.out, write, acceptable)
        finish(name, fixtures[name], exp, args.out / name)
