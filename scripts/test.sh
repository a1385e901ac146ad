#!/usr/bin/env bash
# Set everything up, then run the test suite (all of it, slow tests included, as CI does).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" for the quick suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/python -m pip --disable-pip-version-check -q install -r requirements-reference.txt
# LiteLLM's proxy lives in its own environment (its pins clash with ours); the e2e test uses it.
if [ ! -x .venv-litellm/bin/litellm ] || ! cmp -s requirements-litellm.txt .venv-litellm/requirements.txt; then
  rm -rf .venv-litellm
  .venv/bin/python -m venv .venv-litellm
  .venv-litellm/bin/python -m pip --disable-pip-version-check -q install -r requirements-litellm.txt
  cp requirements-litellm.txt .venv-litellm/requirements.txt
fi
export TKR_LITELLM_PROXY="$PWD/.venv-litellm/bin/litellm"
# A real browser for the console test: Debian's chromium (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo -n"
  $SUDO apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq chromium >/dev/null 2>&1; } \
    || echo "warning: could not install chromium; the console browser test will be skipped" >&2
fi
if command -v chromium >/dev/null; then export TKR_CHROMIUM="$(command -v chromium)"; fi
# Preload OpenBLAS for MLX in this process and the servers the tests start.
eval "$(.venv/bin/python - <<'PY'
import shlex
from tkr_embed.blas import PRELOAD_VARS, preload_env
env = preload_env()
for name in PRELOAD_VARS:
    if env and name in env:
        print(f"export {name}=" + shlex.quote(env[name]))
PY
)"
exec .venv/bin/python -m pytest "$@"
