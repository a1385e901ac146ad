"""Token-budget batcher: packs queued items from concurrent requests into forward passes.

A batch is bounded by `max_batch_items` and by `max_batch_tokens` counted as padded length x
items (image tokens included, since they are part of the sequence), in the shape the device
will run: where batches are padded to bucketed shapes (CUDA, engine/shapes.py) the budget counts
the bucket, so the batch ends where its bucket fits rather than spilling into a larger one of
repeated rows (29 images of 278 tokens fit 8192 but ran as 32 x 320 = 10,240). The oldest
waiting item is always in the next batch (nothing starves); the rest are its neighbours in
length order, chosen to add the least padding, and never so many that real / padded tokens fall
below `min_padding_efficiency`: queries and long passages waiting together run as two batches
rather than one where every query pads to a passage's length. Where the model runs packed
sequences (no padding: models/packed_bert.py), a batch costs its real tokens and lengths mix
freely: the batch is then the oldest waiting items that fit, in arrival order. While the worker
runs one batch, new arrivals queue up and form the next one, so batches grow with load without
any fixed wait. The worker takes that next batch itself, on its own thread, the moment the last
one ends (Batcher._drain); the event loop queues items and hands out answers. With several
lanes (engine replicas on the CPU backend: engine/replicas.py) each lane drains the same queue on
its own thread, and a lane that starts while others are idle takes only its share of what waits.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from ..models.base import Prepared
from .shapes import PaddedTokens, unpadded_shape

log = logging.getLogger(__name__)

Forward = Callable[[Sequence[Prepared]], np.ndarray]

# engine.max_batch_tokens 0 (auto), by backend, as measured with alternating fresh servers
# (bench/ab_env.sh, docs/benchmarks.md). MLX's CPU backend: a batch's activations fall out of the
# caches as it grows: MiniLM serving 215-token texts to 64 clients on 2 cores did 9.9-11.0
# requests/s with batches of up to 8192 padded tokens, 15.6-16.0 with 4096 (2048: 14.3). An H100
# with a Qwen2-VL-2B-sized model: 8192 against 16384, long texts 562-639 against 412-511
# requests/s, short 984-1,109 against 818-850 (smaller batches let the event loop answer one
# batch while the next runs).
AUTO_BATCH_TOKENS_CPU = 4096
AUTO_BATCH_TOKENS_DEVICE = 8192


def resolve_batch_tokens(setting: int, on_cpu: bool) -> int:
    if setting > 0:
        return setting
    return AUTO_BATCH_TOKENS_CPU if on_cpu else AUTO_BATCH_TOKENS_DEVICE


class QueueFull(RuntimeError):
    def __init__(self, retry_after: int, depth: int, limit: int):
        super().__init__(f"the embedding queue is full ({depth} items waiting, limit {limit}); retry shortly")
        self.retry_after, self.depth, self.limit = retry_after, depth, limit


@dataclass
class _Entry:
    prepared: Prepared
    future: asyncio.Future
    seq: int
    enqueued_at: float = field(default_factory=time.perf_counter)


def plan_batch(costs: Sequence[int], seqs: Sequence[int], max_tokens: int, max_items: int,
               min_efficiency: float = 0.0, padded: PaddedTokens = unpadded_shape) -> list[int]:
    """Choose indices (into costs) for the next batch.

    Starts from the oldest entry (lowest seq) and grows a window over the entries sorted by cost,
    each step taking the neighbour that adds the least padding, while the batch's padded tokens
    (`padded`: the shape the device runs) fit max_tokens and real tokens stay at least
    min_efficiency of items x longest (the mixing of lengths; bucket padding is bounded anyway).
    """
    order = sorted(range(len(costs)), key=lambda i: (costs[i], seqs[i]))
    oldest = min(range(len(order)), key=lambda k: seqs[order[k]])
    lo = hi = oldest
    real = costs[order[oldest]]
    while hi - lo + 1 < max_items:
        n = hi - lo + 1
        cur_max = costs[order[hi]]
        options = []  # (padding added, longest after, real tokens after, side)
        if lo > 0:  # a shorter item: pads up to cur_max
            shorter = costs[order[lo - 1]]
            options.append((cur_max - shorter, cur_max, real + shorter, "lo"))
        if hi + 1 < len(order):  # a longer item: everyone pads up to it
            new_max = costs[order[hi + 1]]
            options.append(((new_max - cur_max) * n, new_max, real + new_max, "hi"))
        options = [o for o in options
                   if padded(n + 1, o[1]) <= max_tokens and o[2] >= min_efficiency * (n + 1) * o[1]]
        if not options:
            break
        _, _, real, side = min(options)
        if side == "lo":
            lo -= 1
        else:
            hi += 1
    return [order[k] for k in range(lo, hi + 1)]


def plan_packed_batch(costs: Sequence[int], seqs: Sequence[int], max_tokens: int, max_items: int) -> list[int]:
    """Choose indices (into costs) for the next packed batch: the oldest entry, then the others in
    arrival order, each that still fits max_tokens real tokens, up to max_items."""
    chosen: list[int] = []
    total = 0
    for i in sorted(range(len(costs)), key=seqs.__getitem__):
        if len(chosen) == max_items:
            break
        if not chosen or total + costs[i] <= max_tokens:
            chosen.append(i)
            total += costs[i]
    return chosen


class BatchWorker(Protocol):
    """What the batcher needs of the MLX worker (engine/worker.py)."""

    def post(self, fn: Callable[[], object]) -> object: ...

    def step(self, fn: Callable[..., np.ndarray], *args: object) -> np.ndarray: ...

    @property
    def jobs_waiting(self) -> int: ...


class Batcher:
    def __init__(self, worker: BatchWorker, forward: Forward, max_batch_tokens: int, max_batch_items: int,
                 max_queue_items: int, retry_after_seconds: int = 1,
                 on_batch: Callable[[int], None] | None = None, min_padding_efficiency: float = 0.0,
                 padded_tokens: PaddedTokens = unpadded_shape, packed: bool = False,
                 lanes: Sequence[tuple[BatchWorker, Forward]] = (), lone: Forward | None = None):
        """forward: a batch's vectors, run on the worker's thread; padded_tokens: the shape the
        device runs a padded batch as; packed: batches run as packed sequences (the budget counts
        real tokens, padded_tokens is not used); lanes: (worker, forward) pairs that each run
        batches of this queue on their own, in place of worker and forward (engine replicas);
        lone: with lanes, the forward for a batch of one item taken while every other lane is
        idle (called on the lane's thread: engine/service.py runs it on the server's own worker)."""
        self._lanes = list(lanes) or [(worker, forward)]
        self._lone = lone if len(self._lanes) > 1 else None
        self._padded = padded_tokens
        self.packed = packed
        self._on_batch = on_batch
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_items = max_batch_items
        self.min_padding_efficiency = min_padding_efficiency
        self.max_queue_items = max_queue_items
        self.retry_after_seconds = retry_after_seconds
        # Shared with the lanes' threads, under _lock: the queue, the lanes with no drain job on
        # their worker (queued or running), and the batch each lane is running.
        self._lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._idle: list[int] = list(range(len(self._lanes)))
        self._kicked: set[int] = set()  # drains posted that have not yet taken their first batch
        self._in_flight: dict[int, list[_Entry]] = {}
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_due = False
        self._closed = False
        # Counters (read by /info and tests; items_dropped is the worker's, the rest the loop's).
        self.batches_run = 0
        self.items_run = 0
        self.items_dropped = 0
        self.padded_tokens = 0
        self.real_tokens = 0
        self.recent_batch_sizes: deque[int] = deque(maxlen=256)

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    @property
    def lanes_busy(self) -> int:
        """Lanes with a drain job (read without the lock: a hint)."""
        return len(self._lanes) - len(self._idle)

    def start(self) -> None:
        """On the event loop that submits: answers come back to it."""
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Fail what waits or runs (a running batch finishes on the worker; its answers are
        dropped) and take no more."""
        self._closed = True
        with self._lock:
            left = self._pending + [e for batch in self._in_flight.values() for e in batch]
            self._pending = []
        for e in left:
            if not e.future.done():
                e.future.set_exception(RuntimeError("the server is shutting down"))

    def submit(self, items: Sequence[Prepared]) -> list[asyncio.Future]:
        """Queue items; all or none (a request is never half-accepted)."""
        if self._closed:
            raise RuntimeError("the server is shutting down")
        if len(self._pending) + len(items) > self.max_queue_items:
            raise QueueFull(self.retry_after_seconds, len(self._pending), self.max_queue_items)
        loop = asyncio.get_running_loop()
        entries = [_Entry(p, loop.create_future(), next(self._seq)) for p in items]
        with self._lock:
            self._pending.extend(entries)
            idle = bool(self._idle)
        if idle and not self._kick_due:
            # Start the worker at the end of this loop turn, not now: items that arrive in the same
            # turn (one frame from a front end carries many) join the same batch.
            self._kick_due = True
            loop.call_soon(self._kick)
        return [e.future for e in entries]

    def _kick(self) -> None:
        self._kick_due = False
        with self._lock:
            if not self._closed:
                self._wake_idle()

    def _wake_idle(self) -> None:
        """Under _lock (the event loop's or a lane's thread): start a drain on idle lanes, one per
        waiting item at most."""
        n = min(len(self._idle), len(self._pending))
        starting, self._idle = self._idle[:n], self._idle[n:]
        for lane in starting:
            try:
                self._lanes[lane][0].post(functools.partial(self._drain, lane))
                self._kicked.add(lane)
            except Exception as exc:  # noqa: BLE001 - the worker has stopped: fail what waits, not hang
                left, self._pending = self._pending, []
                self._idle.append(lane)
                self._answer(left, None, exc)

    # ---- the worker's thread ---------------------------------------------------------------
    def _take(self, lane: int = 0) -> list[_Entry]:
        """Under _lock: the next batch out of the queue (cancelled items dropped first). Where
        other lanes are idle (they have been kicked, or will be), this lane takes its share of
        what waits, not all of it: one lane running every waiting item while the others idle would
        bind the clients into one cohort that the lanes take in turn."""
        live = [e for e in self._pending if not e.future.done()]
        self.items_dropped += len(self._pending) - len(live)  # clients that went away
        if not live:
            self._pending = []
            return []
        costs, seqs = [e.prepared.cost for e in live], [e.seq for e in live]
        max_items, max_tokens = self.max_batch_items, self.max_batch_tokens
        others_free = len(self._idle) + len(self._kicked)
        if others_free:  # a packed batch costs its tokens: share those; a padded one, its items
            if self.packed:
                max_tokens = min(max_tokens, -(-sum(costs) // (others_free + 1)))
            else:
                max_items = min(max_items, -(-len(live) // (others_free + 1)))
        if self.packed:
            chosen = plan_packed_batch(costs, seqs, max_tokens, max_items)
        else:
            chosen = plan_batch(costs, seqs, self.max_batch_tokens, max_items,
                                self.min_padding_efficiency, self._padded)
        picked = set(chosen)
        self._pending = [e for i, e in enumerate(live) if i not in picked]
        if self._pending and self._idle:
            self._wake_idle()  # the rest is theirs
        return [live[i] for i in chosen]

    def _drain(self, lane: int = 0) -> None:
        """Worker job: batch after batch while items wait, each taken the moment the last one
        ends. The event loop only queues items and hands out the answers: a batch never waits
        for the loop to notice that the last one ended and hand over the next (on an H100, ~1.3 ms
        of a 13 ms batch of 32 short texts: bench/worker_feed.py). Other jobs on the worker (a
        model loading) go first: the drain steps behind them and carries on after."""
        worker, forward = self._lanes[lane]
        try:
            while True:
                with self._lock:
                    self._kicked.discard(lane)
                    batch = [] if self._closed else self._take(lane)
                    if not batch:
                        self._in_flight.pop(lane, None)
                        self._idle.append(lane)
                        return
                    self._in_flight[lane] = batch
                    # A lone item while every other lane idles may have every core (`lone`).
                    alone = self._lone is not None and len(batch) == 1 and len(self._idle) == len(self._lanes) - 1
                self._run(batch, worker, self._lone if alone else forward)
                with self._lock:
                    self._in_flight.pop(lane, None)
                if worker.jobs_waiting:
                    worker.post(functools.partial(self._drain, lane))
                    return
        except BaseException as exc:  # a bug here must not leave the queue waiting forever
            log.exception("the batcher's drain failed")
            with self._lock:
                lost = self._in_flight.pop(lane, [])
                self._idle.append(lane)
            self._answer(lost, None, exc)
            raise

    def _run(self, batch: list[_Entry], worker: BatchWorker, forward: Forward) -> None:
        try:
            vectors = worker.step(forward, [e.prepared for e in batch])
        except Exception as exc:  # noqa: BLE001
            if len(batch) > 1:
                # One bad item must not fail its neighbours: retry each alone.
                log.warning("batch of %d failed (%s); retrying items one by one", len(batch), exc)
                for e in batch:
                    if not e.future.done():
                        self._run([e], worker, forward)
                return
            self._answer(batch, None, exc)
            return
        self._answer(batch, vectors, None)

    def _answer(self, batch: list[_Entry], vectors: np.ndarray | None, exc: BaseException | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch, vectors, exc)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    # ---- the event loop ----------------------------------------------------------------------
    def _deliver(self, batch: list[_Entry], vectors: np.ndarray | None, exc: BaseException | None) -> None:
        if exc is not None:
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        prepared = [e.prepared for e in batch]
        self.batches_run += 1
        self.items_run += len(batch)
        self.recent_batch_sizes.append(len(batch))
        if self._on_batch is not None:
            self._on_batch(len(batch))
        real = sum(p.cost for p in prepared)
        self.real_tokens += real
        self.padded_tokens += real if self.packed else self._padded(len(prepared), max(p.cost for p in prepared))
        for e, vec in zip(batch, vectors):
            if not e.future.done():
                e.future.set_result(vec)

    def stats(self) -> dict:
        return {
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_items": self.max_batch_items,
            "min_padding_efficiency": self.min_padding_efficiency,
            "packed": self.packed,  # batches run as packed sequences: the budget counts real tokens
            "max_queue_items": self.max_queue_items,
            "queue_depth": self.depth,
            "batches_run": self.batches_run,
            "items_run": self.items_run,
            "items_dropped": self.items_dropped,
            "mean_batch_size": round(self.items_run / self.batches_run, 2) if self.batches_run else 0.0,
            "padding_efficiency": round(self.real_tokens / self.padded_tokens, 4) if self.padded_tokens else 1.0,
        }
