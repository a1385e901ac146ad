"""The Batcher on the real MLX worker and MiniLM's forward: the worker takes each batch itself
(Batcher._drain), so batches follow one another while the event loop is busy; other jobs still
get the worker between two batches; a bad item fails alone; stop() leaves no request waiting."""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import numpy as np
import pytest

from tkr_embed.engine.batcher import Batcher
from tkr_embed.engine.shards import ShardedForward
from tkr_embed.models.base import EmbedItem

from tests.helpers import forward_each_alone


class Recorded:
    """MiniLM's forward on the worker thread, recording when each batch starts and its size;
    an item whose text starts with "poison" fails the batch it is in."""

    def __init__(self, minilm, seconds_each: float = 0.0):
        self.forward = functools.partial(ShardedForward(1), minilm)
        self.seconds_each = seconds_each
        self.calls: list[tuple[float, int, str]] = []  # (perf_counter at start, batch size, thread)
        self.poisoned: set[int] = set()  # ids of poisoned Prepared objects

    def __call__(self, batch):
        self.calls.append((time.perf_counter(), len(batch), threading.current_thread().name))
        if any(id(p) in self.poisoned for p in batch):
            raise ValueError("poisoned item")
        time.sleep(self.seconds_each)
        return self.forward(batch)


def texts(minilm, n: int, tag: str):
    return [minilm.prepare(EmbedItem(text=f"{tag} text number {i}")) for i in range(n)]


async def test_the_worker_runs_batch_after_batch_while_the_event_loop_is_blocked(worker, minilm):
    forward = Recorded(minilm)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=4, max_queue_items=100)
    batcher.start()
    prepared = texts(minilm, 12, "blocked loop")
    futures = batcher.submit(prepared)
    await asyncio.sleep(0)  # the turn ends: the worker is started
    blocked_at = time.perf_counter()
    time.sleep(1.0)  # the event loop does nothing for a second; batches must not wait for it
    unblocked_at = time.perf_counter()
    vectors = await asyncio.gather(*futures)
    await batcher.stop()
    assert [size for _, size, _ in forward.calls] == [4, 4, 4]
    assert all(blocked_at < t < unblocked_at for t, _, _ in forward.calls)  # all three, not just the first
    assert {name for _, _, name in forward.calls} == {"mlx-worker"}
    assert batcher.batches_run == 3 and batcher.items_run == 12 and batcher.depth == 0
    np.testing.assert_allclose(np.stack(vectors), forward_each_alone(worker, minilm, prepared), atol=2e-5)


async def test_other_jobs_get_the_worker_between_two_batches(worker, minilm):
    forward = Recorded(minilm, seconds_each=0.1)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=2, max_queue_items=100)
    batcher.start()
    futures = batcher.submit(texts(minilm, 6, "sharing"))
    await asyncio.sleep(0.05)  # the first batch is running
    other = worker.submit(time.perf_counter)  # e.g. a model load, queued while batches wait
    assert worker.stalled(0.5) is None
    job_ran_at = await other
    await asyncio.gather(*futures)
    await batcher.stop()
    starts = [t for t, _, _ in forward.calls]
    assert len(starts) == 3
    assert starts[0] < job_ran_at < starts[1]  # right after the batch it arrived during
    # each batch is a step of its own: a long drain never looks like one job stuck
    assert worker.stalled(0.5) is None and worker.job_started_at is None


async def test_a_bad_item_fails_alone_and_its_neighbours_are_answered(worker, minilm):
    forward = Recorded(minilm)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=8, max_queue_items=100)
    batcher.start()
    prepared = texts(minilm, 4, "neighbour")
    forward.poisoned.add(id(prepared[2]))
    results = await asyncio.gather(*batcher.submit(prepared), return_exceptions=True)
    # and the batcher keeps serving
    (after,) = await asyncio.gather(*batcher.submit(texts(minilm, 1, "afterwards")))
    await batcher.stop()
    assert isinstance(results[2], ValueError) and "poisoned" in str(results[2])
    good = [0, 1, 3]
    np.testing.assert_allclose(np.stack([results[i] for i in good]),
                               forward_each_alone(worker, minilm, [prepared[i] for i in good]), atol=2e-5)
    assert after.shape == (minilm.dimension,)
    assert [size for _, size, _ in forward.calls] == [4, 1, 1, 1, 1, 1]  # the batch, each alone, the next


async def test_stop_fails_running_and_waiting_items_and_takes_no_more(worker, minilm):
    forward = Recorded(minilm, seconds_each=0.3)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=2, max_queue_items=100)
    batcher.start()
    futures = batcher.submit(texts(minilm, 6, "shutting down"))
    await asyncio.sleep(0.1)  # the first batch is running, two more wait
    await batcher.stop()
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 2)
    assert all(isinstance(r, RuntimeError) and "shutting down" in str(r) for r in results)
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(texts(minilm, 1, "too late"))
    await asyncio.sleep(0.5)  # the running batch ends; the worker takes nothing after it
    assert len(forward.calls) == 1 and batcher.lanes_busy == 0


async def test_requests_fail_rather_than_wait_when_the_worker_has_stopped(minilm):
    from tkr_embed.engine.worker import MLXWorker, WorkerStopped

    stopped = MLXWorker("cpu")
    stopped.start()
    stopped.stop()
    batcher = Batcher(stopped, Recorded(minilm), max_batch_tokens=10**6, max_batch_items=8, max_queue_items=100)
    batcher.start()
    results = await asyncio.wait_for(
        asyncio.gather(*batcher.submit(texts(minilm, 2, "no worker")), return_exceptions=True), 2)
    assert all(isinstance(r, WorkerStopped) for r in results) and batcher.depth == 0


class CostsOf(Recorded):
    """Recorded, and each batch's token costs."""

    def __init__(self, minilm):
        super().__init__(minilm)
        self.costs: list[list[int]] = []

    def __call__(self, batch):
        self.costs.append([p.cost for p in batch])
        return super().__call__(batch)


async def test_idle_lanes_share_a_packed_queue_by_tokens_a_padded_one_by_items(worker, minilm):
    """Two lanes (here both on the one worker, so they run in turn): the first to take, with the
    other idle, takes its share. Packed batches cost their tokens, so ten long documents first and
    ten short ones after split by tokens, not five long and five long; padded ones split by items."""
    docs = [f"long document {i}: " + "many words in a long passage " * 30 for i in range(10)]
    docs += [f"short {i}" for i in range(10)]
    prepared = [minilm.prepare(EmbedItem(text=t)) for t in docs]
    total = sum(p.cost for p in prepared)
    for packed in (True, False):
        a, b = CostsOf(minilm), CostsOf(minilm)
        batcher = Batcher(worker, a, max_batch_tokens=10**6, max_batch_items=64, max_queue_items=100,
                          packed=packed, lanes=[(worker, a), (worker, b)])
        batcher.start()
        await asyncio.gather(*batcher.submit(prepared))
        await batcher.stop()
        taken = a.costs + b.costs
        assert len(taken) == 2 and sum(map(len, taken)) == 20
        if packed:  # each lane within one document of half the tokens
            assert all(abs(sum(c) - total / 2) <= max(p.cost for p in prepared) for c in taken), taken
        else:
            assert sorted(len(c) for c in taken) == [10, 10]
