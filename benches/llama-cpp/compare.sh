#!/usr/bin/env bash
# moe-run vs llama.cpp on the same checkpoints, interleaved, same threads. Run build.sh and
# models.sh first, and build moe-run (cargo build --release).
#
#   benches/llama-cpp/compare.sh                       # R=5 rounds, T=2 threads
#   R=1 MODELS_SEL=tiny-kjv PRECS="f32 bf16" benches/llama-cpp/compare.sh
#
# Environment:
#   R            rounds (5); each round runs every (model, precision) pair once per engine,
#                the engine order alternating between rounds
#   T            threads for both engines (2): llama-bench -t T; moe-run RAYON_NUM_THREADS=T and
#                --threads T when `moe-run bench --help` lists it
#   MODELS_SEL   "tiny-kjv random-mixtral"
#   PRECS        "f32 bf16 int8 int4" (moe-run f32 / BF16_ARGS / --quant int8 / --quant int4:32 against
#                GGUF f32 / bf16 / Q8_0 / Q4_0; tiny-kjv has only f32 and bf16 GGUFs)
#   QUANT_DTYPE  moe-run --dtype for the int8/int4 rows (auto: what moe-run picks on the CPU)
#   BF16_ARGS    moe-run flags of the bf16 rows ("--dtype f32 --weight-dtype bf16": bf16 weights
#                read in place under f32 compute, as llama.cpp runs a bf16 GGUF; "--dtype bf16"
#                computes in bf16 too)
#   MOE_RUN      moe-run binary (target/release/moe-run); MOE_RUN_COMMIT: the commit it was
#                built from (default: git rev-parse HEAD, "-dirty" with tracked changes)
#   GREEDY       1: greedy-token agreement in f32 (128 tokens tiny-kjv, 32 random Mixtral)
#   BACKEND_OPS  1: test-backend-ops perf -o MUL_MAT_ID -b CPU (built-in cases of types
#                f32/bf16/q8_0/q4_0, and Mixtral-8x7B / random-Mixtral expert shapes)
#   IDLE_FRAC    before each timed command, wait until the machine's CPU use (over 2 s) is
#                below this share (0.15), at most IDLE_WAIT seconds (300); every sample records
#                how much CPU other processes used while it ran (measure.py), and the report
#                flags samples where that was over 10%
#   OUT          output base (benches/results/cpu-vs-llama-cpp/cpu-vs-llama-cpp): writes OUT.json
#                and OUT.txt. Not directly in benches/results/: `moe-run results` (and so
#                `cargo test`) reads every *.json there as a `moe-run bench` report.
# Raw outputs of every run go to $CACHE/runs/<timestamp>/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO"

R="${R:-5}"
T="${T:-2}"
MODELS_SEL="${MODELS_SEL:-tiny-kjv random-mixtral}"
PRECS="${PRECS:-f32 bf16 int8 int4}"
QUANT_DTYPE="${QUANT_DTYPE:-auto}"
BF16_ARGS="${BF16_ARGS:---dtype f32 --weight-dtype bf16}"
MOE_RUN="${MOE_RUN:-target/release/moe-run}"
GREEDY="${GREEDY:-1}"
IDLE_FRAC="${IDLE_FRAC:-0.15}"
IDLE_WAIT="${IDLE_WAIT:-300}"
BACKEND_OPS="${BACKEND_OPS:-1}"
OUT="${OUT:-benches/results/cpu-vs-llama-cpp/cpu-vs-llama-cpp}"
if [ "$(cd "$(dirname "$OUT")" 2>/dev/null && pwd)" = "$REPO/benches/results" ]; then
    die "OUT=$OUT: a .json directly in benches/results/ is read by \`moe-run results\` as a bench report; use a subfolder"
fi

[ -x "$MOE_RUN" ] || die "no moe-run binary at $MOE_RUN (cargo build --release)"
[ -x "$LLAMA_BIN/llama-bench" ] || die "run benches/llama-cpp/build.sh first"
[ -f "$CACHE/llama-version.txt" ] || die "run benches/llama-cpp/build.sh first"

if [ -z "${MOE_RUN_COMMIT:-}" ]; then
    MOE_RUN_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        MOE_RUN_COMMIT="$MOE_RUN_COMMIT-dirty"
    fi
fi

THREADS_ARGS=()
if "$MOE_RUN" bench --help 2>/dev/null | grep -q -- --threads; then
    THREADS_ARGS=(--threads "$T")
fi


RUN="$CACHE/runs/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$RUN"
CMDS="$RUN/commands.tsv"   # kind \t file \t command
: > "$CMDS"
log "raw outputs: $RUN"

