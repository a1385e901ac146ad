"""The ceilings a server is measured against: batched forward passes with no HTTP, no queue, no cache.

    python -m tkr_embed.benchmark.raw mlx   --model DIR --case short --batch 1 8 32 --seconds 5
    python -m tkr_embed.benchmark.raw torch --model DIR --case short --batch 1 8 32 --seconds 5

`mlx` is tkr-embed's own engine (the embedder's forward on the MLX worker thread); `torch` is the
same model in transformers + torch (the references of tests/correctness). Inputs are prepared
(tokenised, images decoded) before the clock starts: only the forward pass is timed. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from .cases import INGEST_WORDS, LONG_WORDS, SHORT_WORDS, ImageMaker, make_text


def case_inputs(case: str, n: int, image_side: int = 128, offset: int = 0) -> list[tuple[str | None, bytes | None]]:
    """(text, PNG bytes) for n distinct items of a case; offset: start further along the numbers
    (another set of n distinct items)."""
    base = 10**11 + offset  # written into the texts as cases.request_number(i), as the load generator's are
    images = ImageMaker(image_side) if case in ("image", "fused") else None
    png = images.png if images else None

    ids = range(base, base + n)
    if case == "short":
        return [(make_text(i, SHORT_WORDS), None) for i in ids]
    if case == "long":
        return [(make_text(i, LONG_WORDS), None) for i in ids]
    if case == "ingest":
        # Documents as ingest requests carry them, their lengths spread evenly over the same
        # 4..190 words for every batch size, so each batch has the requests' mean length (~97
        # words): the first n of the requests' hashed lengths would make batch sizes differ by mix.
        lo, hi = INGEST_WORDS
        return [(make_text(i, lo + (2 * k + 1) * (hi - lo + 1) // (2 * n)), None) for k, i in enumerate(ids)]
    if case == "image":
        return [(None, png(i)) for i in ids]
    if case == "fused":
        return [(make_text(i, SHORT_WORDS), png(i)) for i in ids]
    raise ValueError(f"no raw measurement for case {case!r}")


def embed_items(inputs: list[tuple[str | None, bytes | None]]) -> list:
    """case_inputs' (text, PNG bytes) pairs as the EmbedItems a server would make of them
    (decoded RGB images), for forwards timed without HTTP."""
    import io

    from PIL import Image

    from ..models.base import DecodedImage, EmbedItem

    items = []
    for i, (text, png) in enumerate(inputs):
        imgs = ()
        if png is not None:
            imgs = (DecodedImage(image=Image.open(io.BytesIO(png)).convert("RGB"), digest=str(i)),)
        items.append(EmbedItem(text=text, images=imgs))
    return items


def prepared_inputs(embedder, case: str, n: int, image_side: int = 128, offset: int = 0) -> list:
    """n distinct items of a case, prepared by the embedder (tokenised, images decoded)."""
    return [embedder.prepare(it) for it in embed_items(case_inputs(case, n, image_side, offset))]


def link_frames(items: list) -> list[bytes]:
    """Each prepared item pickled alone, as the engine's link carries it (closed_loop's input)."""
    import pickle

    return [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in items]


async def closed_loop(submit, frames: list[bytes], clients: int, stop: float, jitter_s: float = 0.0) -> None:
    """`clients` coroutines, each sending one prepared item (unpickled fresh from `frames`, as the
    engine's link delivers it) through submit (a Batcher's contract: one future per item) and
    awaiting it, until `stop` (perf_counter); each first waits 0..jitter_s."""
    import asyncio
    import pickle
    import random

    rng = random.Random(clients)

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            if jitter_s:
                await asyncio.sleep(rng.uniform(0, jitter_s))
            await asyncio.gather(*submit([pickle.loads(frames[i % len(frames)])]))
            i += clients

    await asyncio.gather(*(client(k) for k in range(clients)))


def add_forward_arguments(ap) -> None:
    """The options of the bench/ scripts that time one model's forward on prepared batches
    (stream_overlap, fused_projections): model, cases, batch sizes, time, rounds, device."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--case", nargs="+", default=["short"], choices=["short", "long", "ingest", "image", "fused"])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--image-side", type=int, default=448)


