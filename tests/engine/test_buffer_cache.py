"""MLX's buffer cache on the CPU backend (engine/buffer_cache.py): sized from the setting, and a
batch's freed buffers really are kept for the next one."""

from __future__ import annotations

import numpy as np
import pytest

from tkr_embed.engine.buffer_cache import MIB, resolve_cpu_buffer_cache, set_cpu_buffer_cache
from tkr_embed.engine.shards import make_sharded_forward
from tkr_embed.models.base import EmbedItem

from tests.helpers import forward_each_alone

GIB = 1 << 30


@pytest.mark.parametrize("setting_mb,memory,expected", [
    (512, 24 * GIB, 512 * MIB),  # set: taken as given, whatever the memory
    (0, 24 * GIB, 3 * GIB),  # auto: an eighth of memory
    (0, 64 * GIB, 4 * GIB),  # at most 4 GiB
    (0, 1 * GIB, 256 * MIB),  # at least 256 MiB (MLX's own 32 MiB holds less than one batch)
])
def test_cache_size_from_the_setting(setting_mb, memory, expected):
    assert resolve_cpu_buffer_cache(setting_mb, memory) == expected


def test_other_backends_keep_mlxs_own_limit(worker):
    def run():
        import mlx.core as mx

        before = mx.set_cache_limit(123 * MIB)
        try:
            return set_cpu_buffer_cache(512, on_cpu=False), mx.set_cache_limit(before)
        finally:
            mx.set_cache_limit(before)

    assert worker.call(run) == (None, 123 * MIB)  # not set, and the limit untouched


def _limit_in_force() -> int:
    """MLX's cache limit now (worker thread): set_cache_limit answers with the previous one."""
    import mlx.core as mx

    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def test_the_worker_sets_the_limit_as_it_starts():
    from tkr_embed.engine.worker import MLXWorker

    w = MLXWorker("cpu", cpu_buffer_cache_mb=512)
    w.start()
    try:
        in_force = w.call(_limit_in_force)
        assert w.cpu_buffer_cache_mb == 512 and in_force == 512 * MIB
        w.call(set_cpu_buffer_cache, 0, True)  # the process-wide limit back to the engine's default
    finally:
        w.stop()


def test_a_batchs_buffers_are_kept_for_the_next_and_results_unchanged(worker, minilm):
    # 16 texts of ~250 tokens: one FFN intermediate alone is 16 x 250 x 1536 x 4 B = 25 MiB.
    prepared = [minilm.prepare(EmbedItem(text=f"buffers kept for reuse {i} " * 50)) for i in range(16)]

    def run():
        import mlx.core as mx

        before = _limit_in_force()
        try:
            limit = set_cpu_buffer_cache(512, on_cpu=True)
            in_force = _limit_in_force()
            forward = make_sharded_forward(2)
            mx.clear_cache()
            out = forward(minilm, prepared)
            return limit, in_force, mx.get_cache_memory(), out
        finally:
            mx.set_cache_limit(before)
            mx.clear_cache()

    limit, in_force, kept, out = worker.call(run)
    assert limit == in_force == 512 * MIB
    # MLX's own CPU limit (32 MiB) would have handed most of these back to malloc.
    assert 64 * MIB < kept <= 512 * MIB
    np.testing.assert_allclose(out, forward_each_alone(worker, minilm, prepared), atol=2e-5)
