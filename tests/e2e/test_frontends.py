"""server.frontends > 1 as real processes: one engine process, HTTP front ends spawned by it.

What must hold: every front end serves the engine's vectors; /metrics counts every front end
whichever one a scrape reaches; a signal drains them all and leaves no process behind; a dead
front end is replaced; front ends never outlive the engine; with auth on, one bootstrap key.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tkr_embed.cores import available_cores

from tests.api.test_operations import sample
from tests.e2e.server import ROOT, running_server, tkr_embed_cmd

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="reads children from /proc")]

FRONTENDS = ("--frontends", "2")


def children(pid: int, kind: str = "frontends") -> list[int]:
    """The front-end processes, or (kind="replicas") the engine replicas, which name themselves
    tkr-replica-N (multiprocessing's resource tracker is a child too)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            try:
                if b"spawn_main" not in Path(f"/proc/{c}/cmdline").read_bytes():
                    continue
                replica = Path(f"/proc/{c}/comm").read_text().startswith("tkr-replica")
            except FileNotFoundError:
                continue
            if replica == (kind == "replicas"):
                out.append(int(c))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {seconds} s")


def linked(base: str) -> int:
    """Front ends the engine serves, as /info says (0 from a front end still linking: 503)."""
    r = httpx.get(base + "/info")
    return r.json()["frontends"]["linked"] if r.status_code == 200 else 0


def all_ready(base: str) -> bool:
    """/ready on 16 fresh connections (spread over the front ends by the kernel) all 200."""
    return all(httpx.get(base + "/ready").status_code == 200 for _ in range(16))


@contextmanager
def frontend_server(*args: str, env: dict | None = None):
    """running_server with front ends, yielded once every front end is ready: /ready answered
    from one of them, and the others link to the engine moments later."""
    with running_server(*FRONTENDS, *args, env=env) as (base, proc):
        wait_until(lambda: all_ready(base), 15, "every front end ready")
        yield base, proc


def fresh_post(base: str, text: str) -> httpx.Response:
    """One request on a new connection, so the kernel may hand it to either front end."""
    with httpx.Client(base_url=base, timeout=60) as c:
        return c.post("/embed/text", json={"texts": [text]})


def test_every_frontend_serves_and_metrics_count_them_all():
    with frontend_server() as (base, proc):
        assert len(children(proc.pid)) == 2
        # /ready answered from one front end; the other links within moments (a fresh connection
        # may reach it first and get 503 "loading" meanwhile)
        wait_until(lambda: linked(base) == 2, 10, "both linked")
        # /info from a front end: the engine's layout (this process runs no model), its own cache
        info = httpx.get(base + "/info").json()
        assert info["model"]["dimension"] == 384 and info["model"]["family"] == "text_encoder"
        assert info["worker"]["cpu_shards"] == available_cores() and info["worker"]["compiled"] is False
        assert info["worker"]["jobs_run"] >= 1 and info["cache"]["scope"].startswith("front end ")
        # engine.cpu_replicas auto: a replica process per core beside the front ends, on Linux
        replicas = children(proc.pid, "replicas")
        assert info["worker"]["cpu_replicas"] == len(replicas) == available_cores()
        assert sorted(r["pid"] for r in info["worker"]["replicas"]) == sorted(replicas)
        texts = [f"front-end check {i}: embeddings on my own machine" for i in range(24)]
        responses = [fresh_post(base, t) for t in texts]
        assert [r.status_code for r in responses] == [200] * 24
        with httpx.Client(base_url=base, timeout=60) as c:
            together = c.post("/embed/text", json={"texts": texts}).json()["embeddings"]
            for r, vec in zip(responses, together):  # same vectors, whichever front end answered
                assert max(abs(a - b) for a, b in zip(r.json()["embeddings"][0], vec)) < 1e-5
        def items(text: str) -> float:
            return sample(text, "tkr_items_embedded_total", model="sentence-transformers/all-MiniLM-L6-v2",
                          modality="text")

        # Counters travel through the engine once a second each way: every front end's scrape shows
        # the other's last requests within ~2 s of them (one push, then one refresh). Request
        # metrics are summed at once (shared files).
        wait_until(lambda: all(items(fresh_post_metrics(base)) == 48 for _ in range(4)), 15, "item counts summed")
        time.sleep(3)  # the first front end to show 48 may have been scraped before the other refreshed
        for _ in range(4):  # whichever front end the scrape reaches, the sums are the same
            text = fresh_post_metrics(base)
            assert sample(text, "tkr_requests_total", route="/embed/text", status="200") == 25
            assert items(text) == 48
            assert sample(text, "tkr_batch_size_count") >= 1
            assert sample(text, "tkr_ready") == 1


def fresh_post_metrics(base: str) -> str:
    with httpx.Client(base_url=base, timeout=60) as c:
        return c.get("/metrics").text


def test_sigterm_drains_every_frontend_then_exits_zero():
    with frontend_server(env={"EMBEDDING__SERVER__SHUTDOWN_GRACE_SECONDS": "120"}) as (base, proc):
        kids = children(proc.pid) + children(proc.pid, "replicas")

        async def load_then_signal():
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=48)) as c:
                texts = [f"drain {i}: " + "a long passage about local embedding servers " * 20 for i in range(48)]
                tasks = [asyncio.create_task(c.post("/embed/text", json={"texts": [t]})) for t in texts]
                await asyncio.sleep(1.0)  # accepted and queued (48 long texts take the engine seconds)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(load_then_signal())
        ok = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
        others = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
        assert all(isinstance(r, httpx.ConnectError) for r in others), others[:3]
        assert len(ok) >= 24, f"only {len(ok)} of 48 finished"
        code = proc.wait(60)
        assert code == 0, f"exit {code}; the server said:\n{proc.stdout.read()[-4000:]}"
        assert not any(alive(k) for k in kids)


