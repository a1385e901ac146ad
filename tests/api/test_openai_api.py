"""/v1/embeddings and /v1/models in process (real MiniLM and tiny Qwen2-VL services)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.api.conftest import running_app
from tests.conftest import MINILM_SPEC
from tests.helpers import cosine, make_settings, png_bytes

M = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
async def api():
    async with running_app(make_settings(MINILM_SPEC, **{"model.aliases": ["text-embedding-3-small"]})) as pair:
        yield pair


async def emb(client, **body):
    return await client.post("/v1/embeddings", json={"model": M, **body})


async def test_shape_usage_and_equality_with_native(api):
    client, _ = api
    r = await emb(client, input=["hello world", "second"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == M
    assert [d["object"] for d in body["data"]] == ["embedding"] * 2 and [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}  # [CLS] hello world [SEP] + [CLS] second [SEP]
    native = (await client.post("/embed/text", json={"texts": ["hello world"]})).json()["embeddings"][0]
    assert cosine(body["data"][0]["embedding"], native) >= 0.999999


async def test_base64_is_little_endian_float32(api):
    client, _ = api
    f = (await emb(client, input="bytes please")).json()["data"][0]["embedding"]
    b = (await emb(client, input="bytes please", encoding_format="base64")).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b), dtype="<f4")
    assert decoded.shape == (384,) and np.array_equal(decoded, np.asarray(f, dtype=np.float32))


async def test_dimensions_truncate_and_renormalise(api):
    client, _ = api
    full = np.asarray((await emb(client, input="matryoshka")).json()["data"][0]["embedding"])
    cut = np.asarray((await emb(client, input="matryoshka", dimensions=32)).json()["data"][0]["embedding"])
    assert cut.shape == (32,) and abs(np.linalg.norm(cut) - 1) < 1e-5
    assert cosine(cut, full[:32]) > 0.99999
    for bad in (0, 385, -1):
        r = await emb(client, input="x", dimensions=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


async def test_token_ids_single_and_batched(api):
    client, service = api
    ids = service.loaded.embedder.tokenizer.encode("hello world", add_special_tokens=False).ids
    one = await emb(client, input=ids)
    many = await emb(client, input=[ids, ids[:1]])
    assert one.status_code == 200 and many.status_code == 200
    assert one.json()["usage"]["prompt_tokens"] == len(ids)  # counted from the ids given
    assert many.json()["usage"]["prompt_tokens"] == len(ids) + 1
    text = (await emb(client, input="hello world")).json()["data"][0]["embedding"]
    assert cosine(one.json()["data"][0]["embedding"], text) > 0.999999
    r = await emb(client, input=[[10**9]])
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


async def test_aliases_and_models_endpoints(api):
    client, _ = api
    assert (await client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"})).status_code == 200
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [M, "text-embedding-3-small"]
    card = (await client.get(f"/v1/models/{M}")).json()
    assert card["dimension"] == 384 and card["modalities"] == ["text"] and card["max_tokens"] == 256
    r = await client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_unknown_model_names_the_served_ones(api):
    client, _ = api
    r = await client.post("/v1/embeddings", json={"model": "text-embedding-ada-002", "input": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and M in err["message"] and err["param"] == "model"
    assert r.headers["x-request-id"]


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input[0]"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": [1.5]}, "input[0]"),
    ({"input": [["a", 1]]}, "input[0]"),
    ({"input": None}, "input"),
    ({"input": ["x"] * 2049}, "input"),
    ({"input": [[{"type": "audio", "audio": "..."}]]}, "input[0][0]"),
    ({"input": [[{"type": "text", "text": " "}]]}, "input[0]"),
])
async def test_bad_inputs_get_openai_shaped_400s(api, body, param):
    client, _ = api
    r = await client.post("/v1/embeddings", json={"model": M, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


async def test_missing_model_and_bad_encoding_format(api):
    client, _ = api
    r = await client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = await emb(client, input="x", encoding_format="int8")
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"


async def test_truncate_true_cuts_and_false_refuses_with_each_offender(api):
    client, _ = api
    long = "word " * 400  # 402 tokens > 256
    ok = await emb(client, input=["short", long])
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3 + 256
    r = await emb(client, input=["short", long, "x", long + "more"], truncate=False)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "input[1] has 402 tokens" in msg and "input[3] has 403 tokens" in msg and "256" in msg
    assert "input[0]" not in msg and r.json()["error"]["code"] == "input_too_long"


async def test_images_on_a_text_model_and_urls_disabled(api):
    client, _ = api
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(8, 8)).decode()
    r = await emb(client, input=[[{"type": "image_url", "image_url": {"url": uri}}]])
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]


async def test_user_is_recorded(api):
    client, _ = api
    await emb(client, input=["a", "b"], user="agent-7")
    stats = (await client.get("/admin/stats")).json()
    assert {"key_id": "anonymous", "user": "agent-7", "items": 2} in stats["requests"]["by_user"]


async def test_v1_size_errors_use_openai_shape(api):
    client, _ = api
    r = await client.post("/v1/embeddings", content=b"x" * (65 * 1024 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
async def mm(tiny_dir):
    async with running_app(make_settings(str(tiny_dir))) as pair:
        yield pair


async def test_multimodal_content_parts_equal_the_native_fused_vector(mm):
    client, _ = mm
    img = png_bytes(70, 50, 3)
    uri = "data:image/png;base64," + base64.b64encode(img).decode()
    r = await client.post("/v1/embeddings", json={"model": "tiny-qwen2-vl", "input": [
        [{"type": "text", "text": "a red square"}, {"type": "image_url", "image_url": {"url": uri}}],
        [{"type": "image_url", "image_url": uri}],
        "a red square",
    ]})
    assert r.status_code == 200, r.text
    data = [d["embedding"] for d in r.json()["data"]]
    fused = (await client.post("/embed/multimodal", data={"text": "a red square"},
                               files={"image": ("a.png", img, "image/png")})).json()["embeddings"][0]
    image = (await client.post("/embed/image", files={"file": ("a.png", img, "image/png")})).json()["embeddings"][0]
    assert cosine(data[0], fused) > 0.99999 and cosine(data[1], image) > 0.99999
    assert cosine(data[0], data[2]) < 0.999


async def test_image_urls_are_refused_when_disabled(mm):
    client, _ = mm
    r = await client.post("/v1/embeddings", json={"model": "tiny-qwen2-vl", "input": [
        [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]]})
    assert r.status_code == 400 and "disabled" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "input[0][0].image_url"
