"""Batcher's hand-over to the worker: with queue_next, the next batch is queued behind the running
one once it is as large (or full), and every item still gets its own vector.

run_batch here is a gate the test opens batch by batch, so the test decides when the "worker"
finishes: that is what makes the hand-over rule observable without timing.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tkr_embed.engine.batcher import Batcher
from tkr_embed.models.base import Prepared


class GatedWorker:
    """Records each batch handed over; answers it (each item's own id as its vector) when opened."""

    def __init__(self):
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []

    async def run(self, prepared):
        self.batches.append([int(p.input_ids[0]) for p in prepared])
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return np.array([[float(p.input_ids[0])] for p in prepared])

    def finish(self, k: int) -> None:
        self.gates[k].set()


def item(i: int, tokens: int = 10) -> Prepared:
    return Prepared(input_ids=np.full(tokens, i, dtype=np.int32), num_tokens=tokens)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def gated():
    def make(**kw):
        worker = GatedWorker()
        b = Batcher(worker.run, max_batch_tokens=10_000, max_batch_items=kw.pop("max_items", 64),
                    max_queue_items=1000, packed=True, **kw)
        b.start()
        made.append(b)
        return b, worker
    made: list[Batcher] = []
    yield make
    for b in made:
        await b.stop()


async def test_next_batch_is_queued_once_as_large_as_the_running_one(gated):
    b, w = gated(queue_next=True)
    first = b.submit([item(i) for i in range(4)])
    await settle()
    assert w.batches == [[0, 1, 2, 3]]
    second = b.submit([item(10), item(11)])
    await settle()
    assert len(w.batches) == 1, "a batch smaller than the running one was handed over early"
    second += b.submit([item(12), item(13)])
    await settle()
    assert w.batches[1] == [10, 11, 12, 13], "a batch as large as the running one waits for the end"
    assert b.stats()["batches_queued_next"] == 1
    w.finish(0)
    w.finish(1)
    got = await asyncio.gather(*first, *second)
    assert [int(v[0]) for v in got] == [0, 1, 2, 3, 10, 11, 12, 13]


async def test_a_batch_cut_short_by_the_limits_is_queued_at_once(gated):
    b, w = gated(queue_next=True, max_items=3)
    futures = b.submit([item(i) for i in range(3)])
    await settle()
    futures += b.submit([item(i) for i in range(3, 8)])
    await settle()
    assert w.batches == [[0, 1, 2], [3, 4, 5]], "a full batch should wait behind the running one"
    for k in range(3):
        await settle()
        w.finish(k)
    got = await asyncio.gather(*futures)
    assert [int(v[0]) for v in got] == list(range(8))
    assert w.batches[2] == [6, 7]


async def test_without_queue_next_one_batch_at_a_time(gated):
    b, w = gated(queue_next=False)
    futures = b.submit([item(i) for i in range(2)])
    await settle()
    futures += b.submit([item(i) for i in range(2, 10)])
    await settle()
    assert w.batches == [[0, 1]]
    w.finish(0)
    await settle()
    assert w.batches[1] == list(range(2, 10)), "the waiting items form the next batch at the end"
    w.finish(1)
    assert [int(v[0]) for v in await asyncio.gather(*futures)] == list(range(10))
    assert b.stats()["batches_queued_next"] == 0


async def test_stop_answers_the_items_of_batches_handed_over(gated):
    b, w = gated(queue_next=True)
    running = b.submit([item(1)])
    await settle()
    queued = b.submit([item(2)])
    await settle()
    waiting = b.submit([item(3)])  # never handed over: two batches are with the worker already
    await settle()
    assert len(w.batches) == 2
    await b.stop()
    for fut in running + queued + waiting:
        with pytest.raises(RuntimeError, match="shutting down"):
            await fut
