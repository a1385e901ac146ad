"""What one request costs the event loop, in process: the app (create_app with config.dev.yaml, the
packaged MiniLM) driven through its ASGI interface, no sockets, no uvicorn, no load generator on
the same cores. It isolates the request path (middlewares, routing, body parsing, the service,
the batcher hand-off) from HTTP and from the machine's noise, which hides changes of ~0.1 ms
per request in bench/profile_server.py's server-level figures.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_THREAD_TIMEOUT=4 \
        python bench/request_path.py --modes hit miss --routes /v1/embeddings /embed/text --rounds 3

hit: one repeated short text (a cache hit: the whole path but the engine), one caller after
another. miss: a new short text each request from --concurrency callers (tokeniser pool,
batcher and MLX worker included). Per round it prints the loop thread's CPU per request
(time.thread_time), then one profiled pass's Python function calls per request on the loop: a
count that does not move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import json
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from tkr_embed.api.app import create_app  # noqa: E402
from tkr_embed.config import load_settings  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog near the river bank".split()
NUMBERS = itertools.count()  # miss mode: every text new, across rounds and passes


def request_body(route: str, model: str, text: str) -> bytes:
    return orjson.dumps({"model": model, "input": text} if route.startswith("/v1/") else {"texts": [text]})


async def call(app, route: str, body: bytes) -> None:
    """One POST through the ASGI app; fails loudly unless it answers 200."""
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": route, "raw_path": route.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"{route} answered {sent[0]['status']}: {sent[-1].get('body', b'')[:200]!r}")


async def drive(app, route: str, model: str, mode: str, seconds: float, concurrency: int) -> int:
    """Requests answered in `seconds`: hit mode, one caller; miss mode, `concurrency` callers."""
    hit_body = request_body(route, model, " ".join(WORDS))

    async def caller(stop: float) -> int:
        done = 0
        while time.monotonic() < stop:
            body = hit_body if mode == "hit" else request_body(route, model, f"{' '.join(WORDS)} {next(NUMBERS):012d}")
            await call(app, route, body)
            done += 1
        return done

    stop = time.monotonic() + seconds
    return sum(await asyncio.gather(*(caller(stop) for _ in range(1 if mode == "hit" else concurrency))))


async def measure(args) -> None:
    app = create_app(load_settings(str(ROOT / "config.dev.yaml")))
    async with app.router.lifespan_context(app):
        model = app.state.service.model_id
        for route in args.routes:
            for mode in args.modes:
                await drive(app, route, model, mode, args.warmup, args.concurrency)
        for rnd in range(args.rounds):
            for route in args.routes:
                for mode in args.modes:
                    t0 = time.thread_time()
                    n = await drive(app, route, model, mode, args.seconds, args.concurrency)
                    loop_us = (time.thread_time() - t0) / n * 1e6
                    profile = cProfile.Profile()  # this thread only: the event loop
                    profile.enable()
                    m = await drive(app, route, model, mode, args.seconds / 2, args.concurrency)
                    profile.disable()
                    calls = pstats.Stats(profile).total_calls / m
                    print(json.dumps({"round": rnd, "route": route, "mode": mode, "requests": n,
                                      "loop_us_per_request": round(loop_us, 1),
                                      "python_calls_per_request": round(calls, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routes", nargs="+", default=["/v1/embeddings", "/embed/text"])
    ap.add_argument("--modes", nargs="+", choices=["hit", "miss"], default=["hit", "miss"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--concurrency", type=int, default=64, help="callers in miss mode")
    asyncio.run(measure(ap.parse_args()))


if __name__ == "__main__":
    main()
