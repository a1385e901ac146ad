"""HTTP load generator: drives a tkr-embed server with N concurrent clients, from its own process.

    python bench/http_load.py --concurrency 1 32 --duration 20            # starts the dev server itself
    python bench/http_load.py --url http://127.0.0.1:8000 --concurrency 8  # an already running server

Each client sends single-text /embed/text requests back to back. Texts are unique per request
(a counter in the text) so the cache never answers; `--repeat` sends one fixed text to measure
cache hits instead. Reports requests/s and latency p50/p95/p99 per concurrency level, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("latency throughput cache batching vector search local embedding server model token image "
         "query passage retrieval agent memory index quantisation kernel").split()


def make_text(i: int, words: int) -> str:
    return f"request {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


async def run_level(url: str, concurrency: int, duration: float, words: int, repeat: bool) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def one_client():
            nonlocal errors
            while time.perf_counter() < stop_at:
                text = make_text(0 if repeat else next(counter), words)
                t0 = time.perf_counter()
                r = await client.post("/embed/text", json={"texts": [text]})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        # warm-up request per connection, not measured
        await asyncio.gather(*(client.post("/embed/text", json={"texts": ["warm"]}) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None  # noqa: E731
    return {
        "concurrency": concurrency, "requests": len(lat), "errors": errors,
        "requests_per_s": round(len(lat) / elapsed, 1),
        "latency_ms": {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99),
                       "mean": round(statistics.fmean(lat) * 1000, 2) if lat else None},
    }


def start_server(port: int, extra_env: dict) -> subprocess.Popen:
    env = {**os.environ, "EMBEDDING_LOG_LEVEL": "WARNING", **extra_env}
    proc = subprocess.Popen([sys.executable, "-m", "tkr_embed", "serve", "--config", str(ROOT / "config.dev.yaml"),
                             "--port", str(port)], env=env, cwd=ROOT)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--words", type=int, default=12)
    ap.add_argument("--repeat", action="store_true", help="one fixed text: measures cache hits")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    proc = None
    url = args.url
    if not url:
        proc = start_server(args.port, {} if args.repeat else {"EMBEDDING_CACHE_ENABLED": "false"})
        url = f"http://127.0.0.1:{args.port}"
    try:
        info = httpx.get(url + "/info").json()
        results = [asyncio.run(run_level(url, c, args.duration, args.words, args.repeat)) for c in args.concurrency]
        batcher = httpx.get(url + "/info").json()["batcher"]
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    report = {"model": info["model"]["id"], "words_per_text": args.words, "cache_hits": args.repeat,
              "duration_s": args.duration, "cpu_count": os.cpu_count(), "results": results,
              "server_batcher": batcher}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
