#!/usr/bin/env bash
# Set up what the benchmark suite compares against, then run it:
#   scripts/bench-setup.sh                      # .venv (with matplotlib, torch) and .venv-bench (Infinity)
#   .venv/bin/tkr-embed bench                   # the whole suite; writes docs/bench/latest.{json,png}
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip --disable-pip-version-check -q install -r requirements-bench.txt
# Infinity (the peer a user would pick instead) in its own environment: its pins clash with ours.
if [ ! -x .venv-bench/bin/infinity_emb ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0 'infinity-emb[server,torch]==0.0.78'
fi
echo "ready: .venv/bin/tkr-embed bench --help"
