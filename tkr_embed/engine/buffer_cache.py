"""How many freed buffers MLX keeps for reuse on its CPU backend.

MLX returns a freed array's memory to its own buffer cache and serves later allocations of a
similar size from it, up to a cache limit. On Metal and CUDA that limit is the memory limit; on
the CPU backend it is 32 MiB (mlx 0.32), less than one batch's activations (a 16 x 252-token
MiniLM batch cycles ~200 MiB of buffers, one of its FFN intermediates alone is 25 MiB). Every
buffer past the limit went back to malloc, glibc handed the large ones back to the kernel, and
the next batch faulted fresh zeroed pages in one by one: 75,000 page faults per 16-text batch,
~950,000 per 64-text one (a quarter of its CPU time in the kernel). With room for a batch's
buffers the raw forward ran long texts 1.05x faster at batch 16 and 1.41x at 64; short-text
batches fit in 32 MiB and are unchanged (docs/benchmarks.md, "MLX's buffer cache on the CPU
backend").
"""

from __future__ import annotations

import logging

from ..models.quantize import total_memory_bytes

log = logging.getLogger(__name__)

MIB = 1 << 20
# auto: an eighth of the machine's memory, at most 4 GiB. MiniLM's largest CPU batches (4096
# padded tokens) cycle ~270 MiB; the cache only ever holds buffers a forward pass once used, so
# this is a ceiling on memory kept between bursts, not memory taken up front.
AUTO_FRACTION = 8
AUTO_CEILING = 4096 * MIB
AUTO_FLOOR = 256 * MIB


def resolve_cpu_buffer_cache(setting_mb: int, memory_bytes: int | None = None) -> int:
    """engine.cpu_buffer_cache_mb -> bytes. 0 = auto (an eighth of memory, 256 MiB to 4 GiB)."""
    if setting_mb > 0:
        return setting_mb * MIB
    mem = total_memory_bytes() if memory_bytes is None else memory_bytes
    return min(max(mem // AUTO_FRACTION, AUTO_FLOOR), AUTO_CEILING)


def set_cpu_buffer_cache(setting_mb: int, on_cpu: bool) -> int | None:
    """The MLX worker, as it starts (engine/worker.py). On the CPU backend set MLX's cache limit from engine.cpu_buffer_cache_mb
    and return it in bytes; elsewhere leave MLX's own (the memory limit) and return None."""
    if not on_cpu:
        return None
    import mlx.core as mx

    limit = resolve_cpu_buffer_cache(setting_mb)
    mx.set_cache_limit(limit)
    log.info("MLX CPU buffer cache: up to %d MiB of freed buffers kept for reuse", limit // MIB)
    return limit
