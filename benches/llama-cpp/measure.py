#!/usr/bin/env python3
"""Run one measured command and record how busy the rest of the machine was meanwhile.

  measure.py [--wait-idle FRAC] [--max-wait S] --record FILE.json -- CMD...

With --wait-idle, first waits (at most --max-wait seconds) until the whole machine's CPU use,
sampled over 2 s, is below FRAC of all CPUs. Then runs CMD (stdout/stderr inherited) and writes
FILE.json: wall seconds, the command's own CPU seconds (its children's rusage), the machine's busy
CPU seconds over the same interval (/proc/stat), and other_cpu_frac = (busy - own) / (wall *
CPUs): the share of the machine that other processes used while the measurement ran.
Exits with the command's exit code. Standard library only.
"""
import json
import os
import resource
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def busy_total():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal
    return (total - idle) / TICK, total / TICK


def busy_frac(seconds):
    b0, t0 = busy_total()
    time.sleep(seconds)
    b1, t1 = busy_total()
    return (b1 - b0) / max(t1 - t0, 1e-9)


def main():
    args = sys.argv[1:]
    wait_idle, max_wait, record = None, 300.0, None
    while args and args[0] != "--":
        a = args.pop(0)
        if a == "--wait-idle":
            wait_idle = float(args.pop(0))
        elif a == "--max-wait":
            max_wait = float(args.pop(0))
        elif a == "--record":
            record = args.pop(0)
        else:
            sys.exit(f"measure.py: unknown option {a}")
    cmd = args[1:]
    if not cmd or not record:
        sys.exit(__doc__)

    waited, before = 0.0, None
    if wait_idle is not None:
        t = time.monotonic()
        while True:
            before = busy_frac(2.0)
            if before < wait_idle or time.monotonic() - t > max_wait:
                break
        waited = time.monotonic() - t

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    b0, _ = busy_total()
    w0 = time.monotonic()
    rc = subprocess.call(cmd)
    wall = time.monotonic() - w0
    b1, _ = busy_total()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    busy = b1 - b0
    rec = {
        "wall_s": round(wall, 3),
        "own_cpu_s": round(own, 3),
        "machine_busy_cpu_s": round(busy, 3),
        "cpus": NCPU,
        "other_cpu_frac": round(max(busy - own, 0.0) / max(wall * NCPU, 1e-9), 3),
        "busy_frac_before": None if before is None else round(before, 3),
        "waited_for_idle_s": round(waited, 1),
        "exit_code": rc,
    }
    with open(record + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(record + ".tmp", record)
    sys.exit(rc)


if __name__ == "__main__":
    main()
