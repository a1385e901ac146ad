#!/bin/bash
# CPU A/B: the Batcher before (old tree) and after (this tree), alternating fresh servers
B="-m tkr_embed bench --systems tkr-embed --raw --cases short long --concurrency 64 --duration 15 --warmup 2"
for r in "1 old" "1 new" "2 new" "2 old" "3 old" "3 new"; do
  set -- $r; d=/work/main; [ $2 = old ] && d=/tmp/old
  (cd $d && /work/main/.venv/bin/python $B --out /tmp/cpuab/$2-$1.json > /tmp/cpuab/$2-$1.log 2>&1)
  /work/main/.venv/bin/python -c "
import json; d=json.load(open('/tmp/cpuab/$2-$1.json'))
print('$2-$1', {c: (v['tkr-embed'][0]['requests_per_s'], v['tkr-embed'][0]['p50_ms']) for c, v in d['servers'].items()}, d['errors'][:1])"
done
