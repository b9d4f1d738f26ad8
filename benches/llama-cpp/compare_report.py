#!/usr/bin/env python3
"""Aggregate one compare.sh run directory into OUT.json and OUT.txt (written to temp names,
then renamed). Standard library only.

  compare_report.py RUN_DIR OUT_BASE
"""
import json
import os
import re
import statistics
import sys
from pathlib import Path

PREC_LABEL = {
    "f32": ("f32", "f32"),
    "bf16": ("bf16", "bf16"),
    "int8": ("int8", "Q8_0"),
    "int4": ("int4:32", "Q4_0"),
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RUN_RE = re.compile(r"^r(\d+)-(.+)-(f32|bf16|int8|int4)-(llama-prefill|llama-decode|moe-run)\.json$")


def read_env(run: Path) -> dict:
    env = {}
    for line in (run / "env.txt").read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            env[k] = v
    return env


def llama_ts(path: Path) -> tuple[float, dict]:
    rows = json.loads(path.read_text())
    assert len(rows) == 1, f"{path}: expected one llama-bench row"
    row = rows[0]
    return float(row["avg_ts"]), row


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def main() -> None:
    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    env = read_env(run)
    commands = []
    for line in (run / "commands.tsv").read_text().splitlines():
        kind, f, cmd = line.split("\t", 2)
        commands.append({"kind": kind, "file": os.path.basename(f), "command": cmd})

    pairs: dict[tuple[str, str], dict] = {}
    llama_meta = {}
    for f in sorted(run.iterdir()):
        m = RUN_RE.match(f.name)
        if not m:
            continue
        rnd, model, prec, kind = int(m[1]), m[2], m[3], m[4]
        e = pairs.setdefault((model, prec), {
            "model": model, "precision": prec,
            "moe_run_format": PREC_LABEL[prec][0], "llama_cpp_format": PREC_LABEL[prec][1],
            "moe_run": {"prefill_tok_s": [], "decode_tok_s": [], "rounds": []},
            "llama_cpp": {"prefill_tok_s": [], "decode_tok_s": [], "rounds_prefill": [], "rounds_decode": []},
        })
        load = {}
        lf = f.with_name(f.name + ".load.json")
        if lf.exists():
            load = json.loads(lf.read_text())
        other = load.get("other_cpu_frac")
        if kind == "moe-run":
            e["moe_run"].setdefault("other_cpu_frac", []).append(other)
            e["moe_run"].setdefault("wall_s", []).append(load.get("wall_s"))
            j = json.loads(f.read_text())
            e["moe_run"]["prefill_tok_s"].append(j["prefill"]["tokens_per_s"]["median"])
            e["moe_run"]["decode_tok_s"].append(j["decode"]["tokens_per_s"]["median"])
            e["moe_run"]["rounds"].append(rnd)
            e["moe_run"]["dtype"] = j.get("env", {}).get("dtype")
            e["moe_run"]["weights"] = j.get("model", {}).get("weights")
            e["moe_run"]["prompt_len"] = j.get("prompt_len")
            e["moe_run"]["gen"] = j.get("gen")
            e["moe_run"]["cpu_threads"] = j.get("env", {}).get("cpu_threads")
        else:
            ts, row = llama_ts(f)
            which = "prefill" if kind == "llama-prefill" else "decode"
            e["llama_cpp"].setdefault(f"{which}_other_cpu_frac", []).append(other)
            e["llama_cpp"].setdefault(f"{which}_wall_s", []).append(load.get("wall_s"))
            e["llama_cpp"][f"{which}_tok_s"].append(ts)
            e["llama_cpp"][f"rounds_{which}"].append(rnd)
            e["llama_cpp"]["model_type"] = row.get("model_type")
            e["llama_cpp"]["model_size_bytes"] = row.get("model_size")
            e["llama_cpp"]["type_k"] = row.get("type_k")
            e["llama_cpp"]["type_v"] = row.get("type_v")
            e["llama_cpp"]["flash_attn"] = row.get("flash_attn")
            e["llama_cpp"]["n_threads"] = row.get("n_threads")
            e["llama_cpp"][f"{which}_shape"] = {k: row.get(k) for k in ("n_prompt", "n_gen", "n_depth")}
            for k in ("build_commit", "build_number", "cpu_info", "backends"):
                llama_meta[k] = row.get(k)

    # greedy-token agreement (f32)
    greedy = {}
    for f in sorted(run.glob("greedy-*-moe-run.json")):
        model = f.name[len("greedy-"):-len("-moe-run.json")]
        lf = run / f"greedy-{model}-llama.json"
        if not lf.exists():
            continue
        a = json.loads(f.read_text())
        b = json.loads(lf.read_text())
        ga, gb = a["generated_ids"], b["generated_ids"]
        n = min(len(ga), len(gb))
        equal = sum(1 for x, y in zip(ga, gb) if x == y)
        prefix = next((i for i in range(n) if ga[i] != gb[i]), n)
        greedy[model] = {
            "precision": "f32",
            "prompt_ids": a["prompt_ids"],
            "prompt_ids_llama": b["prompt_ids"],
            "n": n,
            "equal_positions": equal,
            "equal_prefix": prefix,
            "moe_run_ids": ga,
            "llama_cpp_ids": gb,
            "llama_cpp_kv_cache": "f32",
        }

    # test-backend-ops lines
    backend_ops = {}
    for name in ("builtin", "shapes"):
        f = run / f"backend-ops-{name}.txt"
        if f.exists():
            lines = [ANSI.sub("", l).strip() for l in f.read_text().splitlines() if "MUL_MAT_ID" in l and ("us/run" in l or "runs" in l or "not supported" in l)]
            backend_ops[name] = {"lines": lines, "tail": [ANSI.sub("", l) for l in f.read_text().splitlines()[-3:]]}

    # samples during which other processes used > 10% of the machine
    noisy = []
    for (model, prec), e in pairs.items():
        for side, key, what in (("moe_run", "other_cpu_frac", "bench (prefill + decode)"),
                                ("llama_cpp", "prefill_other_cpu_frac", "prefill"),
                                ("llama_cpp", "decode_other_cpu_frac", "decode")):
            for i, x in enumerate(e[side].get(key, [])):
                if x is not None and x > 0.10:
                    rnd = e[side]["rounds"][i] if side == "moe_run" else e[side]["rounds_" + what][i]
                    noisy.append(f"{model} {prec} {side} {what} round {rnd}: other processes {x:.0%}")

    rows = []
    for (model, prec), e in pairs.items():
        info = run / f"gguf-{model}-{prec}.info.json"
        if info.exists():
            gi = json.loads(info.read_text())
            e["llama_cpp"]["gguf"] = os.path.basename(gi["file"])
            e["llama_cpp"]["gguf_bytes"] = gi["bytes"]
            e["llama_cpp"]["gguf_tensor_types"] = gi["tensor_types"]
        mr, lc = e["moe_run"], e["llama_cpp"]
        for side in (mr, lc):
            side["prefill_median"] = median(side["prefill_tok_s"])
            side["decode_median"] = median(side["decode_tok_s"])
        e["ratio_decode_moe_over_llama"] = (mr["decode_median"] / lc["decode_median"]) if mr["decode_median"] and lc["decode_median"] else None
        e["ratio_prefill_moe_over_llama"] = (mr["prefill_median"] / lc["prefill_median"]) if mr["prefill_median"] and lc["prefill_median"] else None
        rows.append(e)
    order = {"tiny-kjv": 0, "random-mixtral": 1}
    porder = {"f32": 0, "bf16": 1, "int8": 2, "int4": 3}
    rows.sort(key=lambda e: (order.get(e["model"], 9), e["model"], porder[e["precision"]]))

    report = {
        "what": "moe-run vs llama.cpp on the CPU, same checkpoints, interleaved rounds (benches/llama-cpp/compare.sh)",
        "machine": {
            "cpu": env.get("lscpu_model_name"),
            "nproc": int(env.get("nproc", 0)),
            "simd_flags": env.get("cpu_flags_simd", "").split(),
            "kernel": env.get("kernel"),
            "llama_bench_cpu_info": llama_meta.get("cpu_info"),
        },
        "threads": int(env.get("threads", 0)),
        "rounds": int(env.get("rounds", 0)),
        "date_utc": env.get("date_utc"),
        "moe_run": {
            "commit": env.get("moe_run_commit"),
            "repo_head_at_run": env.get("repo_head"),
            "binary": env.get("moe_run"),
            "version": env.get("moe_run_version"),
            "threads_flag_passed": env.get("moe_run_threads_flag") == "yes",
            "quant_dtype_arg": env.get("quant_dtype"),
        },
        "llama_cpp": {
            "commit": env.get("llama_cpp_commit"),
            "llama_cpp_python_sdist": env.get("llama_cpp_python_version"),
            "sdist_sha256": env.get("sdist_sha256"),
            "build_commit_reported": llama_meta.get("build_commit"),
            "build_number_reported": llama_meta.get("build_number"),
            "backends": llama_meta.get("backends"),
            "cmake_flags": env.get("cmake_flags"),
            "compiler": env.get("compiler"),
        },
        "prompt_ids_for_greedy": env.get("prompt_ids"),
        "idle_wait": {"frac": env.get("idle_frac"), "max_wait_s": env.get("idle_wait")},
        "noisy_samples_over_10pct_other_cpu": noisy,
        "measurements": rows,
        "greedy_agreement": greedy,
        "test_backend_ops_mul_mat_id": backend_ops,
        "commands": commands,
        "raw_dir": str(run),
    }

    # text
    lines = [
        "# moe-run vs llama.cpp, CPU",
        "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['nproc']} CPUs), {report['threads']} threads each, "
        f"{report['rounds']} interleaved rounds, medians; {report['date_utc']}.",
        f"moe-run {report['moe_run']['commit']} (--threads passed: {'yes' if report['moe_run']['threads_flag_passed'] else 'no'}); "
        f"llama.cpp {report['llama_cpp']['commit']} (llama-cpp-python {report['llama_cpp']['llama_cpp_python_sdist']} sdist, "
        f"llama-bench build_commit {report['llama_cpp']['build_commit_reported']}).",
        "Prefill: llama-bench -p P -n 0 / moe-run bench --prompt-len P; decode: llama-bench -p 0 -n G -d P / moe-run bench --gen G "
        "(tiny-kjv P=384 G=128, random Mixtral P=512 G=64). Ratio = moe-run / llama.cpp (>1: moe-run faster).",
        "",
        "| model | precision (moe-run vs llama.cpp) | moe-run prefill / decode tok/s | llama.cpp prefill / decode tok/s | prefill ratio | decode ratio | greedy agreement (f32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        mr, lc = e["moe_run"], e["llama_cpp"]
        dt = mr.get("dtype")
        if e["precision"] == "bf16" and dt:
            # "f32, bf16 weights" (--weight-dtype) or "bf16" (bf16 compute too)
            compute, _, weights = dt.partition(", ")
            prec = f"{weights or 'bf16'} ({compute} compute) vs bf16"
        else:
            prec = f"{e['moe_run_format']}{'' if e['precision'] == 'f32' or not dt else ' (' + dt + ' compute)'} vs {e['llama_cpp_format']}"
        g = greedy.get(e["model"]) if e["precision"] == "f32" else None
        gtxt = f"{g['equal_positions']}/{g['n']} (prefix {g['equal_prefix']})" if g else "-"
        rp = e["ratio_prefill_moe_over_llama"]
        rd = e["ratio_decode_moe_over_llama"]
        lines.append(
            f"| {e['model']} | {prec} | {fmt(mr['prefill_median'])} / {fmt(mr['decode_median'])} | "
            f"{fmt(lc['prefill_median'])} / {fmt(lc['decode_median'])} | "
            f"{'-' if rp is None else f'{rp:.2f}x'} | {'-' if rd is None else f'{rd:.2f}x'} | {gtxt} |"
        )
    lines += [""]
    have_load = any(x is not None for e in pairs.values() for x in e["moe_run"].get("other_cpu_frac", []))
    if not have_load:
        lines += ["Other processes' CPU use during the samples was not recorded."]
    elif noisy:
        lines += [f"{len(noisy)} sample(s) ran while other processes used more than 10% of the machine (listed in the JSON: noisy_samples_over_10pct_other_cpu)."]
    else:
        lines += ["No sample ran while other processes used more than 10% of the machine."]
    lq = {e["llama_cpp_format"]: e["llama_cpp"].get("gguf_tensor_types") for e in rows if e["precision"] in ("int8", "int4")}
    if lq:
        lines += ["GGUF tensor types from llama-quantize's defaults: " + "; ".join(f"{k}: {v}" for k, v in lq.items())
                  + ". moe-run --quant keeps embeddings, lm_head, routers and norms in the compute dtype (README, Quantization)."]
    if backend_ops:
        lines += ["", "test-backend-ops perf -o MUL_MAT_ID -b CPU at expert shapes (--test-file; built-in cases in the JSON). "
                  "Its kB/run and GB/s count the whole `as` tensor (all experts), not the experts the ids select:", "", "```"]
        lines += backend_ops.get("shapes", {}).get("lines", []) or ["(no lines)"]
        lines += ["```"]
    lines += ["", f"Commands and every sample: {out.name}.json"]
    text = "\n".join(lines) + "\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, content in ((".json", json.dumps(report, indent=1) + "\n"), (".txt", text)):
        dst = out.with_name(out.name + suffix)
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_text(content)
        tmp.rename(dst)
    print(text)


if __name__ == "__main__":
    main()
