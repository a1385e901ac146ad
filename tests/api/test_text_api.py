"""Native API against the default text model (all-MiniLM-L6-v2)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
from fastapi import Request

from tkr_embed.api.errors import APIError
from tkr_embed.engine.buffer_cache import resolve_cpu_buffer_cache

from tests.api.conftest import running_app
from tests.conftest import MINILM_SPEC
from tests.helpers import make_settings, png_bytes


@pytest.fixture(scope="module")
async def api():
    settings = make_settings(MINILM_SPEC, **{"limits.max_items_per_request": 8, "limits.max_text_chars": 2000,
                                            "limits.max_body_bytes": 50_000})
    async with running_app(settings) as pair:
        yield pair


async def test_embed_text_shape(api):
    client, _ = api
    r = await client.post("/embed/text", json={"texts": ["Hello world", "Another text"], "normalize": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dimension"] == 384 and body["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == 384
    assert body["cached"] == [False, False] and body["processing_time_ms"] >= 0
    assert abs(np.linalg.norm(body["embeddings"][0]) - 1) < 1e-5
    again = (await client.post("/embed/text", json={"texts": ["Hello world"]})).json()
    assert again["cached"] == [True]
    assert np.allclose(again["embeddings"][0], body["embeddings"][0])


async def test_similarity_ranks_by_meaning(api):
    client, _ = api
    r = await client.post("/similarity", json={
        "query": "optimize API response time",
        "candidates": ["a recipe for banana bread", "reduce endpoint latency", "the weather in Paris"],
    })
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["index"] == 1
    scores = [x["score"] for x in results]
    assert scores == sorted(scores, reverse=True) and len(results) == 3
    top = (await client.post("/similarity", json={"query": "latency", "candidates": ["a", "b", "c"], "top_k": 2})).json()
    assert len(top["results"]) == 2


async def test_health_info_docs(api):
    client, _ = api
    assert (await client.get("/health")).json() == {"status": "healthy", "model_loaded": True}
    assert (await client.get("/ready")).json()["ready"] is True
    info = (await client.get("/info")).json()
    assert info["model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert info["model"]["modalities"] == ["text"] and info["model"]["dimension"] == 384
    for key in ("memory", "cache", "batcher", "worker"):
        assert key in info
    # On the CPU backend every batch is split across one CPU stream per core (engine.cpu_shards: 0).
    assert info["worker"]["cpu_shards"] == len(os.sched_getaffinity(0))
    # and MLX keeps freed buffers for the next batch (engine.cpu_buffer_cache_mb: 0 = auto).
    assert info["worker"]["cpu_buffer_cache_mb"] == resolve_cpu_buffer_cache(0) >> 20
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    # The hot routes read their bodies themselves (api/responses.py): the schema must still say what they take.
    for path, field in (("/embed/text", "texts"), ("/v1/embeddings", "input")):
        body = paths[path]["post"]["requestBody"]
        schema = body["content"]["application/json"]["schema"]
        assert body["required"] and field in schema["properties"] and field in schema["required"], schema


async def test_lean_body_reading_keeps_the_checks_and_their_order(api):
    client, _ = api
    json_type = {"content-type": "application/json"}
    # an empty body is a missing one, not invalid JSON
    for path in ("/embed/text", "/v1/embeddings"):
        r = await client.post(path, content=b"", headers=json_type)
        assert r.status_code == 400 and "'body' is required" in r.text, r.text
    # the media type is checked before the body is parsed
    r = await client.post("/v1/embeddings", content=b"{broken", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    # a JSON value that is not an object names the body
    r = await client.post("/embed/text", content=b"[1, 2]", headers=json_type)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    # a charset parameter is still JSON
    r = await client.post("/embed/text", content=b'{"texts": ["charset"]}',
                          headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1


@pytest.mark.parametrize("payload,status,param", [
    ({"texts": []}, 400, "texts"),
    ({"texts": [""]}, 400, "texts[0]"),
    ({"texts": ["ok", "   "]}, 400, "texts[1]"),
    ({"texts": "not a list"}, 400, "texts"),
    ({"texts": [1, 2]}, 400, "texts[0]"),
    ({}, 400, "texts"),
    ({"texts": ["x"], "unknown": 1}, 400, "unknown"),
    ({"texts": ["x"] * 9}, 400, "texts"),
    ({"texts": ["x" * 2001]}, 413, "texts[0]"),
])
async def test_bad_text_requests(api, payload, status, param):
    client, _ = api
    r = await client.post("/embed/text", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["request_id"] == r.headers["x-request-id"]


async def test_wrong_content_types_and_bodies(api):
    client, _ = api
    r = await client.post("/embed/text", content=b"{broken", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    # orjson parses bodies (api/responses.py): what it refuses is invalid JSON, not a server error
    for body in (b'{"texts": [NaN]}', b'{"texts": ["x"]', b'{"texts": ["\xff"]}', b'{"texts": [1e999999]}'):
        r = await client.post("/embed/text", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], (body, r.text)
    r = await client.post("/embed/text", data={"texts": "x"})
    assert r.status_code == 415
    r = await client.post("/embed/text", content=b"texts", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = await client.post("/similarity", json={"query": "q", "candidates": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "candidates"
    r = await client.post("/similarity", json={"query": {"text": None}, "candidates": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"
    assert (await client.get("/embed/text")).status_code == 405
    assert (await client.get("/nowhere")).json()["error"]["type"] == "not_found"


async def test_images_against_a_text_model_get_400_naming_model_and_key(api):
    client, _ = api
    r = await client.post("/embed/image", files={"file": ("a.png", png_bytes(10, 10), "image/png")})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "all-MiniLM-L6-v2" in msg and "model.path" in msg
    r = await client.post("/embed/multimodal", data={"text": "t"}, files={"image": ("a.png", png_bytes(10, 10), "image/png")})
    assert r.status_code == 400
    r = await client.post("/similarity", json={"query": "q", "candidates": [{"image": "aGVsbG8="}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "unsupported_modality"


async def test_body_limit_is_413_with_and_without_content_length(api):
    client, _ = api
    big = {"texts": ["w" * 1999] * 30}  # ~60 KB > the 50,000-byte test limit
    r = await client.post("/embed/text", json=big)
    assert r.status_code == 413 and "limits.max_body_bytes" in r.json()["error"]["message"]

    async def chunks():
        for _ in range(60):
            yield b"x" * 1000

    r = await client.post("/embed/text", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


async def test_request_ids(api):
    client, _ = api
    r = await client.get("/health", headers={"X-Request-ID": "trace-123.abc"})
    assert r.headers["x-request-id"] == "trace-123.abc"
    for bad in ("bad id with spaces".encode(), "caf\u00e9".encode("latin-1"), b"x" * 500, b"<script>"):
        r = await client.get("/health", headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"].encode() != bad and len(r.headers["x-request-id"]) == 32


async def test_server_keeps_serving_after_bad_input_under_concurrency(api):
    client, _ = api
    bad = [client.post("/embed/text", json={"texts": [""]}) for _ in range(10)]
    good = [client.post("/embed/text", json={"texts": [f"good {i}"]}) for i in range(10)]
    results = await asyncio.gather(*bad, *good)
    assert [r.status_code for r in results] == [400] * 10 + [200] * 10


async def test_queue_full_is_503_with_retry_after(api):
    client, service = api
    limit = service.batcher.max_queue_items
    service.batcher.max_queue_items = 1
    try:
        r = await client.post("/embed/text", json={"texts": ["q1 unique", "q2 unique"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
    finally:
        service.batcher.max_queue_items = limit
    assert (await client.post("/embed/text", json={"texts": ["after overload"]})).status_code == 200


async def test_unexpected_errors_get_the_envelope_without_internals(api):
    client, service = api
    app = client._transport.app

    async def boom():
        raise RuntimeError("secret internal detail /etc/passwd")

    app.router.add_api_route("/__boom", boom)
    try:
        r = await client.get("/__boom")
    finally:
        app.router.routes.pop()
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    assert "secret internal detail" not in r.text and "passwd" not in r.text
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]


def test_every_route_that_takes_a_body_parses_it_with_orjson():
    """A router added without route_class=FastJSONRoute would silently parse with the stdlib."""
    from fastapi.routing import APIRoute

    from tkr_embed.api.app import create_app
    from tkr_embed.api.responses import FastJSONRoute
    from tests.conftest import MINILM_SPEC
    from tests.helpers import make_settings

    app = create_app(make_settings(MINILM_SPEC))
    with_body = [r for r in app.routes if isinstance(r, APIRoute) and r.methods & {"POST", "PUT", "PATCH"}]
    assert len(with_body) >= 8
    assert [r.path for r in with_body if not isinstance(r, FastJSONRoute)] == []


async def test_the_embedding_routes_skip_fastapis_request_handler(api, monkeypatch):
    """An endpoint that takes only the Request is called directly (responses.FastJSONRoute): no
    dependency solving for /v1/embeddings and /embed/text, while routes with dependencies keep it."""
    import fastapi.routing

    client, service = api
    solved = []
    real = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        solved.append(kwargs["request"].url.path)
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    assert (await client.post("/v1/embeddings", json={"model": service.model_id, "input": "direct"})).status_code == 200
    assert (await client.post("/embed/text", json={"texts": ["direct"]})).status_code == 200
    assert (await client.get("/v1/models")).status_code == 200
    assert solved == ["/v1/models"]


# Endpoints for the next test, at module level: the annotations are strings (__future__), which
# FastAPI resolves in the module's namespace.
async def _refuses(request: Request):
    raise APIError(418, "teapot", "short and stout")


async def _crashes(request: Request):
    raise RuntimeError("secret internal detail")


async def _returns_a_dict(request: Request):
    return {"not": "a response"}


async def test_a_direct_endpoint_keeps_the_error_envelopes(api):
    """Errors of an endpoint called directly reach the app's handlers: an APIError its envelope,
    anything else (including not returning a Response) a 500 without internals."""
    from tkr_embed.api.responses import FastJSONRoute

    client, _ = api
    app = client._transport.app
    routes = [FastJSONRoute(f"/__direct{f.__name__}", f, methods=["GET"]) for f in (_refuses, _crashes, _returns_a_dict)]
    assert all(r.app.__qualname__.startswith("request_response") for r in routes)  # the direct path, not FastAPI's
    app.router.routes.extend(routes)
    try:
        r = await client.get("/__direct_refuses")
        assert r.status_code == 418 and r.json()["error"]["type"] == "teapot", r.text
        for name in ("_crashes", "_returns_a_dict"):
            r = await client.get(f"/__direct{name}")
            assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
            assert "secret" not in r.text and "a response" not in r.text
    finally:
        del app.router.routes[-3:]
