#!/usr/bin/env python3
"""Load benchmark of `moe-run serve` on loopback (not a test): N concurrent streaming clients for a
bounded time at each concurrency level, reporting aggregate generated tokens/s, time to first
token and inter-token latency percentiles, next to the batch-1 (concurrency 1) throughput of the
same run. Python standard library only; it starts and stops the server itself.

  benches/serve-load.py [--bin target/release/moe-run] [--levels 1,4,16,64] [--seconds 20]
                        [--max-tokens 64] [--out benches/results/serve] [-- SERVER FLAGS...]

Every request is greedy with ignore_eos, so each generates exactly --max-tokens tokens; prompts
rotate through a fixed list. Writes serve-load.json and serve-load.txt under --out (atomically).
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PROMPTS = [
    "And God said", "In the beginning", "And it came to pass, when", "The LORD is my shepherd",
    "Blessed are the", "And Moses spake unto", "Then said Jesus unto them,", "For God so loved",
    "And the earth was", "Honour thy father", "Behold,", "And Abraham", "I am the", "And there was",
]


def start_server(binary, extra):
    proc = subprocess.Popen([binary, "serve", "--port", "0", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.match(r"moe-run serve: listening on http://(.+):(\d+)", line.strip())
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(2)), "".join(lines)
    raise SystemExit("server exited before listening:\n" + "".join(lines))


def one_request(port, prompt, max_tokens):
    """One streamed completion: (ttft seconds, [inter-token gaps], tokens, total seconds)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times, tokens = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0].get("text"):
            times.append(time.perf_counter())
    t1 = time.perf_counter()
    conn.close()
    if not times:
        raise RuntimeError("no text in the stream")
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0] - t0, gaps, tokens or len(times), t1 - t0


def run_level(port, concurrency, seconds, max_tokens):
    """`concurrency` clients loop until `seconds` have passed (requests in flight finish)."""
    stop_at = time.perf_counter() + seconds
    results, errors = [], []
    lock = threading.Lock()

    def client(k):
        i = k
        while time.perf_counter() < stop_at:
            try:
                r = one_request(port, PROMPTS[i % len(PROMPTS)], max_tokens)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported, never silently dropped
                with lock:
                    errors.append(str(e))
            i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[2] for r in results)
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else None

    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(errors),
        "error_samples": errors[:3], "wall_s": wall, "generated_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
        "itl_ms": {"p50": pct(gaps, 50), "p90": pct(gaps, 90), "p99": pct(gaps, 99)},
        "ttft_ms_median": statistics.median(ttft) * 1000 if ttft else None,
    }


def write_atomic(path, text):
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/moe-run")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="benches/results/serve")
    ap.add_argument("server", nargs="*", help="extra flags for moe-run serve (after --)")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    max_batch = max(levels)
    flags = ["--max-batch", str(max_batch), "--max-waiting", str(2 * max_batch), *a.server]
    proc, port, banner = start_server(a.bin, flags)
    try:
        one_request(port, PROMPTS[0], 8)  # warm up
        rows = [run_level(port, c, a.seconds, a.max_tokens) for c in levels]
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    base = next((r["tokens_per_s"] for r in rows if r["concurrency"] == 1), None)
    report = {
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "server_flags": flags, "server_banner": banner.strip(), "cpus": os.cpu_count(),
        "seconds_per_level": a.seconds, "max_tokens": a.max_tokens, "levels": rows,
    }
    lines = [f"moe-run serve load test at {commit} ({report['date']}), {os.cpu_count()} CPUs, "
             f"{a.seconds:.0f} s per level, {a.max_tokens} greedy tokens per request, streamed",
             f"server: {' '.join(flags)}", "",
             "| clients | requests | errors | gen tok/s | x batch-1 | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
        t, g = r["ttft_ms"], r["itl_ms"]
        f = lambda d: "/".join("n/a" if v is None else f"{v:.1f}" for v in (d["p50"], d["p90"], d["p99"]))
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {f(t)} | {f(g)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(os.path.join(a.out, "serve-load.json"), json.dumps(report, indent=2) + "\n")
    write_atomic(os.path.join(a.out, "serve-load.txt"), text)
    if any(r["errors"] for r in rows):
        raise SystemExit("some requests failed: see error_samples in the JSON")


if __name__ == "__main__":
    main()
