#!/usr/bin/env bash
# The official `openai` Python client (pinned, from PyPI, into a venv under ~/.cache) against
# `moe-run serve` on 127.0.0.1 with the embedded tiny-kjv; run by .ci/run after the Rust tests.
#   tests/openai_client.sh [path/to/moe-run]   (default: target/debug/moe-run, built if missing)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/debug/moe-run}
[ -x "$BIN" ] || cargo build --bin moe-run
VENV=${MOE_OPENAI_VENV:-$HOME/.cache/moe-run-openai-venv}
if ! "$VENV/bin/python" -c 'import openai; assert openai.__version__ == "3.63.0"' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q openai==3.63.0
fi
LOG=$(mktemp)
"$BIN" serve --port 0 --threads 2 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
URL=
for _ in $(seq 1 600); do
  URL=$(sed -n 's/^moe-run serve: listening on //p' "$LOG")
  [ -n "$URL" ] && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; echo "openai_client: the server exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG"; echo "openai_client: the server never listened" >&2; exit 1; }
"$VENV/bin/python" tests/openai_client.py "$URL/v1"
kill -TERM $PID
wait $PID
echo "openai_client: server exited cleanly"
