#!/usr/bin/env bash
# Make the same checkpoints for moe-run (safetensors dirs) and llama.cpp (GGUF), in the cache
# folder ${MOE_LLAMA_CACHE:-$HOME/.cache/moe-run-llama}/models. Run build.sh first.
#
#   benches/llama-cpp/models.sh          # idempotent: skips files that exist
#
#   tiny-kjv/hf                 copy of engine/assets/tiny-kjv (moe-run --weights)
#   tiny-kjv/tiny-kjv-{f32,bf16}.gguf
#   random-mixtral/hf           MixtralForCausalLM, random init (seed 0), float32, vocab 32000,
#                               hidden 1024, 4 layers, 8 experts x 2816, top-2, 32/8 heads
#   random-mixtral/random-mixtral-{f32,bf16,q8_0,q4_0}.gguf
# The converter's python packages (torch, transformers 4.57.6, numpy, sentencepiece, safetensors)
# are installed into $CACHE/venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[ -x "$LLAMA_BIN/llama-quantize" ] || die "run benches/llama-cpp/build.sh first"
[ -x "$PY" ] || die "no venv at $VENV: run benches/llama-cpp/build.sh first"

# the converter's requirements (requirements/requirements-convert_hf_to_gguf.txt pins torch 2.11.0
# from the PyTorch CPU index; the PyPI wheel of the same version works too, at ~4 GB with its CUDA
# libraries). TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU wheel.
if ! "$PY" -c "import torch, transformers, numpy, sentencepiece, safetensors, google.protobuf" 2>/dev/null; then
    log "installing the converter's python packages into $VENV"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$PY" -m pip install -q torch==2.11.0 --index-url "$TORCH_INDEX_URL"
    else
        "$PY" -m pip install -q torch==2.11.0
    fi
    "$PY" -m pip install -q "numpy~=2.2.6" "sentencepiece>=0.1.98,<0.3.0" "transformers==4.57.6" \
        "protobuf>=4.21.0,<5.0.0" safetensors
fi

HELPER="$HERE/models.py"
convert() { # hfdir outfile outtype
    [ -f "$2" ] && return 0
    log "convert $(basename "$2")"
    nice -n 10 "$PY" "$HELPER" convert "$LLAMA_SRC" "$1" "$2.tmp" "$3" > "$2.log" 2>&1 \
        || { tail -20 "$2.log" >&2; die "conversion to $2 failed (log: $2.log)"; }
    mv "$2.tmp" "$2"
}
quantize() { # in out type
    [ -f "$2" ] && return 0
    log "llama-quantize $(basename "$2")"
    nice -n 10 "$LLAMA_BIN/llama-quantize" "$1" "$2.tmp" "$3" "$(nproc)" > "$2.log" 2>&1 \
        || { tail -20 "$2.log" >&2; die "llama-quantize to $2 failed (log: $2.log)"; }
    mv "$2.tmp" "$2"
}

t0=$(date +%s)
# tiny-kjv
T="$MODELS/tiny-kjv"
if [ ! -f "$T/hf/model.safetensors" ] || [ ! -f "$T/hf-convert/config.json" ]; then
    log "tiny-kjv: copy engine/assets/tiny-kjv"
    "$PY" "$HELPER" tiny-kjv "$REPO/engine/assets/tiny-kjv" "$T"
fi
convert "$T/hf-convert" "$T/tiny-kjv-f32.gguf" f32
convert "$T/hf-convert" "$T/tiny-kjv-bf16.gguf" bf16

# random Mixtral
R="$MODELS/random-mixtral"
if [ ! -f "$R/hf/model.safetensors" ] || [ ! -f "$R/hf-convert/config.json" ]; then
    log "random-mixtral: MixtralForCausalLM random init"
    rm -rf "$R/hf" "$R/hf-convert"
    mkdir -p "$R"
    nice -n 10 "$PY" "$HELPER" random-mixtral "$R" "$T/hf" > "$R/params.json"
fi
convert "$R/hf-convert" "$R/random-mixtral-f32.gguf" f32
convert "$R/hf-convert" "$R/random-mixtral-bf16.gguf" bf16
# Q8_0 / Q4_0 from the f32 GGUF. llama-quantize's default for these types keeps some tensors at
# other types (e.g. output.weight as Q6_K under Q4_0): models/*.info.json records what it wrote.
quantize "$R/random-mixtral-f32.gguf" "$R/random-mixtral-q8_0.gguf" Q8_0
quantize "$R/random-mixtral-f32.gguf" "$R/random-mixtral-q4_0.gguf" Q4_0

# metadata and tensor types of every GGUF
for g in "$T"/*.gguf "$R"/*.gguf; do
    [ -f "${g%.gguf}.info.json" ] && [ "${g%.gguf}.info.json" -nt "$g" ] && continue
    "$PY" "$HELPER" gguf-info "$g" "$LLAMA_SRC" > "${g%.gguf}.info.json"
done

# tiny-kjv's tokenizer in llama.cpp must give moe-run's ids for "And God said"
want="[1, 298, 389, 390]"
got="$("$LLAMA_BIN/llama-tokenize" -m "$T/tiny-kjv-f32.gguf" -p "And God said" --ids --log-disable 2>/dev/null | tail -1)"
if [ "$got" != "$want" ]; then
    die "llama-tokenize \"And God said\" gave '$got', moe-run gives $want"
fi
log "llama-tokenize \"And God said\" -> $got (= moe-run's ids)"
log "models ready in $MODELS ($(( $(date +%s) - t0 )) s)"
