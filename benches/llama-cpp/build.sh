#!/usr/bin/env bash
# Build llama.cpp (the copy vendored in the llama-cpp-python sdist on PyPI) into a cache folder
# outside the repository: ${MOE_LLAMA_CACHE:-$HOME/.cache/moe-run-llama}.
#
#   benches/llama-cpp/build.sh            # idempotent: skips what is already there
#
# Produces $CACHE/build-<ver>/bin/{llama-bench,llama-tokenize,llama-quantize,test-backend-ops,
# llama-simple,moe-greedy-ids,moe-mmid-cases} and $CACHE/llama-version.txt (sdist version + llama.cpp commit).
# Needs: python3 with pip, a C/C++ compiler, git is not needed. CMake and Ninja are installed
# into $CACHE/venv with pip when they are not on PATH.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
JOBS="${JOBS:-$(nproc)}"

mkdir -p "$CACHE/sdist" "$CACHE/src"

# 1. the python venv (cmake/ninja if missing; the converter's packages are added by models.sh)
if [ ! -x "$PY" ]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
fi
export PATH="$VENV/bin:$PATH"
command -v cmake >/dev/null || { log "pip install cmake"; "$PY" -m pip install -q cmake; }
command -v ninja >/dev/null || { log "pip install ninja"; "$PY" -m pip install -q ninja; }

# 2. the sdist (only llama-cpp-python itself as source; no --no-binary :all:)
SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    log "pip download llama-cpp-python==$LLAMA_PY_VERSION (sdist)"
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_PY_VERSION" -d "$CACHE/sdist"
fi
[ -f "$SDIST" ] || die "no sdist at $SDIST"

# 3. extract
if [ ! -f "$LLAMA_SRC/CMakeLists.txt" ]; then
    log "extracting $SDIST"
    rm -rf "$SRC_ROOT"
    tar xzf "$SDIST" -C "$CACHE/src"
fi

# 4. the llama.cpp commit: the sdist carries no git metadata (vendor/llama.cpp/.git points to a
#    gitdir that is not shipped), so build-info would say "unknown". The sdist's CHANGELOG names
#    the llama.cpp commit of this release ("update llama.cpp to ggml-org/llama.cpp@<hash>").
COMMIT="$(awk -v v="## [$LLAMA_PY_VERSION]" '
    index($0, v) == 1 { on = 1; next }
    on && /^## \[/ { exit }
    on && match($0, /llama\.cpp@[0-9a-f]+/) { print substr($0, RSTART + 10, RLENGTH - 10); exit }
' "$SRC_ROOT/CHANGELOG.md")"
[ -n "$COMMIT" ] || COMMIT=unknown
# make llama.cpp's own build-info (printed by llama-bench as build_commit) carry it
sed -i "s/^set(BUILD_COMMIT \"unknown\")/set(BUILD_COMMIT \"$COMMIT\")/" "$LLAMA_SRC/cmake/build-info.cmake"

# 5. configure + build only the targets the benches use
#    AMX: with -march=native on a CPU whose cpuid lists AMX (amx_tile), ggml compiles its AMX
#    path and uses it for Q4_0/Q8_0 weights. On the machine these scripts were written on (a
#    KVM guest of an Intel Xeon with AMX) that path dies in ggml_backend_amx_mul_mat at its
#    first ldtilecfg (SIGILL; SIGSEGV under gdb), although a standalone tile load/zero/release
#    (amx_probe.c) runs there. So by default the compiler is wrapped to append
#    -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 after ggml's -march=native (the rest of native
#    stays: AVX2/AVX-512/VNNI/BF16 where present). LLAMA_AMX=1 keeps AMX. On CPUs without AMX
#    (e.g. AMD Zen 3) the flags change nothing.
LLAMA_AMX="${LLAMA_AMX:-0}"
LAUNCHER=""
if [ "$LLAMA_AMX" != 1 ]; then
    LAUNCHER="$CACHE/cc-no-amx.sh"
    printf '#!/bin/sh\n# compiler launcher from benches/llama-cpp/build.sh: no AMX after -march=native\nexec "$@" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16\n' > "$LAUNCHER"
    chmod +x "$LAUNCHER"
