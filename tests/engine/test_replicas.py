"""Engine replicas (engine.cpu_replicas) on real MLX with MiniLM: replica processes give the
vectors the CPU streams give, share the load, split a waiting queue between idle lanes, and a
replica that dies is started again without losing the server."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal

import numpy as np
import pytest

from tkr_embed.engine.replicas import resolve_replicas
from tkr_embed.engine.service import EmbeddingService
from tkr_embed.models.base import EmbedItem
from tests.conftest import MINILM_SPEC
from tests.helpers import cosine, make_settings


def test_auto_means_one_replica_per_core_for_packed_models_on_linux_cpu(monkeypatch):
    monkeypatch.setattr("sys.platform", "linux")
    assert resolve_replicas(0, on_cpu=True, packs=True, cores=4) == 4
    assert resolve_replicas(0, on_cpu=True, packs=False, cores=4) == 1  # a Qwen2-VL copy per core: no
    assert resolve_replicas(0, on_cpu=False, packs=True, cores=4) == 1  # Metal, CUDA: never
    assert resolve_replicas(3, on_cpu=True, packs=False, cores=2) == 3  # asked for
    # batches padded to bucketed shapes (engine.shape_buckets): replicas run unbucketed, so none
    assert resolve_replicas(3, on_cpu=True, packs=True, cores=2, bucketed=True) == 1
    monkeypatch.setattr("sys.platform", "darwin")
    assert resolve_replicas(0, on_cpu=True, packs=True, cores=8) == 1


@pytest.fixture(scope="module")
async def replicated():
    s = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.cpu_replicas": 2}))
    await s.start()
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def streams():
    s = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.cpu_replicas": 1}))
    await s.start()
    yield s
    await s.stop()


def texts(n: int, tag: str) -> list[str]:
    return [f"{tag} text number {i}: " + "word " * (i % 23) for i in range(n)]


async def test_replicas_give_the_streams_vectors_and_share_the_load(replicated, streams):
    assert replicated.info()["worker"]["cpu_replicas"] == 2 and streams.info()["worker"]["cpu_replicas"] == 0
    items = [EmbedItem(text=t) for t in texts(48, "parity")]
    sent = [r.batches_sent for r in replicated.replicas]
    got = await asyncio.gather(*(replicated.embed([it]) for it in items))
    want = await asyncio.gather(*(streams.embed([it]) for it in items))
    for g, w in zip(got, want):
        assert cosine(g.vectors[0], w.vectors[0]) >= 0.99999
        assert g.token_counts == w.token_counts
    assert all(r.batches_sent > n for r, n in zip(replicated.replicas, sent)), "a replica ran nothing"
    assert all(s["busy_seconds"] > 0 for s in replicated.info()["worker"]["replicas"])


async def test_idle_lanes_split_what_waits(replicated):
    """Twenty items of one length, two idle lanes: ten each (packed batches share by tokens:
    tests/engine/test_batcher_drain.py splits mixed lengths)."""
    emb = replicated.loaded.embedder
    prepared = [emb.prepare(EmbedItem(text="twenty of the same length"))] * 20
    before = len(replicated.batcher.recent_batch_sizes)
    vectors = await asyncio.gather(*replicated.batcher.submit(prepared))  # one turn: both lanes idle
    sizes = list(replicated.batcher.recent_batch_sizes)[before:]
    assert sorted(sizes) == [10, 10], sizes
    assert len(vectors) == 20 and all(np.isfinite(v).all() for v in vectors)


async def test_a_replica_that_dies_is_started_again_and_its_batch_still_answered(replicated, streams):
    victim = replicated.replicas[0]
    old_pid = victim.pid
    os.kill(old_pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    items = [EmbedItem(text=t) for t in texts(16, "after a crash")]
    got = await asyncio.wait_for(asyncio.gather(*(replicated.embed([it]) for it in items)), 120)
    want = await asyncio.gather(*(streams.embed([it]) for it in items))
    assert all(cosine(g.vectors[0], w.vectors[0]) >= 0.99999 for g, w in zip(got, want))
    assert victim.restarts == 1 and victim.pid not in (None, old_pid)
    # and the restarted replica serves: both lanes run the next load
    sent = victim.batches_sent
    await asyncio.gather(*(replicated.embed([EmbedItem(text=t)]) for t in texts(32, "serving again")))
    assert victim.batches_sent > sent


async def test_a_lone_item_runs_on_the_server_worker_with_every_core(replicated, streams):
    """At one client a replica (one core) would be slower than the server's own worker with a
    BLAS thread per core: a lone item, the other lanes idle, goes there."""
    sent, worker_jobs = [r.batches_sent for r in replicated.replicas], replicated.worker.jobs_run
    item = EmbedItem(text="a lone query while nothing else runs")
    got = await replicated.embed([item])
    want = await streams.embed([item])
    assert cosine(got.vectors[0], want.vectors[0]) >= 0.99999
    assert replicated.worker.jobs_run == worker_jobs + 1
    assert [r.batches_sent for r in replicated.replicas] == sent  # no replica ran it


async def test_replicas_that_cannot_start_fall_back_to_streams_under_auto_only(monkeypatch):
    from tkr_embed.engine import replicas
    from tkr_embed.engine.replicas import ReplicaFailed

    before = set(multiprocessing.active_children())  # the module fixtures' replicas, if running
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setattr(replicas, "START_TIMEOUT_SECONDS", 0.0)  # no replica is ready in time
    auto = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.cpu_replicas": 0}))
    await auto.start()
    try:
        assert auto.replicas == [] and auto.batcher.lanes == 1
        got = await auto.embed([EmbedItem(text=t) for t in texts(4, "fallback")])
        assert got.vectors.shape == (4, auto.dimension)
    finally:
        await auto.stop()
    asked = EmbeddingService(make_settings(MINILM_SPEC, **{"engine.cpu_replicas": 2}))
    with pytest.raises(ReplicaFailed, match="did not load"):
        await asked.start()
    await asked.stop()
    # every replica started for either service has gone (killed, joined), none left running
    assert not set(multiprocessing.active_children()) - before


def test_start_all_stops_the_replicas_that_started_when_one_fails(monkeypatch):
    """A server that cannot start all its replicas must not leave the ones that did start running
    (each holds a copy of the model): start_all stops every lane before it raises."""
    from tkr_embed.engine.replicas import ReplicaFailed, ReplicaLane, start_all
    from tkr_embed.models.registry import resolve_model_dir

    real_spawn = ReplicaLane._spawn

    def spawn(lane):
        if lane.index == 1:
            raise ReplicaFailed("replica 1 could not load the model: injected")
        real_spawn(lane)

    monkeypatch.setattr(ReplicaLane, "_spawn", spawn)
    lanes = [ReplicaLane(i, resolve_model_dir(MINILM_SPEC), ("none", None, None, None), 0, True) for i in range(2)]
    with pytest.raises(ReplicaFailed, match="injected"):
        start_all(lanes)
    assert lanes[0].pid is not None  # it had loaded the model
    assert not lanes[0]._process.is_alive() and lanes[0]._process.exitcode is not None