# model settings
model_dir()  { echo "$MODELS/$1/hf"; }
model_p()    { case "$1" in tiny-kjv) echo 384;; random-mixtral) echo 512;; esac; }
model_g()    { case "$1" in tiny-kjv) echo 128;; random-mixtral) echo 64;; esac; }
greedy_n()   { case "$1" in tiny-kjv) echo 128;; random-mixtral) echo 32;; esac; }
gguf_of()    { # model prec
    local t
    case "$2" in f32) t=f32;; bf16) t=bf16;; int8) t=q8_0;; int4) t=q4_0;; *) die "precision $2";; esac
    echo "$MODELS/$1/$1-$t.gguf"
}
moe_args_of() { # prec
    case "$1" in
        f32) echo "--dtype f32";;
        bf16) echo "$BF16_ARGS";;
        int8) echo "--dtype $QUANT_DTYPE --quant int8";;
        int4) echo "--dtype $QUANT_DTYPE --quant int4:32";;
    esac
}

# the (model, precision) pairs that have both checkpoints
PAIRS=()
for m in $MODELS_SEL; do
    [ -d "$(model_dir "$m")" ] || die "no $(model_dir "$m"): run benches/llama-cpp/models.sh"
    for p in $PRECS; do
        g="$(gguf_of "$m" "$p")"
        if [ -f "$g" ]; then
            PAIRS+=("$m:$p")
            # the GGUF's tensor types (llama-quantize keeps some tensors at other types)
            [ -f "${g%.gguf}.info.json" ] && cp "${g%.gguf}.info.json" "$RUN/gguf-$m-$p.info.json"
        else
            log "skip $m $p: no $g"
        fi
    done
done
[ "${#PAIRS[@]}" -gt 0 ] || die "nothing to compare"

record() { # kind file command...
    local kind="$1" file="$2"; shift 2
    printf '%s\t%s\t%s\n' "$kind" "$file" "$*" >> "$CMDS"
}
measured() { # file command... : stdout to file, stderr to file.err, load record to file.load.json
    local f="$1"; shift
    python3 "$HERE/measure.py" --wait-idle "$IDLE_FRAC" --max-wait "$IDLE_WAIT" --record "$f.load.json" \
        -- "$@" > "$f" 2> "$f.err"
}

run_llama() { # round model prec
    local r="$1" m="$2" p="$3" g P G
    g="$(gguf_of "$m" "$p")"; P="$(model_p "$m")"; G="$(model_g "$m")"
    local f="$RUN/r$r-$m-$p-llama-prefill.json"
    local cmd=("$LLAMA_BIN/llama-bench" -m "$g" -p "$P" -n 0 -t "$T" -r 1 -o json)
    record llama-prefill "$f" "${cmd[*]}"
    measured "$f" "${cmd[@]}" || { cat "$f.err" >&2; die "llama-bench failed: ${cmd[*]}"; }
    f="$RUN/r$r-$m-$p-llama-decode.json"
    cmd=("$LLAMA_BIN/llama-bench" -m "$g" -p 0 -n "$G" -d "$P" -t "$T" -r 1 -o json)
    record llama-decode "$f" "${cmd[*]}"
    measured "$f" "${cmd[@]}" || { cat "$f.err" >&2; die "llama-bench failed: ${cmd[*]}"; }
}

run_moe() { # round model prec
    local r="$1" m="$2" p="$3" P G
    P="$(model_p "$m")"; G="$(model_g "$m")"
    local f="$RUN/r$r-$m-$p-moe-run.json"
    # shellcheck disable=SC2207
    local extra=($(moe_args_of "$p"))
    local cmd=("$MOE_RUN" bench --weights "$(model_dir "$m")" --prompt-len "$P" --gen "$G"
               --runs 1 --warmup 1 "${extra[@]}" "${THREADS_ARGS[@]}" --json)
    record moe-run "$f" "RAYON_NUM_THREADS=$T ${cmd[*]}"
    RAYON_NUM_THREADS="$T" measured "$f" "${cmd[@]}" \
        || { cat "$f.err" >&2; die "moe-run bench failed: ${cmd[*]}"; }
}

t0=$(date +%s)
for r in $(seq 1 "$R"); do
    for pair in "${PAIRS[@]}"; do
        m="${pair%%:*}"; p="${pair#*:}"
        log "round $r/$R  $m  $p"
        if [ $(( r % 2 )) = 1 ]; then
            run_llama "$r" "$m" "$p"; run_moe "$r" "$m" "$p"
        else
            run_moe "$r" "$m" "$p"; run_llama "$r" "$m" "$p"
        fi
    done
