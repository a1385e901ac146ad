"""Operations against a real server process: SIGTERM drains what was accepted, then exits 0."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from tests.api.test_operations import sample
from tests.e2e.server import running_server

pytestmark = pytest.mark.slow


def test_sigterm_finishes_accepted_requests_then_exits_zero():
    with running_server(env={"EMBEDDING__SERVER__SHUTDOWN_GRACE_SECONDS": "120"}) as (base, proc):
        async def load_then_signal():
            async with httpx.AsyncClient(base_url=base, timeout=120,
                                         limits=httpx.Limits(max_connections=64)) as c:
                texts = [f"drain test {i}: " + "a long passage about local embedding servers " * 20
                         for i in range(48)]
                tasks = [asyncio.create_task(c.post("/embed/text", json={"texts": [t]})) for t in texts]
                queued = 0
                for _ in range(500):  # wait until the engine holds work, then signal mid-flight
                    queued = sample((await c.get("/metrics")).text, "tkr_queue_depth")
                    if queued >= 16:
                        break
                    await asyncio.sleep(0.01)
                assert queued >= 16, "the requests never queued up"
                proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return queued, results

        queued, results = asyncio.run(load_then_signal())
        ok = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
        # Accepted requests all finish; only a request that never reached the server may fail
        # (connection refused once it stopped accepting). None is cut off or answered 5xx.
        others = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
        assert all(isinstance(r, httpx.ConnectError) for r in others), others[:3]
        assert len(ok) >= queued
        assert all(len(r.json()["embeddings"][0]) == 384 for r in ok)
        code = proc.wait(60)
        assert code == 0, f"exit {code}; the server said:\n{proc.stdout.read()[-4000:]}"


def test_json_logs_carry_request_fields_and_never_the_key():
    import json

    env = {"EMBEDDING_LOG_LEVEL": "INFO", "EMBEDDING__LOGGING__FORMAT": "json"}
    with running_server(env=env) as (base, proc):
        r = httpx.post(base + "/embed/text", json={"texts": ["one", "two"]}, headers={"X-Request-ID": "log-check-1"})
        assert r.status_code == 200
        httpx.post(base + "/embed/text", json={"texts": []}, headers={"X-Request-ID": "log-check-2"})
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    access = {rec["request_id"]: rec for rec in lines if rec.get("logger") == "tkr_embed.access"}
    ok, bad = access["log-check-1"], access["log-check-2"]
    assert (ok["route"], ok["status"], ok["items"], ok["method"]) == ("/embed/text", 200, 2, "POST")
    assert ok["latency_ms"] > 0 and ok["level"] == "INFO" and "key_id" in ok
    assert bad["status"] == 400
    assert any("draining" in rec["msg"] for rec in lines)  # the SIGTERM was logged, as JSON too
