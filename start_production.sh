#!/usr/bin/env bash
# Start tkr-embed in production: config.yaml (or $EMBEDDING_CONFIG) under uvicorn with proxy
# headers trusted from server.forwarded_allow_ips. Exits non-zero when the config is invalid (2)
# or the model cannot load (3), so a supervisor (systemd, launchd, a watchdog) sees the failure.
set -euo pipefail
cd "$(dirname "$0")"
CONFIG="${EMBEDDING_CONFIG:-config.yaml}"
PY=".venv/bin/python"
if [ ! -x "$PY" ]; then
  echo "tkr-embed is not set up here: run scripts/setup.sh first" >&2
  exit 1
fi
exec "$PY" -m tkr_embed serve --config "$CONFIG" "$@"
