#!/usr/bin/env bash
# Set up everything the project needs, idempotently: a virtual environment in .venv, the
# CPU build of torch (never a CUDA build), the package with its dev extra, and
# Fashion-MNIST from Debian's dataset-fashion-mnist package where apt is available.
# Safe to run twice: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=2.13.0
STAMP=$VENV/.bootstrap-$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PY" -m venv "$VENV"
fi

# torch first and pinned: with torch already installed, the package's loose torch range
# installs nothing more, so pip never reaches for a multi-GB CUDA build.
have_torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ -z "$have_torch" ]; then
  echo "bootstrap: installing torch==$TORCH_VERSION (CPU)"
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" \
    || "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing autosculpt-env and its dependencies"
  "$VENV/bin/pip" install --quiet -c scripts/constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c 'import autosculpt_env, torch_geometric, gymnasium' 
  rm -f "$VENV"/.bootstrap-*
  touch "$STAMP"
fi

# Fashion-MNIST: the Debian package puts the standard IDX files in /usr/share/datasets.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${AUTOSCULPT_DATA_DIR:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    echo "bootstrap: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
      >/dev/null 2>&1 || echo "bootstrap: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped. Install it as root, or set AUTOSCULPT_DATA_DIR."
  else
    echo "bootstrap: no apt-get; set AUTOSCULPT_DATA_DIR to a folder with the Fashion-MNIST IDX files."
  fi
fi
