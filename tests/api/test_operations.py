"""Operations endpoints in-process: Prometheus metrics move with traffic, /metrics access rules,
/ready through load, ready and drain (real app, real service, real MLX)."""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.api.conftest import served
from tests.api.test_auth import auth_app, auth_settings
from tests.conftest import MINILM_SPEC
from tests.helpers import make_settings
from tkr_embed.api.app import begin_drain, create_app
from tkr_embed.engine.service import EmbeddingService

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def sample(text: str, name: str, **labels) -> float:
    """The value of one series in Prometheus text format (0 when absent); labels in any order."""
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == {k: str(v) for k, v in labels.items()}:
            return float(m.group(2))
    return 0.0


async def test_ready_flips_during_load_and_drain_and_metrics_move():
    settings = make_settings(MINILM_SPEC)
    app = create_app(settings, EmbeddingService(settings), background_load=True)
    async with served(app) as c:
        # The port is open while the model loads: alive, not ready, and embedding says 503.
        first = await c.get("/ready")
        assert first.status_code == 503 and first.json()["reason"] == "loading"
        assert (await c.get("/health")).json() == {"status": "loading", "model_loaded": False}
        assert (await c.post("/embed/text", json={"texts": ["early"]})).status_code == 503
        for _ in range(600):
            if (await c.get("/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await c.get("/ready")).json()["ready"] is True

        before = (await c.get("/metrics")).text
        texts = [f"metrics text {i}" for i in range(5)]
        await asyncio.gather(*(c.post("/embed/text", json={"texts": [t]}) for t in texts))
        await c.post("/embed/text", json={"texts": [texts[0]]})  # a cache hit
        await c.post("/embed/text", json={"texts": []})  # a 400 (validation)
        m = await c.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        after = m.text
        route = "/embed/text"
        assert sample(after, "tkr_requests_total", route=route, status="200") - \
            sample(before, "tkr_requests_total", route=route, status="200") == 6
        assert sample(after, "tkr_requests_total", route=route, status="400") >= 1
        assert sample(after, "tkr_request_duration_seconds_count", route=route) >= 7
        assert sample(after, "tkr_items_embedded_total", model=MINILM, modality="text") - \
            sample(before, "tkr_items_embedded_total", model=MINILM, modality="text") == 6
        assert sample(after, "tkr_cache_hits_total", model=MINILM) - sample(before, "tkr_cache_hits_total", model=MINILM) == 1
        assert sample(after, "tkr_batch_size_sum") - sample(before, "tkr_batch_size_sum") == 5  # computed items
        assert sample(after, "tkr_tokens_total", model=MINILM) > sample(before, "tkr_tokens_total", model=MINILM)
        assert sample(after, "tkr_worker_busy_seconds_total") > 0
        assert sample(after, "tkr_mlx_memory_peak_bytes") > 0
        assert sample(after, "tkr_model_load_seconds", model=MINILM) > 0
        assert sample(after, "tkr_queue_depth") == 0 and sample(after, "tkr_ready") == 1

        begin_drain(app)  # what SIGTERM does first
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["reason"] == "draining"
        assert (await c.post("/embed/text", json={"texts": ["still served while draining"]})).status_code == 200
        assert sample((await c.get("/metrics")).text, "tkr_ready") == 0


async def test_a_model_that_fails_to_load_makes_the_server_unready(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # no weights
    settings = make_settings(str(tmp_path))
    failures: list[BaseException] = []
    app = create_app(settings, EmbeddingService(settings), background_load=True, on_load_failure=failures.append)
    async with served(app) as c:
        for _ in range(200):
            if failures:
                break
            await asyncio.sleep(0.05)
        assert failures, "on_load_failure was not called"
        r = await c.get("/ready")
        assert r.status_code == 503 and r.json()["reason"].startswith("model failed to load")


async def test_metrics_access_is_loopback_or_admin(tiny_dir, tmp_path):
    announced: list[str] = []
    async with auth_app(auth_settings(tiny_dir, tmp_path), announced) as (local, app):
        admin = announced[0]
        assert (await local.get("/metrics")).status_code == 200  # httpx's ASGI client is 127.0.0.1
        remote = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 5000)),
                                   base_url="http://t")
        async with remote:
            assert (await remote.get("/metrics")).status_code == 401
            r = await remote.post("/admin/api-keys", json={"name": "t", "permissions": ["embed:text"]},
                                  headers={"X-API-Key": admin})
            text_key = r.json()["key"]
            assert (await remote.get("/metrics", headers={"X-API-Key": text_key})).status_code == 403
            assert (await remote.get("/metrics", headers={"X-API-Key": admin})).status_code == 200
        app.state.settings.security.metrics_access = "admin"
        try:
            assert (await local.get("/metrics")).status_code == 401
        finally:
            app.state.settings.security.metrics_access = "loopback"