fi
CONFIG=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
        -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON
        -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=ON
        "-DCMAKE_C_COMPILER_LAUNCHER=$LAUNCHER" "-DCMAKE_CXX_COMPILER_LAUNCHER=$LAUNCHER")
TARGETS=(llama-bench llama-tokenize llama-quantize test-backend-ops llama-simple)
STAMP="$LLAMA_BUILD/.moe-run-config"
need=0
for t in "${TARGETS[@]}"; do [ -x "$LLAMA_BIN/$t" ] || need=1; done
[ "$(cat "$STAMP" 2>/dev/null)" = "${CONFIG[*]}" ] || need=1
if [ "$need" = 1 ]; then
    if [ ! -f "$LLAMA_BUILD/build.ninja" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${CONFIG[*]}" ]; then
        log "cmake configure -> $LLAMA_BUILD"
        cmake -S "$LLAMA_SRC" -B "$LLAMA_BUILD" -G Ninja "${CONFIG[@]}" >&2
    fi
    log "building ${TARGETS[*]} with $JOBS jobs (nice)"
    t0=$(date +%s)
    nice -n 10 cmake --build "$LLAMA_BUILD" -j "$JOBS" --target "${TARGETS[@]}" >&2
    log "llama.cpp build took $(( $(date +%s) - t0 )) s"
    echo "${CONFIG[*]}" > "$STAMP"
fi
for t in "${TARGETS[@]}"; do [ -x "$LLAMA_BIN/$t" ] || die "missing $LLAMA_BIN/$t after build"; done

# 6. moe-greedy-ids: greedy generation from token ids, printing token ids (JSON) — llama.cpp's
#    own examples take text prompts and print text.
GREEDY="$LLAMA_BIN/moe-greedy-ids"
if [ ! -x "$GREEDY" ] || [ "$HERE/greedy_ids.cpp" -nt "$GREEDY" ]; then
    log "compiling moe-greedy-ids"
    libdir="$(dirname "$(find "$LLAMA_BUILD" -name 'libllama.so' | head -1)")"
    [ -n "$libdir" ] || die "libllama.so not found under $LLAMA_BUILD"
    nice -n 10 "${CXX:-c++}" -O2 -std=c++17 "$HERE/greedy_ids.cpp" -o "$GREEDY" \
        -I"$LLAMA_SRC/include" -I"$LLAMA_SRC/ggml/include" \
        -L"$libdir" -Wl,-rpath,"$libdir" -lllama -lggml -lggml-base
fi

# 7. moe-mmid-cases: MUL_MAT_ID cases at chosen shapes for test-backend-ops --test-file
MMID="$LLAMA_BIN/moe-mmid-cases"
if [ ! -x "$MMID" ] || [ "$HERE/mmid_cases.cpp" -nt "$MMID" ]; then
    log "compiling moe-mmid-cases"
    libdir="$(dirname "$(find "$LLAMA_BUILD" -name 'libggml-base.so' | head -1)")"
    nice -n 10 "${CXX:-c++}" -O2 -std=c++17 "$HERE/mmid_cases.cpp" -o "$MMID" \
        -I"$LLAMA_SRC/ggml/include" -L"$libdir" -Wl,-rpath,"$libdir" -lggml-base
fi

# 8. record what was built
{
    echo "llama_cpp_python_version=$LLAMA_PY_VERSION"
    echo "llama_cpp_commit=$COMMIT"
    echo "sdist_sha256=$(sha256sum "$SDIST" | cut -d' ' -f1)"
    echo "cmake_flags=${CONFIG[*]}"
    echo "amx=$([ "$LLAMA_AMX" = 1 ] && echo "as -march=native gives" || echo "off (-mno-amx-tile -mno-amx-int8 -mno-amx-bf16 appended)")"
    echo "cpu_amx_flags=$(grep -m1 -o -w 'amx_tile\|amx_int8\|amx_bf16' /proc/cpuinfo | tr '\n' ' ')"
    echo "compiler=$("${CXX:-c++}" --version | head -1)"
    echo "llama_bench_build=$("$LLAMA_BIN/llama-bench" --version 2>&1 | tr '\n' ' ')"
} > "$CACHE/llama-version.txt.tmp"
mv "$CACHE/llama-version.txt.tmp" "$CACHE/llama-version.txt"
log "built; $(grep commit= "$CACHE/llama-version.txt")  bin: $LLAMA_BIN"
