"""The model pool in-process: a text encoder and a multimodal embedder served side by side, load on
first use shared by concurrent requests, LRU eviction under a memory budget that spares preloaded
models, admin load/unload with memory figures (real models, real MLX)."""

from __future__ import annotations

import asyncio
import base64
from contextlib import asynccontextmanager

import pytest

from tests.api.conftest import served
from tests.conftest import MINILM_SPEC
from tests.helpers import make_settings, png_bytes
from tkr_embed.api.app import create_app
from tkr_embed.engine.service import EmbeddingService
from tkr_embed.models.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    return make_tiny(root / "tiny-a", seed=1), make_tiny(root / "tiny-b", seed=2, hidden=32)


def pool_settings(tiny_pair, **extra):
    a, b = tiny_pair
    models = [{"path": str(a), "name": "tiny-a", "aliases": ["vision"], "quantization": "none", "preload": False},
              {"path": str(b), "name": "tiny-b", "quantization": "none", "preload": False}]
    return make_settings(MINILM_SPEC, **{"models": models, **extra})


@asynccontextmanager
async def pool_app(settings):
    app = create_app(settings, EmbeddingService(settings))
    async with served(app) as client:
        yield app, client


async def embed(client, model, text="a photo of a cat"):
    return await client.post("/v1/embeddings", json={"model": model, "input": text})


async def test_two_models_served_at_once_and_first_use_shares_one_load(tiny_pair):
    async with pool_app(pool_settings(tiny_pair)) as (app, c):
        pool = app.state.pool
        assert [m["status"] for m in pool.describe()["models"]] == ["loaded", "unloaded", "unloaded"]
        # Six concurrent requests for a model not loaded yet, and the default model meanwhile.
        results = await asyncio.gather(*(embed(c, "vision", f"text {i}") for i in range(6)),
                                       embed(c, "sentence-transformers/all-MiniLM-L6-v2"))
        assert all(r.status_code == 200 for r in results), [r.text for r in results]
        assert {len(r.json()["data"][0]["embedding"]) for r in results[:6]} == {64}
        assert len(results[6].json()["data"][0]["embedding"]) == 384
        assert pool.entry("tiny-a").loads == 1  # one load for all six
        # The multimodal one takes images; the text encoder refuses them with a clear 400.
        img = "data:image/png;base64," + base64.b64encode(png_bytes(40, 40)).decode()
        part = [[{"type": "image_url", "image_url": {"url": img}}]]
        assert (await c.post("/v1/embeddings", json={"model": "tiny-a", "input": part})).status_code == 200
        r = await c.post("/v1/embeddings", json={"model": "sentence-transformers/all-MiniLM-L6-v2", "input": part})
        assert r.status_code == 400
        # Native routes take the model too; unknown names are a 404 naming what is served.
        r = await c.post("/embed/text", json={"texts": ["hi"], "model": "tiny-b"})
        assert r.status_code == 200 and r.json()["dimension"] == 32
        r = await c.post("/embed/text", json={"texts": ["hi"], "model": "nope"})
        assert r.status_code == 404 and "tiny-a" in r.json()["error"]["message"]
        ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        assert {"sentence-transformers/all-MiniLM-L6-v2", "tiny-a", "vision", "tiny-b"} <= set(ids)


async def test_eviction_under_a_small_budget_spares_the_preloaded_model(tiny_pair):
    # Budget: the default model plus one tiny one (the two tiny ones together do not fit).
    async with pool_app(pool_settings(tiny_pair)) as (probe_app, c):
        await embed(c, "tiny-a")
        await embed(c, "tiny-b")
        figures = {m["id"]: m["memory_bytes"] for m in probe_app.state.pool.describe()["models"]}
    default, a, b = figures.values()
    assert a > 0 and b > 0 and default > a
    budget_mb = (default + max(a, b) + min(a, b) / 2) / 2**20
    async with pool_app(pool_settings(tiny_pair, **{"pool.memory_budget_mb": budget_mb})) as (app, c):
        pool = app.state.pool
        assert (await embed(c, "tiny-a")).status_code == 200
        assert (await embed(c, "tiny-b")).status_code == 200  # tiny-a (least recently used) goes
        status = {m["id"]: m["status"] for m in pool.describe()["models"]}
        assert status == {pool_default(app): "loaded", "tiny-a": "unloaded", "tiny-b": "loaded"}
        assert pool.used_bytes() <= pool.budget_bytes
        assert (await embed(c, "tiny-a")).status_code == 200  # and comes back on use, evicting tiny-b
        assert pool.entry("tiny-a").loads == 2 and not pool.entry("tiny-b").loaded
        assert pool.entries[0].loaded  # the preloaded default is never evicted


async def test_admin_models_list_load_unload(tiny_pair):
    async with pool_app(pool_settings(tiny_pair)) as (app, c):
        listed = (await c.get("/admin/models")).json()
        assert [m["status"] for m in listed["models"]] == ["loaded", "unloaded", "unloaded"]
        assert listed["models"][1]["estimated_bytes"] > 0 and listed["memory"]["budget_bytes"] is None
        r = await c.post("/admin/models/load", json={"model": "tiny-b"})
        assert r.status_code == 200 and r.json()["models"][2]["status"] == "loaded"
        assert r.json()["models"][2]["memory_bytes"] > 0 and r.json()["memory"]["used_bytes"] > 0
        r = await c.post("/admin/models/unload", json={"model": "tiny-b"})
        assert r.status_code == 200 and r.json()["models"][2]["status"] == "unloaded"
        assert (await embed(c, "tiny-b")).status_code == 200  # loads again on use
        assert (await c.post("/admin/models/unload", json={"model": pool_default(app)})).status_code == 409
        assert (await c.post("/admin/models/load", json={"model": "ghost"})).status_code == 404
        assert (await c.post("/admin/models/load", json={})).status_code == 400


def pool_default(app) -> str:
    return app.state.pool.entries[0].label
