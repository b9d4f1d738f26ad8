#!/usr/bin/env bash
# The Python `huggingface_hub` client (pinned, from PyPI, into a venv under ~/.cache) and moe-run
# share one Hugging Face cache, both ways, against the mock Hub of tests/hub.rs on 127.0.0.1:
# huggingface_hub's snapshot_download(local_files_only=True) / try_to_load_from_cache see what
# moe-run downloaded, and moe-run runs offline from what huggingface_hub downloaded (the ignored
# test `python_interop` of tests/hub.rs, run here with MOE_HUB_PYTHON). Run by .ci/run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VERSION=2.4.0
VENV=${MOE_HUB_VENV:-$HOME/.cache/moe-run-hfhub-venv}
if ! "$VENV/bin/python" -c "import huggingface_hub as h; assert h.__version__ == '$VERSION'" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "huggingface_hub==$VERSION"
fi
MOE_HUB_PYTHON="$VENV/bin/python" HF_HUB_DISABLE_TELEMETRY=1 \
  cargo test --test hub -- --ignored --exact python_interop
