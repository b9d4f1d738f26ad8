#!/usr/bin/env bash
# gpu-session.sh: everything a GPU session should run first, in one or two device calls.
#
# Here (no GPU):   bash ../shared/gpu/build-device-binary.sh      # CUDA_COMPUTE_CAP=90 for H100/H200
# Then, with the device tool:
#   run(command: "bash benches/gpu-session.sh selftest", carry: [".device"])   # ~1-2 min
#   run(command: "bash benches/gpu-session.sh bench",    carry: [".device"])   # ~6-9 min
#   run(command: "bash benches/gpu-session.sh graph",    carry: [".device"])   # ~4-6 min (estimated)
# and copy what comes back from $OUT into benches/results/ (keep the names), then
#   moe-run results --write      # regenerates README's table from benches/results/*.json
#
# Stages:
#   selftest  every kernel against its CPU reference on the GPU, plus whole-model parity of the CUDA path
#             against the CPU path on tiny-kjv and every fixture (tests/fixtures travels with the tree);
#             its qgemv_bandwidth rows time the decode GEMV (qgemv and qmatmul entries) on Mixtral's
#             expert shapes beside a device copy of the same bytes.
#   sanitize  (optional, a third call) compute-sanitizer memcheck over the self-test, op by op.
#   bench     issue 9's set on Mixtral-8x7B shapes with random weights (no download): INT4 and INT8, batch 1,
#             512-token prefill and 64 decode steps, all 32 layers (25 GB / 47 GB: fit an 80 GB H100); a
#             4-layer INT4 run with the candle baseline (its dense f32 copy of 32 layers would not fit).
#   graph     issue 21's eager vs CUDA-graph decode, side by side: INT4 Mixtral-8x7B, batch 1, 128 decode steps
#             after a 32-token prompt (128 steps: the warm-up and capture steps of each run count in its rate),
#             without and with --cuda-graph (a line on stderr says why if graphs
#             turn themselves off; the report gives replays per decoded token), and eager again with
#             MOE_PATH=qmatmul-gemv (the older INT4 GEMV entries, against the qgemv ones of the first run).
# Files land in $OUT (the device tool brings back at most 8 files; `all` writes 8: the A/B run of the graph
# stage is text only): gpu-<run>.json per
# bench run, every bench's text in gpu-bench.txt, gpu-selftest.txt and gpu-nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN=(bash .device/run-on-device.sh)
OUT=${OUT:-/tmp/moe-run-gpu}
GPU=${GPU:-h100}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu-nvidia-smi.txt"

bench() { # name, then moe-run bench arguments
  local name=$1
  shift
  echo "== bench $name: $*"
  echo "== bench $name: $*" >>"$OUT/gpu-bench.txt"
  "${RUN[@]}" bench --device cuda --gpu "$GPU" "$@" --json-out "$OUT/gpu-$name.json" 2>&1 | tee -a "$OUT/gpu-bench.txt"
}

bench_text() { # name, then moe-run bench arguments: the report in gpu-bench.txt only (no JSON file)
  local name=$1
  shift
  echo "== bench $name (text only): $*" | tee -a "$OUT/gpu-bench.txt"
  "${RUN[@]}" bench --device cuda --gpu "$GPU" "$@" 2>&1 | tee -a "$OUT/gpu-bench.txt"
}

case "${1:-all}" in
selftest | all)
  echo "== selftest --device cuda"
  "${RUN[@]}" selftest --device cuda 2>&1 | tee "$OUT/gpu-selftest.txt"
  ;;&
bench | all)
  mix=(--model mixtral-8x7b --random-weights --dtype bf16 --prompt-len 512 --gen 64 --runs 5)
  bench mixtral-8x7b-int4 "${mix[@]}" --quant int4
  bench mixtral-8x7b-int8 "${mix[@]}" --quant int8
  bench mixtral-8x7b-4layers-int4-baseline "${mix[@]}" --quant int4 --layers 4 --baseline candle
  ;;&
graph | all)
  dec=(--model mixtral-8x7b --random-weights --dtype bf16 --quant int4 --prompt-len 32 --gen 128 --runs 3)
  bench mixtral-8x7b-int4-eager "${dec[@]}"
  bench mixtral-8x7b-int4-graph "${dec[@]}" --cuda-graph
  # The same eager decode with the older qmatmul_* GEMV entries instead of qgemv_*: their A/B (text
  # only, so that `all` stays within the tool's 8 files).
  MOE_PATH=qmatmul-gemv bench_text mixtral-8x7b-int4-eager-qmatmul-gemv "${dec[@]}"
  ;;&
sanitize)
  # compute-sanitizer memcheck over the kernel self-test, one op family at a time (memcheck is slow).
  # run-on-device.sh unpacks the binary and prints the LD_LIBRARY_PATH it needs; reuse both here.
  ld=$("${RUN[@]}" --help 2>&1 >/dev/null | sed -n 's/^run-on-device.sh: LD_LIBRARY_PATH=//p')
  bin=${TMPDIR:-/tmp}/moe-run-device
  for op in route dispatch experts combine rms_norm qmatmul qk_norm_rope decode_attention kv_store; do
    echo "== compute-sanitizer memcheck: selftest --filter $op"
    LD_LIBRARY_PATH=$ld compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$bin" selftest --device cuda --filter "$op" 2>&1 | tail -n 25
  done 2>&1 | tee "$OUT/gpu-sanitize.txt"
  ;;
selftest | bench | graph | all) ;;
*)
  echo "usage: gpu-session.sh [selftest|bench|graph|all|sanitize]" >&2
  exit 2
  ;;
esac