def test_a_dead_frontend_is_replaced_and_frontends_never_outlive_the_engine():
    with frontend_server() as (base, proc):
        first = children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        replaced = wait_until(lambda: (k := children(proc.pid)) and len(k) == 2 and first[0] not in k and k,
                              15, "a new front end")
        # The replacement links before it takes connections: no request meets an unlinked front end.
        assert all(fresh_post(base, f"after the crash {i}").status_code == 200 for i in range(8))
        time.sleep(1.5)  # snapshots taken after the crash
        wait_until(lambda: linked(base) == 2, 30, "relinked")
        replicas = children(proc.pid, "replicas")
        proc.kill()  # the engine dies without a word: its front ends (and replicas) must leave, not serve errors
        proc.wait(10)
        wait_until(lambda: not any(alive(k) for k in replaced + replicas), 15, "front ends and replicas gone with the engine")


def test_with_auth_one_bootstrap_key_works_through_every_frontend(tmp_path):
    env = {"EMBEDDING_REQUIRE_API_KEY": "true", "EMBEDDING_DATA_DIR": str(tmp_path)}
    with frontend_server(env=env) as (base, proc):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        out = proc.stdout.read()
    assert out.count("created an admin API key") == 1
    token = out.split("shown only this once:")[1].split()[0]
    import subprocess

    listed = subprocess.run(tkr_embed_cmd("keys", "--config", str(ROOT / "config.dev.yaml"), "list"),
                            env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.count('"id"') == 1
    with frontend_server(env=env) as (base, proc):
        for i in range(6):
            with httpx.Client(base_url=base, timeout=60) as c:
                assert c.post("/embed/text", json={"texts": ["no key"]}).status_code == 401
                r = c.post("/embed/text", json={"texts": [f"key {i}"]}, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200
                stats = c.get("/admin/stats", headers={"Authorization": f"Bearer {token}"})
                assert stats.status_code == 200 and stats.json()["queue"]["depth"] >= 0  # the engine's figures


def test_a_model_that_cannot_load_stops_every_frontend_with_exit_3(tmp_path):
    import subprocess

    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')  # no weights
    r = subprocess.run(tkr_embed_cmd("serve", "--config", str(ROOT / "config.dev.yaml"), "--port", "0",
                                     "--model", str(tmp_path), *FRONTENDS),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    # (run() returns only once every process holding the output pipes is gone: no front end lingers)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "the model failed to load" in r.stderr


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_busy_port_is_exit_1_not_3(frontends):
    # 3 tells supervisors "the model cannot load, do not restart"; a busy port may free up.
    import socket
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(tkr_embed_cmd("serve", "--config", str(ROOT / "config.dev.yaml"), "--port", str(port),
                                         "--frontends", frontends), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "in use" in r.stderr
