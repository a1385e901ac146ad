"""Closed-loop HTTP load generator: N concurrent keep-alive clients, each sending its next request
as soon as the previous answer arrives, for a fixed duration. Runs in its own process.

It speaks just enough HTTP/1.1 (pre-encoded requests, Content-Length or chunked answers) to cost
far less CPU per request than a general client: the server and this generator share the machine,
and at thousands of requests per second httpx alone would saturate a core and measure itself.

    python -m tkr_embed.benchmark.loadgen --url http://127.0.0.1:8000 --case short \
        --api openai --model NAME --concurrency 32 --duration 10
prints one JSON object: requests/s, latency p50/p95/p99 (ms), errors and their first statuses.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import queue
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from .cases import build_case, items_per_request


class HTTPError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    else:
        raise HTTPError("response without a length")
    return status, body


def encode_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode("latin-1") + body


def quantile_ms(lat: list[float], p: float) -> float | None:
    """The p-quantile of sorted latencies (seconds), in milliseconds."""
    return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None


async def run_level(url: str, requests, concurrency: int, duration: float,
                    headers: dict[str, str] | None = None, warmup: int = 1, warmup_seconds: float = 0,
                    prebuilt: list[tuple[str, bytes]] | None = None, first_number: int | None = None,
                    start_barrier=None, ready_file: str | None = None) -> dict:
    """requests(i) -> (path, body bytes) for the i-th request of the run. Each client sends
    `warmup` requests on its own first; then all run together, unmeasured for `warmup_seconds`
    (a backend that compiles each new batch shape once reaches its steady state), then measured
    for `duration`: only requests sent after the measurement began count. `prebuilt` requests
    (built before the clock, see prebuild()) are sent first; numbers for any built during the
    run start at `first_number`. start_barrier: a blocking call made once every connection is
    ready (several generator processes start their clocks together: see run_split_level).
    ready_file: created once every request is built and every connection is ready, as the load
    begins (its unmeasured warm-up seconds, then the measured ones; a profiler starts its counters
    then: bench/profile_server.py)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    headers = headers or {}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    first_error: list[str] = []
    # Request numbers go into the texts and images: they must never repeat against one server, or
    # the cache answers. A random 12-digit base per level (same digit count: same token count).
    counter = itertools.count(first_number or random.randrange(10**11, 9 * 10**11))
    ready_made = collections.deque(prebuilt or ())
    built_live = [0]

    async def one(reader, writer, i) -> tuple[int, bytes]:
        if ready_made:
            path, body = ready_made.popleft()
        else:
            built_live[0] += 1
            path, body = requests(i)
        writer.write(encode_request(host, path, body, headers))
        return await read_response(reader)

    start = asyncio.Event()
    ready = 0
    stop_at = [0.0]
    measure_from = [0.0]

    reconnects = [0]

    async def client() -> None:
        nonlocal ready
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(warmup):  # connection set-up and first-request costs, not measured
                await one(reader, writer, next(counter))
            ready += 1
            await start.wait()
            first = True
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    status, body = await one(reader, writer, next(counter))
                except (asyncio.IncompleteReadError, ConnectionError):
                    if not first:
                        raise
                    # The server closed this connection while it sat idle waiting for the others
                    # to warm up (keep-alive timeout): reconnect, as HTTP client pools do.
                    writer.close()
                    reconnects[0] += 1
                    reader, writer = await asyncio.open_connection(host, port)
                    t0 = time.perf_counter()
                    status, body = await one(reader, writer, next(counter))
                first = False
                if t0 < measure_from[0]:
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    statuses[status] = statuses.get(status, 0) + 1
                    if not first_error:
                        first_error.append(body[:300].decode("utf-8", "replace"))
        finally:
            writer.close()

    # Two phases: every connection opens and warms up, then the clock starts for all at once.
    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    while ready < concurrency and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    if start_barrier is not None:
        await asyncio.get_running_loop().run_in_executor(None, start_barrier)
    if ready_file:
        Path(ready_file).touch()
    t0 = measure_from[0] = time.perf_counter() + warmup_seconds
    stop_at[0] = t0 + duration
    start.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    lat = sorted(latencies)

    return level_result(concurrency, lat, elapsed, statuses, first_error[0] if first_error else None,
                        failures, reconnects[0], built_live[0])


def level_result(concurrency: int, lat: list[float], elapsed: float, statuses: dict[int, int],
                 first_error: str | None, failures: list[str], reconnects: int, built_live: int) -> dict:
    """One level's figures from its sorted latencies (seconds) and error counts."""
    return {
        "concurrency": concurrency, "requests": len(lat), "seconds": round(elapsed, 2),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": quantile_ms(lat, 0.50), "p95_ms": quantile_ms(lat, 0.95), "p99_ms": quantile_ms(lat, 0.99),
        "errors": sum(statuses.values()), "error_statuses": statuses, "first_error": first_error,
        "client_failures": failures[:3], "reconnects": reconnects, "built_live": built_live,
        "latencies": lat,
    }


