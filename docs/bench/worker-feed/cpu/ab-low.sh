#!/bin/bash
# CPU A/B at 1 and 8 clients: the Batcher before (old tree) and after (this tree), alternating fresh servers
B="-m tkr_embed bench --systems tkr-embed --raw --cases short --concurrency 1 8 --duration 10 --warmup 2"
for r in "1 old" "1 new" "2 new" "2 old"; do
  set -- $r; d=/work/main; [ $2 = old ] && d=/tmp/old
  (cd $d && /work/main/.venv/bin/python $B --out /tmp/cpuab/low-$2-$1.json > /tmp/cpuab/low-$2-$1.log 2>&1)
  /work/main/.venv/bin/python -c "
import json; d=json.load(open('/tmp/cpuab/low-$2-$1.json'))
print('$2-$1', [(x['concurrency'], x['requests_per_s'], x['p50_ms'], x['p99_ms']) for x in d['servers']['short']['tkr-embed']], d['errors'][:1])"
done
