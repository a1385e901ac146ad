"""Does the way the MLX worker is fed make its batches slower, or leave it idle? One batch size, six ways of feeding it.

    python bench/worker_feed.py --model DIR --device gpu --dtype bfloat16 --rounds 3

On an H100 the server's worker took 1.16x the raw loop's time on a batch of the same bucketed
shape, most of it more CPU work on the worker's own thread, and nothing outside the engine process
reproduced it (docs/benchmarks.md, "The worker's time per batch shape"). The raw loop runs its
batches back to back in one worker job; the engine's event loop meanwhile answers the last batch
and reads new items from the front ends. This times the same forward (the server's: bucketed shapes where the backend pads to them,
the decoder compiled where the server's is) on batches of --batch fresh short texts, fed:

  loop     back to back inside one worker job (the raw loop of bench/ and `tkr-embed bench`)
  jobs     one worker job per batch, each submitted from an asyncio loop when the last one ends
  gap      as jobs, the loop sleeping --gap-ms between batches (the worker idles; nothing runs)
  churn    as jobs, the loop busy for --gap-ms between batches in Python (unpickling a batch
           of prepared items and pickling a batch of vectors, over and over: the engine's
           event loop's own work per batch), so the worker's core and caches are someone else's
           between its batches
  handoff  2 x --batch closed-loop asyncio clients, each item unpickled fresh as the link
           delivers it, batched by the event loop, which hands each batch to the worker as a job
           once it hears that the last one ended (the engine's Batcher until 2026-11-24)
  batcher  the same clients and the engine's Batcher (max_batch_items = --batch): the worker
           takes each next batch itself, on its own thread, as the last one ends. With handoff,
           the engine process without its front ends and sockets

Each batch is timed inside the worker job (wall and the worker thread's CPU), so the handoff
itself is not in the batch time; the worker's idle time from the end of one batch to the start of
the next says what it costs. Modes alternate within each round. Prints one JSON line: per mode
and round the median ms per batch, worker CPU ms per batch and idle ms between batches, batches
per second and their mean size, and the median ratio of each mode's batch time to loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("loop", "jobs", "gap", "churn", "handoff", "batcher")


class TimedForward:
    """The engine's forward, timing each call on the worker thread (wall and thread CPU)."""

    def __init__(self, forward, embedder):
        self.forward, self.embedder = forward, embedder
        self.reset()

    def __call__(self, batch):
        start, cpu = time.perf_counter(), time.thread_time()
        if self._last_end is not None:
            self.idle.append(start - self._last_end)
        out = self.forward(self.embedder, batch)
        self.cpu.append(time.thread_time() - cpu)
        self._last_end = time.perf_counter()
        self.wall.append(self._last_end - start)
        self.rows.append(len(batch))
        return out

    def reset(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.idle: list[float] = []  # from the end of one batch to the start of the next
        self.rows: list[int] = []
        self._last_end: float | None = None


def churn(frames: list[bytes], answer: bytes, seconds: float) -> None:
    """The engine's event loop's kind of work, for `seconds`: items in, vectors out."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for f in frames:
            pickle.loads(f)
        pickle.loads(answer)


async def feed(mode: str, worker, timed: TimedForward, batches: list[list], seconds: float, gap_s: float,
               clients: int, batch: int) -> int:
    """Run `mode` for `seconds`; returns the batches the worker ran."""
    from tkr_embed.benchmark.raw import closed_loop, link_frames
    from tkr_embed.engine.batcher import Batcher

    if mode == "loop":
        def run_loop() -> int:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                timed(batches[n % len(batches)])
                n += 1
            return n

        return await worker.submit(run_loop)
    frames = link_frames(batches[0])
    answer = pickle.dumps([b"\0" * (4 * timed.embedder.dimension)] * batch, protocol=pickle.HIGHEST_PROTOCOL)
    if mode in ("jobs", "gap", "churn"):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await worker.submit(timed, batches[n % len(batches)])
            n += 1
            if mode == "gap":
                await asyncio.sleep(gap_s)
            elif mode == "churn":
                churn(frames, answer, gap_s)
        return n
    items = [f for _ in range(2) for f in frames]  # one frame per item, reused in turn
    stop = time.perf_counter() + seconds
    if mode == "handoff":
        return await handoff(worker, timed, items, stop, clients, batch)
    batcher = Batcher(worker, timed, max_batch_tokens=1 << 20,
                      max_batch_items=batch, max_queue_items=1 << 16,
                      padded_tokens=timed.forward.padded_tokens(timed.embedder.max_tokens))
    batcher.start()

    await closed_loop(batcher.submit, items, clients, stop)
    await batcher.stop()
    while batcher.lanes_busy:  # the last batch off the worker before the next mode's clock starts
        await asyncio.sleep(0.005)
    return batcher.batches_run


async def handoff(worker, timed: TimedForward, items: list[bytes], stop: float, clients: int, batch: int) -> int:
    """Closed-loop clients whose batches the event loop takes and hands to the worker, one job each,
    once it hears that the last one ended: the engine's Batcher before the nineteenth session made
    the worker take them itself."""
    from tkr_embed.engine.batcher import plan_batch

    loop = asyncio.get_running_loop()
    pending: list[tuple] = []  # (prepared, future, seq)
    wake = asyncio.Event()
    seq = itertools.count()
    padded = timed.forward.padded_tokens(timed.embedder.max_tokens)
    runs = [0]

    async def batches() -> None:
        while True:
            await wake.wait()
            chosen = set(plan_batch([p.cost for p, _, _ in pending], [s for _, _, s in pending], 1 << 20, batch,
                                    0.0, padded))
            entries = [e for i, e in enumerate(pending) if i in chosen]
            pending[:] = [e for i, e in enumerate(pending) if i not in chosen]
            if not pending:
                wake.clear()
            vectors = await worker.submit(timed, [p for p, _, _ in entries])
            runs[0] += 1
            for (_, fut, _), vec in zip(entries, vectors):
                fut.set_result(vec)

    async def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            fut = loop.create_future()
            pending.append((pickle.loads(items[i % len(items)]), fut, next(seq)))
            wake.set()
            await fut
            i += clients

    task = loop.create_task(batches())
    await asyncio.gather(*(client(k) for k in range(clients)))
    task.cancel()
    return runs[0]


def main() -> None:
    from tkr_embed.benchmark.raw import prepared_inputs, sharded_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=1.0, help="gap and churn: the loop's time between batches")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--shape-buckets", default="auto", choices=["auto", "on", "off"],
                    help="engine.shape_buckets (auto: on CUDA); on pads on any backend")
    args = ap.parse_args()

    worker, emb, forward = sharded_engine(args.model, args.device, 0, args.dtype, shape_buckets=args.shape_buckets)
    batches = [prepared_inputs(emb, "short", args.batch, offset=k * 1000) for k in range(8)]
    timed = TimedForward(forward, emb)
    rows: dict[str, dict[str, list]] = {m: {"ms": [], "cpu_ms": [], "idle_ms": [], "batches_per_s": [],
                                            "mean_rows": []}
                                        for m in args.modes}

    async def run() -> None:
        for mode in args.modes:  # every shape these modes run traced and compiled, allocator warm
            await feed(mode, worker, timed, batches, 1.0, args.gap_ms / 1000, 2 * args.batch, args.batch)
        for r in range(args.rounds):
            for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
                timed.reset()
                t0 = time.perf_counter()
                n = await feed(mode, worker, timed, batches, args.seconds, args.gap_ms / 1000, 2 * args.batch,
                               args.batch)
                elapsed = time.perf_counter() - t0
                row = rows[mode]
                row["ms"].append(round(1000 * statistics.median(timed.wall), 2))
                row["cpu_ms"].append(round(1000 * statistics.median(timed.cpu), 2))
                row["idle_ms"].append(round(1000 * statistics.median(timed.idle), 3) if timed.idle else None)
                row["batches_per_s"].append(round(n / elapsed, 1))
                row["mean_rows"].append(round(statistics.mean(timed.rows), 1))
                print(f"round {r + 1} {mode}: {row['ms'][-1]} ms, cpu {row['cpu_ms'][-1]} ms, "
                      f"idle between batches {row['idle_ms'][-1]} ms, {row['batches_per_s'][-1]} batches/s "
                      f"of {row['mean_rows'][-1]}", file=sys.stderr, flush=True)

    asyncio.run(run())
    ratios = {}
    if "loop" in rows:
        for mode, row in rows.items():
            ratios[mode] = round(statistics.median(x / q for q, x in zip(rows["loop"]["ms"], row["ms"])), 3)
    shapes = forward.shape_times()
    print(json.dumps({"device": args.device, "dtype": args.dtype, "batch": args.batch, "gap_ms": args.gap_ms,
                      "modes": {m: {k: v for k, v in row.items() if v} for m, row in rows.items()},
                      "ms_vs_loop": ratios, "shapes": shapes}), flush=True)
    os._exit(0)  # MLX-CUDA 0.32.4 aborts at interpreter exit with the worker's stream alive (raw.py)


if __name__ == "__main__":
    main()