def merge_levels(parts: list[dict]) -> dict:
    """Several generator processes' results for one level as one (their clocks started together)."""
    lat = sorted(x for p in parts for x in p["latencies"])
    elapsed = max(p["seconds"] for p in parts)
    statuses: dict[int, int] = {}
    for p in parts:
        for k, v in p["error_statuses"].items():
            statuses[k] = statuses.get(k, 0) + v

    merged = level_result(sum(p["concurrency"] for p in parts), lat, elapsed, statuses,
                          next((p["first_error"] for p in parts if p["first_error"]), None),
                          [f for p in parts for f in p["client_failures"]],
                          sum(p["reconnects"] for p in parts), sum(p["built_live"] for p in parts))
    merged["processes"] = len(parts)
    return merged


def _level_process(args: argparse.Namespace, concurrency: int, share: float, barrier, results) -> None:
    results.put(_one_level(args, concurrency, share, barrier.wait))


def _one_level(args: argparse.Namespace, concurrency: int, share: float = 1.0, start_barrier=None) -> dict:
    """share: this process's part of the level's prebuilt requests."""
    requests = build_case(args.case, args.path, args.model, args.image_side)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    count = int(args.prebuild_rate * (args.warmup_seconds + args.duration) * share)
    ready, next_number = prebuild(args.case, args.path, args.model, args.image_side, count) if count else ([], None)
    try:
        import uvloop  # a cheaper event loop where installed
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(run_level(args.url, requests, concurrency, args.duration, headers,
                            warmup_seconds=args.warmup_seconds, prebuilt=ready, first_number=next_number,
                            start_barrier=start_barrier, ready_file=args.ready_file))


def run_split_level(args: argparse.Namespace, concurrency: int) -> dict:
    """One level from args.processes generator processes, the clients split between them: at
    thousands of requests/s one generator's event loop answers a finished batch's 64 responses
    one after another, a delay no set of 64 real clients has."""
    import multiprocessing

    n = min(args.processes, concurrency)
    if n == 1:
        return _with_items(_one_level(args, concurrency), args.case)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
    procs = [ctx.Process(target=_level_process, args=(args, c, c / concurrency, barrier, results)) for c in shares]
    for p in procs:
        p.start()
    parts: list[dict] = []
    while len(parts) < n:
        try:
            parts.append(results.get(timeout=1))
        except queue.Empty:  # a process that died without its result would leave us waiting forever
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"a load-generator process failed (exit codes {failed})") from None
    for p in procs:
        p.join()
    return _with_items(merge_levels(parts), args.case)


def _with_items(level: dict, case: str) -> dict:
    """Items (vectors) per second beside requests: the `ingest` case sends many per request."""
    level["items_per_request"] = items_per_request(case)
    level["items_per_s"] = round(level["requests"] * level["items_per_request"] / level["seconds"], 1)
    return level


def _build(case: str, path: str, model: str, image_side: int, numbers: range) -> list[tuple[str, bytes]]:
    requests = build_case(case, path, model, image_side)
    return [requests(i) for i in numbers]


def prebuild(case: str, path: str, model: str, image_side: int, count: int) -> tuple[list, int]:
    """`count` distinct requests built in parallel processes before a level starts, and the next
    free request number. Building a 448-pixel PNG request took ~24 ms: built during the run, in
    this one process, it capped an image level near 40 requests/s whatever the server did."""
    from concurrent.futures import ProcessPoolExecutor

    from ..cores import available_cores

    base = random.randrange(10**11, 8 * 10**11)
    workers = min(available_cores(), 16)  # the generator's cores (bench --loadgen-cpus), not the machine's
    step = -(-count // workers) if count else 1
    chunks = [range(base + k, min(base + k + step, base + count)) for k in range(0, count, step)]
    with ProcessPoolExecutor(workers) as pool:
        parts = pool.map(_build, *zip(*[(case, path, model, image_side, c) for c in chunks])) if chunks else []
        built = [r for part in parts for r in part]
    return built, base + count


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--path", default="/v1/embeddings")
    ap.add_argument("--case", default="short")
    ap.add_argument("--model", default="default")
    ap.add_argument("--api-key")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1])
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup-seconds", type=float, default=0, help="per level, run unmeasured this long first")
    ap.add_argument("--image-side", type=int, default=128)
    ap.add_argument("--prebuild-rate", type=float, default=0,
                    help="build (warm-up + duration) x this many requests before each level, in parallel "
                         "processes (image cases: building a PNG request costs the generator milliseconds)")
    ap.add_argument("--processes", type=int, default=1,
                    help="generator processes, the clients split between them (clocks started together)")
    ap.add_argument("--ready-file", help="create this file as the load begins (requests built, connections ready)")
    args = ap.parse_args(argv)
    out = []
    for c in args.concurrency:
        level = run_split_level(args, c)
        level.pop("latencies")
        out.append(level)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
