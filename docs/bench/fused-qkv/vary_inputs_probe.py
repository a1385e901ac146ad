"""Ad hoc: does the raw ceiling's repeated batch flatter the engine? One batch repeated against
8 different batches in turn, unpadded and padded to the server's shape buckets."""
import json, os, statistics, sys, time
sys.path.insert(0, os.getcwd())
from tkr_embed.benchmark.raw import case_inputs, embed_items, load_on_worker
from tkr_embed.engine.shards import make_sharded_forward
import mlx.core as mx

model, b = sys.argv[1], int(sys.argv[2])
worker, emb = load_on_worker(model, sys.argv[3] if len(sys.argv) > 3 else "gpu")
if len(sys.argv) <= 3: worker.call(lambda: emb.model.set_dtype(mx.bfloat16))
fwd_plain = worker.call(make_sharded_forward, 0, "off", 64, "auto")
fwd_bucket = worker.call(make_sharded_forward, 0, "auto", 64, "auto")
worker.call(fwd_plain.adopt, emb)
batches = [[emb.prepare(it) for it in embed_items(case_inputs("short", b, offset=k * 1000))] for k in range(8)]
print("max lengths", [max(p.cost for p in bt) for bt in batches], flush=True)

def loop(fwd, which, seconds=2.0):
    n = 0; times = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        bt = batches[0] if which == "same" else batches[n % 8]
        s = time.perf_counter(); fwd(emb, bt); times.append(time.perf_counter() - s); n += 1
    return b / statistics.median(times), b * n / (time.perf_counter() - t0)

rows = {}
for name, fwd in (("plain", fwd_plain), ("bucketed", fwd_bucket)):
    for which in ("same", "rotate"):
        worker.call(loop, fwd, which, 3.0)  # warm: traces every shape
for r in range(3):
    for name, fwd in (("plain", fwd_plain), ("bucketed", fwd_bucket)):
        for which in ("same", "rotate"):
            med, sus = worker.call(loop, fwd, which)
            rows.setdefault(f"{name}-{which}", []).append((round(med, 1), round(sus, 1)))
print(json.dumps({"batch": b, "items_per_s (median-batch, sustained) per round": rows}), flush=True)
os._exit(0)
