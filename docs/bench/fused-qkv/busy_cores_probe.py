"""Ad hoc: the raw engine's batch-32 rate on short texts while N other host cores spin (as a
loaded server's front ends, load generator and engine loop keep them busy)."""
import json, os, statistics, subprocess, sys, time
sys.path.insert(0, os.getcwd())
from tkr_embed.benchmark.raw import case_inputs, embed_items, load_on_worker
from tkr_embed.engine.shards import make_sharded_forward
import mlx.core as mx

model, b = sys.argv[1], int(sys.argv[2])
device = sys.argv[3] if len(sys.argv) > 3 else "gpu"
worker, emb = load_on_worker(model, device)
if device == "gpu":
    worker.call(lambda: emb.model.set_dtype(mx.bfloat16))
fwd = worker.call(make_sharded_forward, 0, "auto", 64, "auto")
worker.call(fwd.adopt, emb)
batches = [[emb.prepare(it) for it in embed_items(case_inputs("short", b, offset=k * 1000))] for k in range(8)]

def loop(seconds=2.0):
    n = 0; times = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter(); fwd(emb, batches[n % 8]); times.append(time.perf_counter() - s); n += 1
    return round(b / statistics.median(times), 1)

worker.call(loop, 3.0)
levels = [0, 4, 8, 12] if device == "gpu" else [0, 1]
rows = {n: [] for n in levels}
for r in range(3):
    for n in (levels if r % 2 == 0 else levels[::-1]):
        spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        time.sleep(0.5)
        rows[n].append(worker.call(loop))
        for p in spin:
            p.kill()
        for p in spin:
            p.wait()
print(json.dumps({"batch": b, "cpu_count": os.cpu_count(), "items_per_s by spinning cores": rows}), flush=True)
os._exit(0)
