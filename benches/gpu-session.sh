#!/usr/bin/env bash
# gpu-session.sh: what a session with a GPU runs first, as ONE device call sized to the lease (15 minutes of
# device time per task, the machine's start included): the default call is time-boxed to about 6 minutes, so a
# rerun still fits if the first one breaks.
#
# Here (no GPU):  CUDA_COMPUTE_CAP=90 bash ../shared/gpu/build-device-binary.sh     # H100 / H200 (~13 min cold)
#                 DRY=1 bash benches/gpu-session.sh    # the same script on the CPU in seconds: flags, files, table
# Then, with the device tool, one call:
#   run(command: "bash benches/gpu-session.sh", carry: [".device"], timeout_s: 420)
# copy what comes back from $OUT into benches/results/ (keep the names), `moe-run results --write` (regenerates
# README's table), commit, give_back. Only if the lease has time left: a second call with `extra`.
#
# Stages (`all`, the default, is selftest then bench; each command is killed at its time box, and what finished
# is kept):
#   selftest (<= 120 s) every kernel against its CPU reference on the GPU, plus whole-model parity of the CUDA
#            path against the CPU path on tiny-kjv and every fixture (tests/fixtures travels with the tree); its
#            qgemv_bandwidth rows time the decode GEMV (qmma, qgemv and qmatmul entries; and at 64 rows per expert
#            qmma's tensor-core GEMM against its GEMV and the f32 tiled GEMM, which qmm_path decided from a static
#            count) on Mixtral's expert shapes beside a device copy of the same bytes.
#   bench    (<= 110 s INT4, <= 150 s INT8) Mixtral-8x7B shapes with random weights (no download), all 32 layers,
#            batch 1, 512-token prefill and 64 decode steps, 3 timed runs, with --cuda-graph: each report holds the
#            eager decode and the graph decode of the same weights and prompts side by side (issue 21), and
#            whether their greedy ids agree. INT4 25 GB, INT8 47 GB: both fit an 80 GB H100.
#   extra    (a second call, ~4 min) the 4-layer INT4 run with the candle baseline (its dense f32 copy of 32
#            layers would not fit), and eager INT4 with MOE_PATH=qgemv, text only: decode on the CUDA-core GEMV
#            entries against the tensor-core qmma ones of the bench run, and prefill on the f32-FMA tiled GEMM
#            against qmma's tensor-core GEMM (the default). INT8's A/B is in the self-test's qgemv_bandwidth rows.
#   sanitize (optional) compute-sanitizer memcheck over the self-test, op by op.
# Files land in $OUT (the device tool brings back at most 8): gpu-<run>.json per bench run, every bench's text
# in gpu-bench.txt, gpu-selftest.txt and gpu-nvidia-smi.txt. The last lines printed are the table of the
# JSON reports that came back (`moe-run results --print`).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/moe-run-gpu}
GPU=${GPU:-h100}
mkdir -p "$OUT"
if [ -n "${DRY:-}" ]; then
  # The plumbing on the CPU: the local release build, one layer, a few tokens, the emulator's self-test.
  RUN=(./target/release/moe-run)
  [ -x "${RUN[0]}" ] || { echo "gpu-session.sh: DRY=1 needs cargo build --release --features emu" >&2; exit 2; }
  DEVICE=(--device cpu)
  SELFTEST=(selftest --device emu --filter rms_norm)
  SHAPE=(--layers 1 --prompt-len 8 --gen 4 --runs 1 --warmup 0)
  SCALE=0
else
  RUN=(bash .device/run-on-device.sh)
  DEVICE=(--device cuda --gpu "$GPU")
  SELFTEST=(selftest --device cuda)
  SHAPE=(--prompt-len 512 --gen 64 --runs 3)
  SCALE=1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 |
    tee "$OUT/gpu-nvidia-smi.txt"
fi

# boxed SECONDS CMD...: CMD killed after SECONDS (a DRY run gets 600: the CPU is slower and nothing is at stake).
boxed() {
  local secs=$1
  shift
  [ "$SCALE" = 1 ] || secs=600
  timeout -k 10 "$secs" "$@"
  local rc=$?
  [ $rc = 124 ] || [ $rc = 137 ] && echo "gpu-session.sh: stopped at its ${secs} s time box: $*"
  return $rc
}

bench() { # name, seconds, then moe-run bench arguments
  local name=$1 secs=$2
  shift 2
  echo "== bench $name: $*" | tee -a "$OUT/gpu-bench.txt"
  boxed "$secs" "${RUN[@]}" bench "${DEVICE[@]}" "$@" --json-out "$OUT/gpu-$name.json" --force 2>&1 |
    tee -a "$OUT/gpu-bench.txt"
}

bench_text() { # name, seconds, then moe-run bench arguments: the report in gpu-bench.txt only (no JSON file)
  local name=$1 secs=$2
  shift 2
  echo "== bench $name (text only): $*" | tee -a "$OUT/gpu-bench.txt"
  boxed "$secs" "${RUN[@]}" bench "${DEVICE[@]}" "$@" 2>&1 | tee -a "$OUT/gpu-bench.txt"
}

mix=(--model mixtral-8x7b --random-weights --dtype bf16 "${SHAPE[@]}")
case "${1:-all}" in
selftest | all)
  echo "== ${SELFTEST[*]}"
  boxed 120 "${RUN[@]}" "${SELFTEST[@]}" 2>&1 | tee "$OUT/gpu-selftest.txt"
  ;;&
bench | all)
  bench mixtral-8x7b-int4 110 "${mix[@]}" --quant int4 --cuda-graph
  bench mixtral-8x7b-int8 150 "${mix[@]}" --quant int8 --cuda-graph
  ;;&
extra)
  # Four layers with the candle baseline (a dense copy of 32 would not fit), and the A/B of the GEMV entries.
  four=(--layers 4)
  [ "$SCALE" = 1 ] || four=()
  bench mixtral-8x7b-4layers-int4-baseline 120 "${mix[@]}" --quant int4 "${four[@]}" --baseline candle
  MOE_PATH=qgemv bench_text mixtral-8x7b-int4-eager-qgemv 110 "${mix[@]}" --quant int4
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
selftest | bench | extra | all) ;;
*)
  echo "usage: [DRY=1] gpu-session.sh [all|selftest|bench|extra|sanitize]" >&2
  exit 2
  ;;
esac
if compgen -G "$OUT/*.json" >/dev/null; then
  echo "== results that came back ($OUT)"
  "${RUN[@]}" results --print --dir "$OUT" 2>&1
fi
