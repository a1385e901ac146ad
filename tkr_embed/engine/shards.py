"""Data-parallel forward passes on MLX's CPU backend: one batch, split across CPU streams.

MLX runs each CPU stream's ops on that stream's own thread, but within one stream element-wise
ops (exp in attention, layer norms, GELU) run on a single core, and a multi-threaded BLAS makes
every matmul wait for all its threads (one preempted thread stalls the whole batch). Splitting a
batch into one shard per core, each on its own stream with a single-threaded BLAS, keeps every
core busy on independent work. On 2 cores with MiniLM this and the polynomial ops of
models/fast_ops.py took the raw forward from 77 to 211 texts/s on short texts and from 5.1 to
12.5 on 252-token ones (docs/benchmarks.md, "The CPU fast path, part by part").

Items are sorted by length before splitting, so each shard pads only to its own longest item.
Where the model runs packed sequences (models/packed_bert.py: BERT-family text encoders), there is
no padding to avoid, and the shards get equal shares of the batch's work instead, whatever the mix
of lengths. A batch that does not split (one item, or one long text that would leave the other
streams idle) runs whole, its matmuls on a BLAS thread per core meanwhile.
GPU backends keep one shard: the device already runs the whole batch in parallel; on CUDA the
batch is padded to a bucketed shape instead (engine/shapes.py).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from typing import Sequence

import numpy as np

from ..blas import set_blas_threads
from ..cores import available_cores
from ..models.base import Embedder, Prepared
from .shapes import (STEPS_PER_OCTAVE, PaddedTokens, ShapeBuckets, resolve_compile, resolve_shape_buckets,
                     unpadded_shape)

log = logging.getLogger(__name__)


def resolve_shards(setting: int, on_cpu: bool) -> int:
    """engine.cpu_shards: 0 means one per core on Linux's CPU backend, one elsewhere."""
    if not on_cpu:
        return 1
    if setting > 0:
        return setting
    return available_cores() if sys.platform == "linux" else 1


def split_by_cost(costs: Sequence[int], shards: int) -> list[list[int]]:
    """Indices of the items, sorted by cost and cut into at most `shards` contiguous runs so that
    the largest padded run (items x its longest item) is as small as it can be: short items never
    pad up to long ones when a cut between them keeps the slowest shard no slower."""
    order = sorted(range(len(costs)), key=costs.__getitem__)
    c = [costs[i] for i in order]
    if not c:
        return []

    def pack(limit: int) -> list[tuple[int, int]]:
        # Greedy, longest runs first: the fewest runs whose padded sizes stay within limit.
        runs, start = [], 0
        for end in range(1, len(c) + 1):
            if (end - start) * c[end - 1] > limit:
                runs.append((start, end - 1))
                start = end - 1
        runs.append((start, len(c)))
        return runs

    lo, hi = c[-1], len(c) * c[-1]  # the longest item alone .. everything in one run
    while lo < hi:  # the smallest limit that `shards` runs can meet
        mid = (lo + hi) // 2
        if len(pack(mid)) <= shards:
            hi = mid
        else:
            lo = mid + 1
    return [[order[i] for i in range(s, e)] for s, e in pack(lo)]


# A packed batch whose busiest stream would hold more than this share of the work runs whole
# instead, its matmuls on a BLAS thread per core (bench/whole_or_split.py, MiniLM, 2 cores,
# medians of 15 forwards in three rounds, docs/bench/packed/whole-or-split.txt): one 252-token
# text with one short text (a 0.91 share) 68-94 ms whole against 96-113 split; with three short
# texts (0.78) either way within noise, 87-107 against 92-118; two long texts (0.50) split
# 118-138 against 127-156.
WHOLE_ABOVE_SHARE = 0.85


def sequence_work(tokens: int, hidden: int) -> float:
    """A BERT layer's work for one sequence, in units of one token's projections and feed-forward
    block (~12 hidden^2 multiply-adds); attention adds ~2 x tokens x hidden per token, so a
    sequence's share grows with its length: 1 + tokens / (6 hidden)."""
    return tokens * (1.0 + tokens / (6.0 * hidden))


def split_by_work(work: Sequence[float], shards: int) -> list[list[int]]:
    """Indices of the items in at most `shards` groups of near-equal total work (packed batches,
    where an item costs its own tokens only): largest first, each to the least loaded group."""
    loads = [0.0] * min(shards, len(work))
    groups: list[list[int]] = [[] for _ in loads]
    for i in sorted(range(len(work)), key=work.__getitem__, reverse=True):
        g = min(range(len(loads)), key=loads.__getitem__)
        groups[g].append(i)
        loads[g] += work[i]
    return [g for g in groups if g]