def time_batches(run: Callable[[], object], batch: int, seconds: float) -> dict:
    run()  # warm-up (compilation, allocator)
    times = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 3:
        s = time.perf_counter()
        run()
        times.append(time.perf_counter() - s)
    times.sort()
    median = times[len(times) // 2]
    return {"batch": batch, "items_per_s": round(batch / median, 1), "median_batch_ms": round(median * 1000, 2),
            "runs": len(times)}


def load_on_worker(model: str, device: str = "cpu"):
    """A started MLX worker for `device` and the model loaded on it: (worker, embedder). Every
    later MLX call goes through worker.call."""
    from ..engine.worker import MLXWorker
    from ..models.registry import load_embedder, resolve_model_dir

    worker = MLXWorker(device)
    worker.start()
    return worker, worker.call(load_embedder, resolve_model_dir(model), "none").embedder


def sharded_engine(model: str, device: str = "cpu", cpu_shards: int = 0, dtype: str | None = None,
                   shape_buckets: str = "off"):
    """The engine's own forward on a started worker: (worker, embedder, forward), the forward
    split across CPU streams as the server does (engine.cpu_shards), by default never padded to
    shape buckets (the server's padding counts against the server, not here; shape_buckets="on"
    pads as a CUDA server does, for bench/ scripts that compare its batches shape by shape), its
    decoder compiled where the server's would be (engine.compile: auto), packed where the
    server's would be."""
    from ..engine.shards import make_sharded_forward

    worker, emb = load_on_worker(model, device)
    forward = worker.call(make_sharded_forward, cpu_shards, shape_buckets, 64, "auto")
    if dtype:
        import mlx.core as mx

        worker.call(lambda: emb.model.set_dtype(getattr(mx, dtype)))
    worker.call(forward.adopt, emb)
    return worker, emb, forward


def mlx_engine(model: str, case: str, batches: list[int], seconds: float, device: str, dtype: str | None,
               image_side: int = 128, cpu_shards: int = 0, cpu_replicas: int = 0) -> dict:
    """Each batch size timed on the engine's CPU streams (or its one device stream) and, where the
    server would run replicas (engine.cpu_replicas), on that many replica processes as well: a
    row's items_per_s is the better of the two, so the server is held to the best the engine does."""
    from ..blas import describe
    from ..cores import available_cores
    from ..engine.replicas import resolve_replicas

    worker, emb, sharded = sharded_engine(model, device, cpu_shards, dtype)
    replicas = resolve_replicas(cpu_replicas, sharded.on_cpu, sharded.packs(emb), available_cores(),
                                bucketed=sharded.buckets is not None)
    # a replica loads the model as the server does: not with a dtype forced here
    replicas = replicas if replicas > 1 and not dtype else 0
    lanes = start_replica_lanes(model, replicas, sharded.pack) if replicas else []
    rows = []
    for b in batches:
        prepared = prepared_inputs(emb, case, b, image_side)
        row = worker.call(time_batches, lambda: sharded(emb, prepared), b, seconds)
        row["tokens_per_item"] = max(p.cost for p in prepared)
        if lanes:
            row["layout"] = "streams"
            row["streams_items_per_s"] = row["items_per_s"]
            row["replicas_items_per_s"] = time_replicas(lanes, prepared, seconds)
            if row["replicas_items_per_s"] > row["items_per_s"]:
                row["items_per_s"], row["layout"] = row["replicas_items_per_s"], "replicas"
        rows.append(row)
        print(f"batch {b}: {row}", file=sys.stderr, flush=True)
    for lane in lanes:
        lane.stop()
    return {"system": "mlx-engine", "model": emb.model_id, "case": case, "blas": describe(),
            "cpu_shards": sharded.shards, "cpu_replicas": replicas, "compiled": bool(getattr(emb, "compiled", False)),
            "packed_sequences": sharded.packs(emb),
            "cpu_buffer_cache_mb": worker.cpu_buffer_cache_mb,
            "results": rows}


def start_replica_lanes(model: str, n: int, pack: bool) -> list:
    """n of the engine's replica processes (engine/replicas.py) with the model loaded as the
    streams' copy is (load_on_worker), on the CPU backend."""
    from ..engine.replicas import ReplicaLane, start_all
    from ..models.registry import resolve_model_dir

    load_args = ("none", None, None, None)  # as load_on_worker loads the streams' copy
    lanes = [ReplicaLane(i, resolve_model_dir(model), load_args, 0, pack) for i in range(n)]
    start_all(lanes)
    return lanes


def time_replicas(lanes: list, prepared: list, seconds: float) -> float:
    """Items/s of every replica running the batch again and again at once, each on its own
    thread here: the sum of each replica's batch / its median batch time (as time_batches)."""
    from concurrent.futures import ThreadPoolExecutor

    for lane in lanes:
        lane.forward(prepared)  # warm-up at this shape
    with ThreadPoolExecutor(len(lanes)) as pool:
        rows = list(pool.map(lambda lane: time_batches(lambda: lane.forward(prepared), len(prepared), seconds), lanes))
    return round(sum(r["items_per_s"] for r in rows), 1)


def torch_forward(model: str, case: str, batches: list[int], seconds: float, device: str, dtype: str,
                  image_side: int = 128) -> dict:
    import io
    import json as _json
    from pathlib import Path

    import torch
    from PIL import Image

    from ..cores import available_cores
    from ..models.registry import resolve_model_dir
    from .torch_reference import Qwen2VLReference, SentenceTransformerReference

    path = resolve_model_dir(model).path
    torch.set_num_threads(available_cores())  # the cores it may use (bench --server-cpus), not the machine's
    arch = _json.loads((Path(path) / "config.json").read_text()).get("model_type", "")
    if arch.startswith("qwen2"):
        ref = Qwen2VLReference(path, device=device, dtype=dtype)
        make = lambda data: ref.inputs([(t or "", [Image.open(io.BytesIO(p)).convert("RGB")] if p else [], None)  # noqa: E731
                                        for t, p in data])
    else:
        if case not in ("short", "long", "ingest"):
            raise SystemExit(f"{arch} is a text model: no {case} case")
        ref = SentenceTransformerReference(path)
        ref.model.to(device)
        make = lambda data: {k: v.to(device) for k, v in ref.inputs([t for t, _ in data]).items()}  # noqa: E731

    def run(inputs):
        out = ref.forward(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    rows = []
    for b in batches:
        inputs = make(case_inputs(case, b, image_side))
        rows.append(time_batches(lambda: run(inputs), b, seconds))
    return {"system": "torch", "model": str(path), "case": case, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": device, "results": rows}


def best(result: dict) -> dict:
    return max(result["results"], key=lambda r: r["items_per_s"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("system", choices=["mlx", "torch"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--case", default="short")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--device", default=None, help="mlx: auto|cpu|gpu; torch: cpu|cuda")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    ap.add_argument("--image-side", type=int, default=128)
    ap.add_argument("--cpu-shards", type=int, default=0, help="mlx: engine.cpu_shards (0: one per core on Linux CPU)")
    ap.add_argument("--cpu-replicas", type=int, default=0,
                    help="mlx: engine.cpu_replicas (0: auto, as the server; 1: streams only)")
    args = ap.parse_args(argv)
    if args.system == "mlx":
        out = mlx_engine(args.model, args.case, args.batch, args.seconds, args.device or "auto", args.dtype,
                         args.image_side, args.cpu_shards, args.cpu_replicas)
    else:
        out = torch_forward(args.model, args.case, args.batch, args.seconds, args.device or "cpu",
                            args.dtype or "float32", args.image_side)
    out["best"] = best(out)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    # The process ends here without tearing MLX down: on MLX-CUDA 0.32.4 the interpreter's exit,
    # with the worker thread still holding its stream, aborted ("terminate called without an
    # active exception") after the results were complete.
    os._exit(0)


if __name__ == "__main__":
    main()
