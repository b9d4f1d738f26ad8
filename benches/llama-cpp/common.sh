# Shared settings for benches/llama-cpp/*.sh (sourced, not run).
# Everything lives in a cache folder outside the repository.
LLAMA_PY_VERSION="${LLAMA_PY_VERSION:-0.3.36}"
CACHE="${MOE_LLAMA_CACHE:-$HOME/.cache/moe-run-llama}"
SRC_ROOT="$CACHE/src/llama_cpp_python-$LLAMA_PY_VERSION"
LLAMA_SRC="$SRC_ROOT/vendor/llama.cpp"
LLAMA_BUILD="$CACHE/build-$LLAMA_PY_VERSION"
LLAMA_BIN="$LLAMA_BUILD/bin"
VENV="$CACHE/venv"
MODELS="$CACHE/models"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# venv python (created by build.sh)
PY="$VENV/bin/python"