done
log "timed rounds took $(( $(date +%s) - t0 )) s"

# greedy-token agreement in f32: the same prompt ids (tiny-kjv's "And God said"), --ignore-eos
PROMPT_IDS="1,298,389,390"
if [ "$GREEDY" = 1 ]; then
    for m in $MODELS_SEL; do
        g="$(gguf_of "$m" f32)"; [ -f "$g" ] || continue
        N="$(greedy_n "$m")"
        f="$RUN/greedy-$m-moe-run.json"
        cmd=("$MOE_RUN" --weights "$(model_dir "$m")" --dtype f32 --ids "$PROMPT_IDS"
             --max-new-tokens "$N" --temperature 0 --ignore-eos --json)
        record greedy-moe-run "$f" "RAYON_NUM_THREADS=$T ${cmd[*]}"
        RAYON_NUM_THREADS="$T" "${cmd[@]}" > "$f" 2> "$f.err" || { cat "$f.err" >&2; die "moe-run greedy failed"; }
        f="$RUN/greedy-$m-llama.json"
        cmd=("$LLAMA_BIN/moe-greedy-ids" -m "$g" --ids "$PROMPT_IDS" -n "$N" -t "$T" --kv f32)
        record greedy-llama "$f" "${cmd[*]}"
        "${cmd[@]}" > "$f" 2> "$f.err" || { cat "$f.err" >&2; die "moe-greedy-ids failed"; }
        log "greedy $m: done"
    done
fi

# test-backend-ops perf, MUL_MAT_ID on the CPU backend
if [ "$BACKEND_OPS" = 1 ]; then
    TBO="$LLAMA_BIN/test-backend-ops"
    f="$RUN/backend-ops-builtin.txt"
    cmd=("$TBO" perf -o MUL_MAT_ID -b CPU -p 'type_a=(f32|bf16|q8_0|q4_0),.*,n=(1|512),')
    record backend-ops-builtin "$f" "${cmd[*]}"
    log "test-backend-ops perf (built-in MUL_MAT_ID cases)"
    measured "$f" timeout "${BACKEND_OPS_TIMEOUT:-900}" "${cmd[@]}" || log "test-backend-ops (built-in) exited $? (output kept)"
    cases="$RUN/backend-ops-cases.txt"
    : > "$cases"
    for n in 1 512; do
        "$LLAMA_BIN/moe-mmid-cases" mixtral8x7b-gate 4096 14336 8 2 "$n" f32 bf16 q8_0 q4_0 >> "$cases"
        "$LLAMA_BIN/moe-mmid-cases" mixtral8x7b-down 14336 4096 8 2 "$n" f32 bf16 q8_0 q4_0 >> "$cases"
        "$LLAMA_BIN/moe-mmid-cases" random-mixtral-gate 1024 2816 8 2 "$n" f32 bf16 q8_0 q4_0 >> "$cases"
    done
    f="$RUN/backend-ops-shapes.txt"
    cmd=("$TBO" perf -o MUL_MAT_ID -b CPU --test-file "$cases")
    record backend-ops-shapes "$f" "${cmd[*]}"
    log "test-backend-ops perf (expert shapes)"
    measured "$f" timeout "${BACKEND_OPS_TIMEOUT:-900}" "${cmd[@]}" || log "test-backend-ops (shapes) exited $? (output kept)"
fi

# machine and versions
{
    echo "lscpu_model_name=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
    echo "nproc=$(nproc)"
    echo "threads=$T"
    echo "rounds=$R"
    echo "moe_run=$MOE_RUN"
    echo "moe_run_commit=$MOE_RUN_COMMIT"
    echo "repo_head=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "moe_run_version=$("$MOE_RUN" --version 2>&1 | head -1)"
    echo "moe_run_threads_flag=$([ ${#THREADS_ARGS[@]} -gt 0 ] && echo yes || echo no)"
    echo "quant_dtype=$QUANT_DTYPE"
    echo "idle_frac=$IDLE_FRAC"
    echo "idle_wait=$IDLE_WAIT"
    echo "prompt_ids=$PROMPT_IDS"
    echo "kernel=$(uname -sr)"
    echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu_flags_simd=$(grep -m1 -o -w 'avx2\|fma\|f16c\|avx512f\|avx512bw\|avx512_vnni\|avx512_bf16\|avx_vnni\|amx_tile\|amx_int8\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    cat "$CACHE/llama-version.txt"
} > "$RUN/env.txt"

python3 "$HERE/compare_report.py" "$RUN" "$OUT"
log "wrote $OUT.json and $OUT.txt (total $(( $(date +%s) - t0 )) s)"
