"""engine.regroup on the real MLX worker and MiniLM's forward (made slow by a fixed sleep, as a GPU
batch's cost is mostly fixed): closed-loop clients that settle into two cohorts are regrouped into
one batch; a lone client, a full budget and clients that never come back cost no wait, or a
bounded one; stop() ends a wait at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from tkr_embed.engine.batcher import REGROUP_SHARE, Batcher, resolve_regroup

from tests.engine.test_batcher_drain import Recorded, texts

BATCH_SECONDS = 0.1  # each batch's fixed cost here: a regroup waits up to REGROUP_SHARE of it


async def closed_loop(batcher, minilm, tag: str, rounds: int, round_trip: float) -> None:
    """One client: a request, its answer, a round trip's pause, the next request."""
    for i in range(rounds):
        (vec,) = await asyncio.gather(*batcher.submit(texts(minilm, 1, f"{tag} {i}")))
        assert vec.shape == (minilm.dimension,)
        await asyncio.sleep(round_trip)


async def two_cohorts(worker, minilm, regroup: bool) -> tuple[Recorded, Batcher]:
    """8 clients, the second 4 arriving while the first 4's batch runs: without a regroup they
    take turns in batches of 4."""
    forward = Recorded(minilm, seconds_each=BATCH_SECONDS)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=64, max_queue_items=100,
                      regroup=regroup)
    batcher.start()
    first = [asyncio.create_task(closed_loop(batcher, minilm, f"early {c}", 8, 0.01)) for c in range(4)]
    await asyncio.sleep(BATCH_SECONDS / 3)  # the first cohort's batch is running
    second = [asyncio.create_task(closed_loop(batcher, minilm, f"late {c}", 8, 0.01)) for c in range(4)]
    await asyncio.gather(*first, *second)
    await batcher.stop()
    return forward, batcher


async def test_without_regroup_closed_loop_clients_take_turns_in_half_batches(worker, minilm):
    forward, batcher = await two_cohorts(worker, minilm, regroup=False)
    assert [size for _, size, _ in forward.calls[:6]] == [4] * 6
    assert batcher.regroup_waits == 0


async def test_regroup_merges_two_cohorts_into_one_batch(worker, minilm):
    forward, batcher = await two_cohorts(worker, minilm, regroup=True)
    sizes = [size for _, size, _ in forward.calls]
    assert sizes[0] == 4 and 8 in sizes[1:3]  # merged within the first two batches after the first
    merged_from = sizes.index(8)
    # and stays one cohort, but for the late cohort's last request (the early one is done by then)
    assert sizes[merged_from:] == [8] * (len(sizes) - merged_from - 1) + [4]
    assert sum(sizes) == 64 and len(sizes) <= 10  # 16 batches of 4 without
    assert batcher.regroup_waits >= 1 and batcher.regroup_items >= 4
    assert batcher.stats()["regroup"] is True


async def test_a_lone_client_never_waits(worker, minilm):
    forward = Recorded(minilm, seconds_each=0.02)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=64, max_queue_items=100,
                      regroup=True)
    batcher.start()
    await closed_loop(batcher, minilm, "alone", 6, 0.002)
    await batcher.stop()
    assert [size for _, size, _ in forward.calls] == [1] * 6
    assert batcher.regroup_waits == 0


async def test_no_wait_when_the_budget_is_already_full(worker, minilm):
    """Two cohorts of items so long that a batch holds only 4: waiting for the other 4 would buy
    nothing, so the worker does not wait."""
    forward = Recorded(minilm, seconds_each=0.05)
    a, b = texts(minilm, 4, "budget a"), texts(minilm, 4, "budget b")
    assert len({p.cost for p in a + b}) == 1  # one length: the budget holds exactly 4
    batcher = Batcher(worker, forward, max_batch_tokens=4 * a[0].cost, max_batch_items=64, max_queue_items=100,
                      regroup=True)
    batcher.start()
    first = batcher.submit(a)
    await asyncio.sleep(0.02)
    second = batcher.submit(b)  # left waiting when the first batch ends
    await asyncio.gather(*first, *second)
    await batcher.stop()
    assert [size for _, size, _ in forward.calls] == [4, 4]
    assert batcher.regroup_waits == 0


async def test_clients_that_do_not_come_back_cost_a_bounded_wait(worker, minilm):
    forward = Recorded(minilm, seconds_each=BATCH_SECONDS)
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=64, max_queue_items=100,
                      regroup=True)
    batcher.start()
    first = batcher.submit(texts(minilm, 2, "gone"))  # answered, and never send again
    await asyncio.sleep(BATCH_SECONDS / 3)
    (late,) = batcher.submit(texts(minilm, 1, "left waiting"))
    await asyncio.gather(*first)
    first_ended = time.perf_counter()
    await late
    await batcher.stop()
    (start_a, _, _), (start_b, size_b, _) = forward.calls
    waited = start_b - start_a - BATCH_SECONDS
    # the whole wait, no more: REGROUP_SHARE of the first batch (which ran >= BATCH_SECONDS)
    assert waited >= REGROUP_SHARE * BATCH_SECONDS * 0.9
    assert start_b - first_ended < 5 * BATCH_SECONDS  # bounded (generous: a busy machine)
    assert size_b == 1 and batcher.regroup_waits == 1 and batcher.regroup_items == 0


async def test_stop_ends_a_wait_at_once(worker, minilm):
    forward = Recorded(minilm, seconds_each=1.0)  # a wait of up to half a second
    batcher = Batcher(worker, forward, max_batch_tokens=10**6, max_batch_items=64, max_queue_items=100,
                      regroup=True)
    batcher.start()
    first = batcher.submit(texts(minilm, 2, "stopping"))
    await asyncio.sleep(0.2)
    (late,) = batcher.submit(texts(minilm, 1, "held"))
    await asyncio.gather(*first)
    await asyncio.sleep(0.05)  # the worker is waiting for the first batch's clients
    stopped_at = time.perf_counter()
    await batcher.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        await late
    # the worker is free well before the wait's deadline: a job runs at once
    ran_at = await asyncio.wait_for(worker.submit(time.perf_counter), 2)
    assert ran_at - stopped_at < 0.3
    assert len(forward.calls) == 1


def test_regroup_is_on_for_cuda_only_unless_set():
    assert resolve_regroup("auto", on_cpu=False, cuda=True)
    assert not resolve_regroup("auto", on_cpu=True, cuda=False)
    assert not resolve_regroup("auto", on_cpu=False, cuda=False)  # Metal: not measured
    assert resolve_regroup("on", on_cpu=True, cuda=False)
    assert not resolve_regroup("off", on_cpu=False, cuda=True)
