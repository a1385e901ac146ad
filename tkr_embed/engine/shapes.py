"""Shape buckets: each batch rounded up to one of a few shapes, on backends where a new shape costs.

MLX's CUDA backend pays a one-off cost the first time it runs a batch of a new shape (kernel
compilation and planning). Measured on an H100 with a Qwen2-VL-2B-sized model
(bench/shape_costs.py, docs/benchmarks.md): 90-175 ms for a text batch of a new size against
17-23 ms for the same size again; 230-335 ms against 100-205 ms for a batch of images. A server
sees every batch size from 1 to engine.max_batch_items and every padded length, so without
buckets it keeps paying that: the GPU's busy time went to compiling.

Rounding the batch size and the padded length up to 4 steps per power of two (1..8, then 10,
12, 14, 16, 20, 24, 28, 32, 40, ...: under 25% padding, on a device that runs small batches far
below its capacity anyway) leaves 20 batch sizes up to 64 and 4 lengths per octave, each paid
for once; the service's warm-up pays for the batch sizes (`engine.length_buckets: 8` halves the
length steps: images and image+text 1-3% faster on an H100, twice the lengths to compile once).
Padding rows repeat the batch's last item and their vectors are dropped; padding tokens are
masked (encoders) or come after the pooled last token of a causal model, so the real rows'
vectors do not change.

CPU and Metal kernels are not built per shape: there padding would only cost compute, so
`engine.shape_buckets: auto` turns this on for CUDA only.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..models.base import Prepared

STEPS_PER_OCTAVE = 4

# (items, longest item's cost) -> the tokens the device computes for that batch, padding included:
# the batcher's budget counts this (ShardedForward.padded_tokens picks it for the backend).
PaddedTokens = Callable[[int, int], int]


def unpadded_shape(items: int, longest: int) -> int:
    """Without shape buckets a batch runs as items x its longest item."""
    return items * longest


def bucket(n: int, steps: int = STEPS_PER_OCTAVE) -> int:
    """The smallest bucket >= n: every integer up to 2*steps, then `steps` per power of two."""
    if n <= 2 * steps:
        return max(n, 1)
    step = (1 << (n - 1).bit_length()) // (2 * steps)  # the power of two >= n, over 2*steps
    return -(-n // step) * step


def buckets_up_to(limit: int) -> list[int]:
    """Every bucket a batch of 1..limit items can be padded to (limit itself caps the last)."""
    return sorted({min(bucket(n), limit) for n in range(1, limit + 1)})


def resolve_shape_buckets(setting: str, on_cpu: bool, cuda: bool) -> bool:
    """engine.shape_buckets: auto means on for MLX's CUDA backend only."""
    if setting == "auto":
        return cuda and not on_cpu
    return setting == "on"


def resolve_compile(setting: str, on_cpu: bool, cuda: bool) -> bool:
    """engine.compile: auto means on for MLX's CUDA backend, as shape buckets are (a compiled graph
    is traced once per shape: where shapes are unbounded it would keep tracing)."""
    return resolve_shape_buckets(setting, on_cpu, cuda)


class ShapeTally:
    """Forward passes per bucketed shape and the worker's time in them: which shapes a server
    runs and what each costs it (/info worker.shapes). Bounded: a few dozen shapes at most.
    Per shape: batches; seconds in all; of those, seconds building the graph (Python, under the
    GIL); and the worker thread's CPU seconds (less than
    `seconds` where it waited: for the device, or for the GIL; on the CPU backend MLX computes on
    its streams' threads, so there it is the worker's own share only). Written by the worker
    thread, read by the event loop (a copy, under the GIL)."""

    FIELDS = ("batches", "seconds", "build_seconds", "cpu_seconds")

    def __init__(self) -> None:
        self._runs: dict[tuple[int, int], list[float]] = {}

    def add(self, rows: int, length: int, seconds: float, build_seconds: float, cpu_seconds: float) -> None:
        run = self._runs.setdefault((rows, length), [0, 0.0, 0.0, 0.0])
        for i, value in enumerate((1, seconds, build_seconds, cpu_seconds)):
            run[i] += value

    def report(self) -> list[dict]:
        """[{rows, length, batches, seconds, build_seconds, cpu_seconds}], most batches first."""
        runs = [(shape, list(run)) for shape, run in list(self._runs.items())]
        return [{"rows": r, "length": n, "batches": int(run[0]),
                 **{k: round(v, 4) for k, v in zip(self.FIELDS[1:], run[1:])}}
                for (r, n), run in sorted(runs, key=lambda kv: -kv[1][0])]


def per_batch_ms(after: list[dict], before: list[dict] = ()) -> list[dict]:
    """Two ShapeTally reports (/info worker.shapes) -> what the batches between them cost:
    [{rows, length, batches, ms, build_ms, cpu_ms}] per shape that ran (means per batch)."""
    earlier = {(x["rows"], x["length"]): x for x in before}
    out = []
    for x in after:
        b = earlier.get((x["rows"], x["length"]), {})
        n = x["batches"] - b.get("batches", 0)
        if n > 0:
            out.append({"rows": x["rows"], "length": x["length"], "batches": n,
                        **{f"{k.removesuffix('seconds')}ms": round(1000 * (x[k] - b.get(k, 0.0)) / n, 2)
                           for k in ShapeTally.FIELDS[1:]}})
    return out


class ShapeBuckets:
    """Pads batches to bucketed shapes, never beyond the engine's and the model's own limits.
    length_steps: padded lengths per power of two (engine.length_buckets)."""

    def __init__(self, max_items: int, length_steps: int = STEPS_PER_OCTAVE):
        self.max_items = max_items
        self.length_steps = length_steps
        self.tally = ShapeTally()

    def shape(self, items: int, longest: int, max_tokens: int) -> tuple[int, int]:
        """(rows, padded length) a batch of `items` whose longest item costs `longest` runs as."""
        rows = min(bucket(items), max(items, self.max_items))
        return rows, min(bucket(longest, self.length_steps), max(longest, max_tokens))

    def padded_tokens(self, items: int, longest: int, max_tokens: int) -> int:
        """Tokens the device computes for such a batch, padding included (the batcher's budget)."""
        rows, length = self.shape(items, longest, max_tokens)
        return rows * length

    def pad(self, batch: Sequence[Prepared], max_tokens: int) -> tuple[list[Prepared], int]:
        """(the batch with repeated last items, the padded length every row gets)."""
        rows, length = self.shape(len(batch), max(p.cost for p in batch), max_tokens)
        return list(batch) + [batch[-1]] * (rows - len(batch)), length
