"""Native API against the tiny Qwen2-VL embedder: images, fusion, similarity with images."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.api.conftest import running_app
from tests.helpers import cosine, make_settings, png_bytes


@pytest.fixture(scope="module")
async def api(tiny_dir):
    async with running_app(make_settings(str(tiny_dir), **{"limits.max_image_bytes": 200_000})) as pair:
        yield pair


async def test_embed_image_one_vector_per_file(api):
    client, _ = api
    files = [("file", ("a.png", png_bytes(100, 80), "image/png")),
             ("file", ("b.png", png_bytes(30, 500, 1), "image/png")),
             ("file", ("c.jpg", png_bytes(64, 64, 2, fmt="JPEG"), "image/jpeg"))]
    r = await client.post("/embed/image", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["embeddings"]) == 3 and body["dimension"] == 64 and body["cached"] == [False] * 3
    again = (await client.post("/embed/image", files=files[:1])).json()
    assert again["cached"] == [True]


async def test_fused_differs_from_text_and_image(api):
    client, _ = api
    img = png_bytes(90, 90, 7)
    text = (await client.post("/embed/text", json={"texts": ["a photo of a cat"]})).json()["embeddings"][0]
    image = (await client.post("/embed/image", files={"file": ("x.png", img, "image/png")})).json()["embeddings"][0]
    r = await client.post("/embed/multimodal", data={"text": "a photo of a cat"},
                          files={"image": ("x.png", img, "image/png")})
    assert r.status_code == 200, r.text
    fused = r.json()["embeddings"]
    assert len(fused) == 1
    assert cosine(fused[0], text) < 0.999 and cosine(fused[0], image) < 0.999
    with_instr = (await client.post("/embed/multimodal", data={"text": "a photo of a cat", "instruction": "Find it."},
                                    files={"image": ("x.png", img, "image/png")})).json()["embeddings"][0]
    assert cosine(with_instr, fused[0]) < 0.9999


async def test_similarity_with_images_matches_direct_embeddings(api):
    client, _ = api
    img = png_bytes(60, 60, 9)
    b64 = base64.b64encode(img).decode()
    r = await client.post("/similarity", json={
        "query": "red", "candidates": ["blue", {"image": "data:image/png;base64," + b64}, {"text": "t", "image": b64}]})
    assert r.status_code == 200, r.text
    res = {x["index"]: x["score"] for x in r.json()["results"]}
    q = (await client.post("/embed/text", json={"texts": ["red"]})).json()["embeddings"][0]
    v = (await client.post("/embed/image", files={"file": ("i.png", img, "image/png")})).json()["embeddings"][0]
    assert abs(res[1] - float(np.dot(q, v))) < 1e-5


@pytest.mark.parametrize("data,ctype,status", [
    (b"this is text, not an image", "image/png", 415),
    (png_bytes(50, 50)[:80], "image/png", 400),
    (b"", "image/png", 400),
])
async def test_bad_uploads_get_4xx_and_the_server_keeps_serving(api, data, ctype, status):
    client, _ = api
    r = await client.post("/embed/image", files={"file": ("x.png", data, ctype)})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == "file[0]"
    ok = await client.post("/embed/image", files={"file": ("ok.png", png_bytes(20, 20), "image/png")})
    assert ok.status_code == 200


async def test_image_over_byte_limit_is_413(api):
    client, _ = api
    big = png_bytes(400, 400, 3)  # ~480 KB of noise > 200 KB
    r = await client.post("/embed/image", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limits.max_image_bytes" in r.json()["error"]["message"]


async def test_extreme_aspect_ratio_is_400(api):
    client, _ = api
    r = await client.post("/embed/image", files={"file": ("w.png", png_bytes(2100, 10), "image/png")})
    assert r.status_code == 400 and "aspect ratio" in r.json()["error"]["message"]


async def test_multimodal_requires_text_and_image(api):
    client, _ = api
    r = await client.post("/embed/multimodal", files={"image": ("x.png", png_bytes(20, 20), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    r = await client.post("/embed/multimodal", data={"text": "only text"}, files={"other": ("x", b"1", "text/plain")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


async def test_info_for_multimodal_model(api):
    client, _ = api
    info = (await client.get("/info")).json()
    assert info["model"]["family"] == "qwen2_vl" and info["model"]["modalities"] == ["image", "text"]
    assert info["model"]["image_max_pixels"] == 64 * 28 * 28