class ShardedForward:
    """The engine's forward pass: split across CPU streams, or padded to a bucketed shape.
    Worker thread only: owns the CPU streams (MLX streams are visible only to their thread)."""

    def __init__(self, shards: int, buckets: ShapeBuckets | None = None, compile: bool = False,
                 on_cpu: bool = True, pack: bool = True):
        import mlx.core as mx

        self.shards = shards
        self.buckets = buckets
        self.compile = compile  # models that support it run their decoder mx.compile'd (adopt)
        # models that support it run packed sequences (adopt); never with shape buckets, whose
        # point is a padded shape
        self.pack = pack and buckets is None
        self.on_cpu = on_cpu  # MLX computes on its CPU backend
        self._streams: list = []
        if shards > 1:
            self._streams = [mx.new_stream(mx.cpu) for _ in range(shards)]
            # Each stream's matmuls on one core: threads of a parallel BLAS would fight the
            # other streams for the same cores.
            set_blas_threads(1)

    def adopt(self, embedder: Embedder) -> None:
        """Set a freshly loaded embedder up for these forward passes: its decoder and vision
        blocks compiled where engine.compile says so and the model supports it (Qwen2-VL); its
        batches packed where engine.pack_sequences says so and the model can (BERT on the CPU)."""
        if self.compile and hasattr(embedder, "use_compiled_graphs"):
            embedder.use_compiled_graphs()
        if self.pack and hasattr(embedder, "use_packed_sequences"):
            if embedder.use_packed_sequences():
                log.info("batches run as packed sequences, no padding (engine.pack_sequences)")

    @property
    def streams(self) -> list:
        """The CPU streams a split batch runs on, one per shard (empty: one stream, MLX's default).
        Use them on the worker's thread only: an MLX stream is visible only to the thread that made it."""
        return self._streams

    @staticmethod
    def packs(embedder: Embedder) -> bool:
        """Whether this (adopted) embedder runs its batches packed: a batch then costs its real
        tokens, which is what the batcher's budget should count."""
        return bool(getattr(embedder, "packed", False))

    def shape_times(self) -> list[dict] | None:
        """Forward passes per bucketed shape and their time (None: batches are not bucketed)."""
        return None if self.buckets is None else self.buckets.tally.report()

    def padded_tokens(self, max_tokens: int) -> PaddedTokens:
        """(items, longest cost) -> tokens the device computes for such a batch: the batcher's
        budget counts this. Bucketed: the padded shape; CPU streams: items x longest (an upper
        bound: each stream pads only to its own longest)."""
        if self.buckets is None:
            return unpadded_shape
        return functools.partial(self.buckets.padded_tokens, max_tokens=max_tokens)

    def __call__(self, embedder: Embedder, batch: Sequence[Prepared]) -> np.ndarray:
        import mlx.core as mx

        if self.buckets is not None:
            return self._bucketed(embedder, batch)
        if self.shards == 1:
            return embedder.forward(batch)
        runs = self.plan(embedder, batch)
        if len(runs) == 1:  # one item (or one run): nothing to split, so its matmuls use every core
            return self._whole(embedder, batch)
        outs = []
        for run, stream in zip(runs, self._streams):
            with mx.stream(stream):
                outs.append(embedder.encode([batch[i] for i in run]))
        mx.eval(*outs)
        result = np.empty((len(batch), outs[0].shape[-1]), dtype=np.float32)
        for run, out in zip(runs, outs):
            result[run] = np.array(out, copy=False)
        return result

    def plan(self, embedder: Embedder, batch: Sequence[Prepared]) -> list[list[int]]:
        """How a batch splits across the CPU streams: the items' indices, one run per stream. One
        run means it runs whole: a single item, or a packed batch whose busiest stream would hold
        more than WHOLE_ABOVE_SHARE of the work."""
        if self.packs(embedder):
            work = [sequence_work(p.cost, embedder.dimension) for p in batch]
            runs = split_by_work(work, self.shards)
            if len(runs) > 1 and max(sum(work[i] for i in r) for r in runs) > WHOLE_ABOVE_SHARE * sum(work):
                runs = [list(range(len(batch)))]
            return runs
        return split_by_cost([p.cost for p in batch], self.shards)

    def _bucketed(self, embedder: Embedder, batch: Sequence[Prepared]) -> np.ndarray:
        """The batch padded to its bucketed shape, timed for the shape tally: building the graph
        (Python, holding the GIL) apart from evaluating it (MLX, the GIL released) and the copy out."""
        import mlx.core as mx

        padded, length = self.buckets.pad(batch, embedder.max_tokens)
        start, cpu = time.perf_counter(), time.thread_time()
        pooled = embedder.encode(padded, length)
        built = time.perf_counter()
        mx.eval(pooled)
        vectors = np.array(pooled, copy=True)[: len(batch)]
        self.buckets.tally.add(len(padded), length, time.perf_counter() - start, built - start,
                               time.thread_time() - cpu)
        return vectors

    def _whole(self, embedder: Embedder, batch: Sequence[Prepared]) -> np.ndarray:
        """The batch unsplit, on the default stream, with a BLAS thread per shard for the
        duration: a lone request would otherwise leave all cores but one idle (a 252-token text
        alone: 107 -> 81 ms on 2 cores, docs/benchmarks.md)."""
        set_blas_threads(self.shards, quiet=True)
        try:
            return embedder.forward(batch)
        finally:
            set_blas_threads(1, quiet=True)


def make_sharded_forward(setting: int, shape_buckets: str = "off", max_items: int = 64,
                         compile: str = "off", length_steps: int = STEPS_PER_OCTAVE,
                         pack: bool = True) -> ShardedForward:
    """Worker thread only (CPU streams exist only on the thread that made them).
    setting: engine.cpu_shards; shape_buckets, compile: engine.shape_buckets, engine.compile (auto|on|off);
    length_steps: engine.length_buckets; pack: engine.pack_sequences."""
    import mlx.core as mx

    from ..models.quantize import on_cpu_backend

    on_cpu = on_cpu_backend()
    shards = resolve_shards(setting, on_cpu)
    if shards > 1:
        log.info("forward passes split across %d CPU streams", shards)
    buckets = None
    cuda = getattr(getattr(mx, "cuda", None), "is_available", lambda: False)()
    if resolve_shape_buckets(shape_buckets, on_cpu, cuda):
        buckets = ShapeBuckets(max_items, length_steps)
        log.info("batches padded to bucketed shapes (engine.shape_buckets)")
        shards = 1  # one padded batch; streams would split it into shapes of their own
    compiled = resolve_compile(compile, on_cpu, cuda)
    if compiled:
        log.info("decoders traced with mx.compile per batch shape (engine.compile)")
    return ShardedForward(shards, buckets, compiled, on_cpu, pack)
