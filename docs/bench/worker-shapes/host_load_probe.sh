#!/usr/bin/env bash
# Ad hoc: the raw loop (the server's bucketed forward, batch 32 and 40 rows) quiet, then while a
# tkr-embed server on the same machine answers 64 clients' cache hits (8 front ends, 4 generator
# processes: the host work of a loaded server, its GPU idle), then quiet again.
# Usage: MODEL=/tmp/m OUT=dir [DEVICE=gpu DTYPE=bfloat16] docs/bench/worker-shapes/host_load_probe.sh
set -u
DEVICE=${DEVICE:-gpu}
DTYPE=${DTYPE-bfloat16}
S="python3 bench/worker_neighbours.py --model $MODEL --device $DEVICE ${DTYPE:+--dtype $DTYPE} --neighbours quiet --batch 32 40 --rounds 2 --seconds 2"
$S 2>/dev/null | tail -1 > $OUT/quiet-before.txt
EMBEDDING__SERVER__FRONTENDS=8 EMBEDDING__LOGGING__LEVEL=WARNING EMBEDDING__MODEL__DEVICE=$DEVICE EMBEDDING__CACHE__ENABLED=true \
  python3 -m tkr_embed serve --config config.dev.yaml --port 8123 --model $MODEL --model-name bench-model > $OUT/server.log 2>&1 &
SERVER=$!
for _ in $(seq 120); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8123/ready)" = 200 ] && break; sleep 1
done
python3 -m tkr_embed.benchmark.loadgen --url http://127.0.0.1:8123 --case cache --model bench-model \
  --concurrency 64 --duration ${LOAD_SECONDS:-70} --processes 4 > $OUT/load.json 2> $OUT/load.log &
LOAD=$!
sleep 5
$S 2>/dev/null | tail -1 > $OUT/loaded.txt
wait $LOAD
kill $SERVER; wait $SERVER
$S 2>/dev/null | tail -1 > $OUT/quiet-after.txt
for f in quiet-before loaded quiet-after; do echo "$f: $(python3 -c "import json,sys; d=json.load(open('$OUT/$f.txt')); print(d['median_batch_ms'], [(s['rows'], s['ms'], s.get('build_ms'), s['cpu_ms']) for s in d['shapes']])")"; done
python3 -c "import json; d=json.load(open('$OUT/load.json')); print('cache hits:', d if not isinstance(d, dict) else {k: d[k] for k in d if k in ('requests_per_s','p50_ms','levels')})" | cut -c1-600
