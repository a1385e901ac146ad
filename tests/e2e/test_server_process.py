"""End-to-end: real server processes on loopback, real HTTP clients."""

from __future__ import annotations

import asyncio
import os
import subprocess

import httpx
import pytest

from tests.e2e.server import ROOT, running_server, tkr_embed_cmd
from tests.helpers import cosine, png_bytes

pytestmark = pytest.mark.slow


def test_default_model_serves_and_batches_concurrent_clients():
    with running_server() as (base, _):
        info0 = httpx.get(base + "/info").json()
        assert info0["model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"

        async def many(n):
            async with httpx.AsyncClient(base_url=base, timeout=60) as c:
                return await asyncio.gather(*(
                    c.post("/embed/text", json={"texts": [f"client {i} asks about latency and caching"]})
                    for i in range(n)))

        responses = asyncio.run(many(32))
        assert all(r.status_code == 200 for r in responses)
        info1 = httpx.get(base + "/info").json()
        items = info1["batcher"]["items_run"] - info0["batcher"]["items_run"]
        batches = info1["batcher"]["batches_run"] - info0["batcher"]["batches_run"]
        assert items == 32 and batches < 32, (items, batches)

        sim = httpx.post(base + "/similarity", json={
            "query": "optimize API response time",
            "candidates": ["reduce endpoint latency", "a recipe for banana bread"]}).json()
        assert sim["results"][0]["index"] == 0


def test_tiny_multimodal_model_serves_every_endpoint(tiny_dir):
    with running_server("--model", str(tiny_dir)) as (base, _):
        c = httpx.Client(base_url=base, timeout=60)
        img = png_bytes(120, 90, 4)
        t = c.post("/embed/text", json={"texts": ["hello"]})
        i = c.post("/embed/image", files={"file": ("a.png", img, "image/png")})
        m = c.post("/embed/multimodal", data={"text": "hello"}, files={"image": ("a.png", img, "image/png")})
        assert (t.status_code, i.status_code, m.status_code) == (200, 200, 200)
        assert t.json()["model"] == "tiny-qwen2-vl" and t.json()["dimension"] == 64
        fused = m.json()["embeddings"][0]
        assert cosine(fused, t.json()["embeddings"][0]) < 0.999
        assert cosine(fused, i.json()["embeddings"][0]) < 0.999
        bad = c.post("/embed/image", files={"file": ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")})
        assert 400 <= bad.status_code < 500
        assert c.get("/health").json()["model_loaded"] is True


def test_unloadable_model_exits_non_zero_with_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for model in (str(tmp_path / "missing"), str(tmp_path)):
        r = subprocess.run(tkr_embed_cmd("serve", "--model", model, "--port", "0"), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 3
        assert "cannot load the model" in r.stderr and "Traceback" not in r.stderr


def test_start_production_exits_non_zero_when_the_model_cannot_load(tmp_path):
    env = {**os.environ, "EMBEDDING_MODEL_PATH": str(tmp_path / "nothing-here"), "EMBEDDING_PORT": "0"}
    r = subprocess.run([str(ROOT / "start_production.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "nothing-here" in r.stderr


def test_invalid_setting_fails_at_start_naming_the_key():
    env = {**os.environ, "EMBEDDING_CACHE_SIZE": "lots"}
    r = subprocess.run(tkr_embed_cmd("serve", "--config", "config.dev.yaml"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cache.max_size" in r.stderr and "EMBEDDING_CACHE_SIZE" in r.stderr


def test_make_tiny_cli_writes_a_loadable_model(tmp_path):
    r = subprocess.run(tkr_embed_cmd("models", "make-tiny", str(tmp_path / "t")), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "preprocessor_config.json"):
        assert (tmp_path / "t" / f).is_file()
    info = subprocess.run(tkr_embed_cmd("models", "info", str(tmp_path / "t")), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and '"family": "qwen2_vl"' in info.stdout


def test_launcher_preloads_openblas_on_linux():
    """`serve` re-executes itself with OpenBLAS preloaded when MLX would use the reference BLAS."""
    from tkr_embed.blas import find_fast_blas

    if find_fast_blas() is None:
        pytest.skip("no OpenBLAS on this machine")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    # a missing model makes serve exit right after logging its BLAS choice
    r = subprocess.run(tkr_embed_cmd("serve", "--config", "config.dev.yaml", "--model", "/nonexistent"),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert "OpenBLAS preloaded" in r.stderr and "OPENBLAS_THREAD_TIMEOUT=4" in r.stderr
    r = subprocess.run(tkr_embed_cmd("serve", "--config", "config.dev.yaml", "--model", "/nonexistent"),
                       cwd=ROOT, env=env | {"TKR_EMBED_BLAS": "off"}, capture_output=True, text=True, timeout=60)
    assert "reference BLAS" in r.stderr


def test_the_preload_makes_idle_openblas_threads_sleep(monkeypatch):
    """OpenBLAS's idle threads spin ~0.1 s after each call unless OPENBLAS_THREAD_TIMEOUT says
    otherwise: the launcher sets it with the preload, and also when OpenBLAS is preloaded already,
    but never overrides a value the user chose."""
    import sys

    from tkr_embed import blas

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "find_fast_blas", lambda: "/usr/lib/libopenblas.so.0")
    fresh = blas.preload_env({"PATH": "/bin"})
    assert fresh["LD_PRELOAD"] == "/usr/lib/libopenblas.so.0" and fresh["OPENBLAS_THREAD_TIMEOUT"] == "4"
    already = blas.preload_env({"LD_PRELOAD": "/opt/libopenblas.so.0"})
    assert already["LD_PRELOAD"] == "/opt/libopenblas.so.0" and already["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert blas.preload_env({"LD_PRELOAD": "/opt/libopenblas.so.0", "OPENBLAS_THREAD_TIMEOUT": "20"}) is None
    assert blas.preload_env(fresh) is None  # the re-exec'd process does not re-exec again
    assert blas.preload_env({"TKR_EMBED_BLAS": "off"}) is None


def test_a_client_that_disconnects_has_its_items_dropped():
    """A request whose client goes away while it waits in the queue never reaches the model."""
    with running_server() as (base, _):
        long_texts = [f"long text {i} " + "latency cache batching vector " * 60 for i in range(64)]

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=120) as c:
                busy = asyncio.ensure_future(c.post("/embed/text", json={"texts": long_texts}))
                await asyncio.sleep(0.3)  # the worker is now busy with 64 long texts
                try:
                    async with httpx.AsyncClient(base_url=base, timeout=0.5) as impatient:
                        await impatient.post("/embed/text", json={"texts": ["I will not wait for this"]})
                except httpx.TimeoutException:
                    pass
                r = await busy
                assert r.status_code == 200
                await asyncio.sleep(0.5)
                return (await c.get("/info")).json()["batcher"]

        before = httpx.get(base + "/info").json()["batcher"]
        after = asyncio.run(scenario())
        assert after["items_dropped"] == before["items_dropped"] + 1
        assert after["items_run"] == before["items_run"] + 64


def test_production_profile_prints_a_bootstrap_key_once_and_serves_with_it(tmp_path):
    """config.yaml (auth on) with the tiny model: the first start prints an admin key on stdout,
    the log never shows it, requests need it, and a restart prints nothing new."""
    env = {"EMBEDDING_DATA_DIR": str(tmp_path), "EMBEDDING_HOST": "127.0.0.1",
           "EMBEDDING_LOG_LEVEL": "INFO"}
    cfg = str(ROOT / "config.yaml")
    with running_server("--config", cfg, "--model", str(_tiny(tmp_path)), env=env) as (base, proc):
        assert httpx.post(base + "/embed/text", json={"texts": ["x"]}).status_code == 401
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    keys = [line.strip() for line in out.splitlines() if line.strip().startswith("tke_")]
    assert len(keys) == 1
    assert sum(keys[0] in line for line in out.splitlines()) == 1  # printed once, in no log line
    with running_server("--config", cfg, "--model", str(_tiny(tmp_path)), env=env) as (base, proc):
        r = httpx.post(base + "/embed/text", json={"texts": ["x"]}, headers={"Authorization": f"Bearer {keys[0]}"})
        assert r.status_code == 200
        proc.terminate()
        assert "tke_" not in proc.communicate(timeout=30)[0]


def _tiny(tmp_path):
    from tkr_embed.models.tiny import make_tiny

    path = tmp_path / "tiny"
    return path if (path / "config.json").exists() else make_tiny(path)


def test_refuses_a_public_address_without_api_keys():
    env = {**os.environ, "EMBEDDING_REQUIRE_API_KEY": "false", "EMBEDDING_HOST": "0.0.0.0"}
    r = subprocess.run([str(ROOT / "start_production.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "loopback" in r.stderr
