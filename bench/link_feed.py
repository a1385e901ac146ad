"""Does the link's traffic slow the engine's MLX worker? The engine's own service, fed three ways.

    python bench/link_feed.py --model DIR --device gpu --rounds 2

In a server with front ends the worker took 1.16x the raw loop's time on a batch of the same
shape (docs/benchmarks.md, "The worker's time per batch shape"), while in the engine process
without front ends, how the worker was fed cost the batch at most 1.7% (bench/worker_feed.py).
This runs the engine process's parts as serving.py does (EmbeddingService, its Batcher and MLX
worker, and EngineHost on a Unix socket; model settings from config.dev.yaml, cache off) and
feeds them, alternating in each round:

  raw     the service's own forward in a loop on its worker, --batch fresh short texts at a time
  inproc  --clients closed-loop asyncio clients in this process, one fresh (unpickled) prepared
          short text per request, straight into the service's batcher
  link    the same number of clients spread over --processes front-end processes (FrontendService,
          linked as serving.py's front ends are, without HTTP): the engine's event loop reads and
          answers their frames
  raw-busy, link-busy
          raw and link beside --spin processes computing in pure Python: host cores as busy as
          a loaded server's HTTP front ends and load generator keep them
  link-jitter
          link, each client waiting 0..--jitter-ms (uniform) before each request, so that items
          reach the engine one or two per frame, as they do behind HTTP front ends, rather than
          in bursts of a front end's clients answered together

For each mode: the items/s over the measured span, the worker's busy share, and its time per
bucketed shape from the engine's tally (`/info` worker.shapes; backends with shape buckets, or
--shape-buckets on). If link's batches cost more than inproc's at the same shape, the traffic of
the link is what slows the worker; if not, what does is the HTTP front ends or the host.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("raw", "inproc", "link", "raw-busy", "link-busy", "link-jitter")


def settings_for(model: str, device: str, shape_buckets: str):
    from tkr_embed.config import load_settings

    return load_settings(ROOT / "config.dev.yaml", env={}, overrides={
        "model.path": model, "model.device": device, "model.quantization": "none", "cache.enabled": False,
        "logging.level": "WARNING", "engine.shape_buckets": shape_buckets})


def front_end(path: str, model: str, device: str, shape_buckets: str, clients: int, seconds: float,
              offset: int, jitter_s: float = 0.0) -> None:
    """A front-end process: linked to the engine, then closed-loop clients for `seconds`."""
    from tkr_embed.benchmark.raw import closed_loop, link_frames, prepared_inputs
    from tkr_embed.engine.remote import FrontendService

    async def run() -> None:
        front = FrontendService(settings_for(model, device, shape_buckets), path)
        await front.start()
        frames = link_frames(prepared_inputs(front.loaded.embedder, "short", 512, offset=offset))
        await closed_loop(front.batcher.submit, frames, clients, time.perf_counter() + seconds, jitter_s)
        await front.stop()

    asyncio.run(run())


def shape_ms(before: list[dict] | None, after: list[dict] | None) -> list[dict]:
    from tkr_embed.engine.shapes import per_batch_ms

    return per_batch_ms(after, before or ()) if after is not None else []


async def measure(mode: str, service, host, args, path: str, frames: list[bytes], batches: list[list]) -> dict:
    """Run `mode` for warm-up + measured seconds; figures over the measured span only."""
    from tkr_embed.benchmark.raw import closed_loop

    worker, batcher = service.worker, service.batcher
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.spin if mode.endswith("-busy") else 0)]
    jitter_s = args.jitter_ms / 1000 if mode.endswith("-jitter") else 0.0
    mode = mode.removesuffix("-busy").removesuffix("-jitter")
    span_end = time.perf_counter() + args.warmup + args.seconds
    procs: list[subprocess.Popen] = []
    if mode == "raw":
        def loop() -> None:
            n = 0
            while time.perf_counter() < span_end:
                service.sharded(service.loaded.embedder, batches[n % len(batches)])
                n += 1
        running = worker.submit(loop)
    elif mode == "inproc":
        running = asyncio.ensure_future(closed_loop(batcher.submit, frames, args.clients, span_end))
    else:
        per = args.clients // args.processes
        for k in range(args.processes):
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import link_feed as f; "
                    f"f.front_end({path!r}, {args.model!r}, {args.device!r}, {args.shape_buckets!r}, {per}, "
                    f"{args.warmup + args.seconds + 2}, {1000 * (k + 1)}, {jitter_s})")
            procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=str(ROOT)))
        # the clock starts once every front end is linked and sending
        items_before = batcher.items_run
        for _ in range(1200):
            if host.connections >= args.processes and batcher.items_run > items_before:
                break
            await asyncio.sleep(0.05)
        span_end = time.perf_counter() + args.warmup + args.seconds
        running = None
    await asyncio.sleep(args.warmup)
    t0, items0, busy0, shapes0 = time.perf_counter(), batcher.items_run, worker.busy_seconds, service.shape_times()
    await asyncio.sleep(args.seconds)
    t1, items1, busy1, shapes1 = time.perf_counter(), batcher.items_run, worker.busy_seconds, service.shape_times()
    if running is not None:
        await running
    while any(p.poll() is None for p in procs):  # serving them until they are done
        await asyncio.sleep(0.05)
    for p in spinners:
        p.kill()
        p.wait()
    span = t1 - t0
    out = {"seconds": round(span, 2), "shapes": shape_ms(shapes0, shapes1)}
    if mode == "raw":  # the raw loop runs inside one job: its figures are the tally's alone
        done = sum(s["batches"] for s in out["shapes"])
        out["batches_per_s"] = round(done / span, 1)
    else:
        out["items_per_s"] = round((items1 - items0) / span, 1)
        out["worker_busy_share"] = round((busy1 - busy0) / span, 3)
    return out


async def engine(args) -> dict:
    from tkr_embed.benchmark.raw import link_frames, prepared_inputs
    from tkr_embed.engine.link import EngineHost
    from tkr_embed.engine.service import EmbeddingService

    service = EmbeddingService(settings_for(args.model, args.device, args.shape_buckets))
    host = EngineHost(service)
    service.on_batch = host.observe_batch
    await service.start()
    path = os.path.join(tempfile.mkdtemp(), "engine.sock")
    await host.start(path)

    emb = service.loaded.embedder
    frames = link_frames(prepared_inputs(emb, "short", 512))
    batches = [prepared_inputs(emb, "short", args.batch, offset=100 + 1000 * k) for k in range(8)]
    results: dict[str, list[dict]] = {m: [] for m in args.modes}
    for r in range(args.rounds):
        for mode in (args.modes if r % 2 == 0 else args.modes[::-1]):
            res = await measure(mode, service, host, args, path, frames, batches)
            results[mode].append(res)
            top = sorted(res["shapes"], key=lambda s: -s["batches"])[:3]
            print(f"round {r + 1} {mode}: {res.get('items_per_s', res.get('batches_per_s'))}/s, busy "
                  f"{res.get('worker_busy_share')}, shapes {top}", file=sys.stderr, flush=True)
    await host.stop()
    await service.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="gpu", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--shape-buckets", default="auto", choices=["auto", "on", "off"],
                    help="engine.shape_buckets (auto: on CUDA); the tally needs them")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--processes", type=int, default=8, help="link: front-end processes")
    ap.add_argument("--batch", type=int, default=32, help="raw: items per batch")
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jitter-ms", type=float, default=2.0, help="link-jitter: most a client waits before a request")
    ap.add_argument("--spin", type=int, default=12, help="raw-busy, link-busy: busy processes beside")
    ap.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    args = ap.parse_args()
    results = asyncio.run(engine(args))
    summary = {}
    for mode, rows in results.items():
        rate = [r.get("items_per_s", r.get("batches_per_s")) for r in rows]
        summary[mode] = {"rate_median": statistics.median(rate)}
    print(json.dumps({"args": vars(args), "rounds": results, "summary": summary}), flush=True)
    os._exit(0)  # MLX-CUDA 0.32.4 aborts at interpreter exit with the worker's stream alive (raw.py)


if __name__ == "__main__":
    main()
