"""The benchmark's load generator against a real socket server: it must parse both response
framings, count errors, and never repeat a request body against one server (or the cache answers
and the benchmark measures the wrong thing: this happened once)."""

from __future__ import annotations

import asyncio
import json

from tkr_embed.benchmark.cases import build_case
from tkr_embed.benchmark.loadgen import run_level


async def serve(bodies: list[bytes], chunked: bool, status: int = 200, on_request=None):
    """A minimal HTTP/1.1 server answering every request; on_request() runs as each body arrives."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
                bodies.append(await reader.readexactly(length))
                if on_request is not None:
                    on_request()
                payload = b'{"ok": true}'
                if chunked:
                    writer.write(b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n" % status
                                 + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
                else:
                    writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_levels_never_repeat_a_request_and_both_framings_parse():
    for chunked in (False, True):
        bodies: list[bytes] = []
        server, url = await serve(bodies, chunked)
        requests = build_case("short", "/v1/embeddings", "m")
        first = await run_level(url, requests, concurrency=4, duration=0.3)
        second = await run_level(url, requests, concurrency=4, duration=0.3)
        server.close()
        assert first["requests"] > 10 and second["requests"] > 10 and first["errors"] == 0
        texts = [json.loads(b)["input"][0] for b in bodies]
        assert len(set(texts)) == len(texts), "a request text repeated: the cache would answer it"


async def test_the_ready_file_appears_after_every_clients_warm_up_and_before_the_measured_requests(tmp_path):
    """bench/profile_server.py starts its CPU counters when the file appears: before every
    connection has warmed up, they would count set-up; never, and the profiler would wait forever."""
    ready = tmp_path / "level.ready"
    seen: list[bool] = []
    server, url = await serve([], chunked=False, on_request=lambda: seen.append(ready.exists()))
    result = await run_level(url, build_case("short", "/v1/embeddings", "m"), concurrency=4, duration=0.3,
                             ready_file=str(ready))
    server.close()
    assert seen[:4] == [False] * 4, "the file appeared before every client had warmed up"
    assert all(seen[4:]) and result["requests"] > 0 and ready.exists()


async def test_errors_are_counted_not_timed():
    bodies: list[bytes] = []
    server, url = await serve(bodies, chunked=False, status=503)
    result = await run_level(url, build_case("cache", "/v1/embeddings", "m"), concurrency=2, duration=0.2)
    server.close()
    assert result["requests"] == 0 and result["errors"] > 0 and result["error_statuses"] == {503: result["errors"]}


def test_image_cases_send_distinct_images():
    req = build_case("fused", "/v1/embeddings", "m", image_side=32)
    a, b = (json.loads(req(i)[1])["input"][0] for i in (10**11, 10**11 + 1))
    assert a[1]["image_url"]["url"] != b[1]["image_url"]["url"] and a[0]["text"] != b[0]["text"]


def test_ingest_requests_carry_32_distinct_documents_of_mixed_lengths():
    from tkr_embed.benchmark.cases import INGEST_TEXTS, items_per_request

    req = build_case("ingest", "/v1/embeddings", "m")
    docs = [t for i in (10**11, 10**11 + 1) for t in json.loads(req(i)[1])["input"]]
    assert len(docs) == 2 * INGEST_TEXTS == 2 * items_per_request("ingest")
    assert len(set(docs)) == len(docs)  # no document repeats across requests: no cache hits
    words = sorted(len(d.split()) for d in docs)
    assert words[0] < 30 and words[-1] > 150  # queries and passages in one request
    assert items_per_request("short") == 1


async def test_a_connection_closed_while_idle_before_the_start_is_reopened():
    """A server's keep-alive timeout can close a client's connection while the other clients are
    still warming up (slow first requests on a GPU): the client reconnects, as HTTP pools do,
    instead of dying and silently lowering the concurrency being measured."""
    bodies: list[bytes] = []
    served = 0

    async def handle(reader, writer):
        nonlocal served
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        bodies.append(await reader.readexactly(length))
        served += 1
        writer.write(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        if served <= 2:  # the warm-up answers, then the connection is closed while idle
            writer.close()
            return
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 X\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    result = await run_level(url, build_case("short", "/v1/embeddings", "m"), concurrency=2, duration=0.3)
    server.close()
    assert result["client_failures"] == [] and result["reconnects"] == 2 and result["requests"] > 10


async def test_prebuilt_requests_go_first_and_numbers_never_repeat():
    """Image requests are built before the clock in parallel processes (building a 448-pixel PNG
    in the run capped the generator near 40 requests/s); live-built ones continue the numbering."""
    from tkr_embed.benchmark.loadgen import prebuild

    ready, next_number = prebuild("fused", "/v1/embeddings", "m", 32, 6)
    assert len(ready) == 6
    bodies: list[bytes] = []
    server, url = await serve(bodies, chunked=False)
    result = await run_level(url, build_case("fused", "/v1/embeddings", "m", image_side=32), concurrency=2,
                             duration=0.3, prebuilt=ready, first_number=next_number)
    server.close()
    assert bodies[:6] == [body for _, body in ready]
    assert result["built_live"] == len(bodies) - 6 > 0
    texts = [json.loads(b)["input"][0][0]["text"] for b in bodies]
    assert len(set(texts)) == len(texts)


async def test_a_level_split_across_processes_counts_every_client_once():
    import argparse

    from tkr_embed.benchmark.loadgen import run_split_level

    bodies: list[bytes] = []
    server, url = await serve(bodies, chunked=False)
    args = argparse.Namespace(url=url, path="/v1/embeddings", case="short", model="m", api_key=None, duration=0.5,
                              warmup_seconds=0, image_side=32, prebuild_rate=0, processes=2, ready_file=None)
    # The generator processes block on each other (a barrier): off this event loop, which serves them.
    result = await asyncio.get_running_loop().run_in_executor(None, run_split_level, args, 5)
    server.close()
    assert result["processes"] == 2 and result["concurrency"] == 5 and result["errors"] == 0
    # each process sends one unmeasured request per client first; every measured one was received
    assert 0 < result["requests"] <= len(bodies) - 5
    texts = [json.loads(b)["input"][0] for b in bodies]
    assert len(set(texts)) == len(texts), "two generator processes sent the same text"
    assert result["latencies"] == sorted(result["latencies"]) and len(result["latencies"]) == result["requests"]


def test_paired_rounds_divide_each_server_level_by_its_own_rounds_ceiling():
    from tkr_embed.benchmark.report import tables
    from tkr_embed.benchmark.suite import paired

    def one(engine: float, tkr: float, infinity: float) -> dict:
        level = lambda rate: [{"concurrency": 64, "requests_per_s": rate, "items_per_s": rate,  # noqa: E731
                               "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}]
        best = {"batch": 16, "items_per_s": engine}
        return {"raw": {"long": {"mlx-engine": {"best": best, "results": [best]}}},
                "servers": {"long": {"tkr-embed": level(tkr), "infinity": level(infinity)}}}

    # The machine ran 2x faster in round 2: pooled, 24 / 30 would read 0.8x; paired, each round is 0.9x.
    rounds = [one(10.0, 9.0, 6.0), one(20.0, 18.0, 15.0), one(10.0, 8.0, 8.0)]
    out = paired(rounds)
    assert out["long"]["tkr-embed/engine"]["64"] == {"rounds": [0.9, 0.9, 0.8], "median": 0.9}
    assert out["long"]["infinity/engine"]["64"]["rounds"] == [0.6, 0.75, 0.8]
    assert out["long"]["tkr-embed/infinity"]["64"] == {"rounds": [1.5, 1.2, 1.0], "median": 1.2}
    result = {**rounds[0], "concurrency": [64], "later_rounds": rounds[1:], "paired": out, "summary": {}}
    assert "| long | tkr-embed/engine | 0.90x (0.90, 0.90, 0.80) |" in tables(result)


def test_request_numbers_are_twelve_digits_and_never_repeat_within_a_level():
    from tkr_embed.benchmark.cases import request_number

    # A level's numbers start at a random base; the raw ceiling's at 10^11. Consecutive i must
    # land on distinct 12-digit numbers spread over their digits (not 10^11 + a few: mostly zeros,
    # fewer tokens than the texts the servers get).
    for base in (10**11, 123_456_789_012, 9 * 10**11 - 50_000):
        numbers = [request_number(base + k) for k in range(100_000)]
        assert len(set(numbers)) == len(numbers)
        assert all(10**11 <= n < 10**12 for n in numbers)
    assert sum(str(request_number(10**11 + k)).count("0") for k in range(64)) < 64 * 4


def test_cores_given_to_the_suite_bind_its_child_processes_and_bad_lists_are_refused():
    import argparse
    import os
    import sys

    import pytest

    from tkr_embed.benchmark.suite import cpu_list, run_json

    allowed = os.sched_getaffinity(0)
    one = min(allowed)
    assert cpu_list(f"{one}") == {one}
    assert cpu_list(f"{one}-{one}, {one}") == {one}
    for bad in ("", "a", "1-b", f"{max(allowed) + 1}"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)
    # A real child: it, and what it starts, runs on the given cores only.
    probe = "import json, os; print(json.dumps(sorted(os.sched_getaffinity(0))))"
    assert run_json([sys.executable, "-c", probe], cpus=frozenset({one})) == [one]
    assert run_json([sys.executable, "-c", probe]) == sorted(allowed)


def test_paired_rounds_also_hold_the_server_to_the_one_layout_best_over_all_rounds():
    """Each round's own best is the highest of several noisy numbers; the layout best over all
    rounds (by median) is measured in every round and the server divided by that."""
    from tkr_embed.benchmark.suite import engine_layouts, fixed_best_layout, paired

    def one(b16: tuple[float, float], b64: tuple[float, float], tkr: float) -> dict:
        rows = [{"batch": b, "items_per_s": max(s, r), "layout": "streams" if s >= r else "replicas",
                 "streams_items_per_s": s, "replicas_items_per_s": r} for b, (s, r) in ((16, b16), (64, b64))]
        best = max(rows, key=lambda row: row["items_per_s"])
        level = [{"concurrency": 64, "requests_per_s": tkr, "items_per_s": tkr, "p50_ms": 1.0, "p99_ms": 2.0,
                  "errors": 0}]
        return {"raw": {"short": {"mlx-engine": {"best": best, "results": rows}}},
                "servers": {"short": {"tkr-embed": level}}}

    # replicas at batch 16 run 200 in every round; one round's streams at batch 64 got lucky (250)
    rounds = [one((150, 200), (180, 190), 180.0), one((150, 200), (250, 190), 180.0), one((150, 200), (180, 190), 180.0)]
    assert engine_layouts(rounds[1]["raw"]["short"]["mlx-engine"])["streams, batch 64"] == 250
    assert fixed_best_layout(rounds, "short") == "replicas, batch 16"
    out = paired(rounds)["short"]
    assert out["tkr-embed/engine"]["64"]["rounds"] == [0.9, 0.72, 0.9]  # each round's own best
    assert out["tkr-embed/engine (replicas, batch 16)"]["64"] == {"rounds": [0.9, 0.9, 0.9], "median": 0.9}
    # a single round has no layout judged over rounds: only its own best
    assert list(paired(rounds[:1])["short"]) == ["tkr-embed/engine"]
