"""The one thread that touches MLX.

MLX is not thread-safe (and since 0.31.2 a stream made on one thread is invisible to others), so
loading, every forward pass and every mx.eval run here, one job at a time (engine/jobs.py). The
event loop only awaits the futures this thread resolves. Starting, it picks MLX's device for the
process and, on the CPU backend, how much freed memory MLX keeps for reuse
(engine/buffer_cache.py).
"""

from __future__ import annotations

import logging
import time

from ..models.quantize import on_cpu_backend
from .buffer_cache import set_cpu_buffer_cache
from .jobs import JobThread, WorkerStopped

log = logging.getLogger(__name__)

__all__ = ["MLXWorker", "WorkerStopped"]

# MLX's memory figures are read after a job at most this often: three calls into MLX between two
# batches, on the path from one to the next, for figures /info shows to a person.
MEMORY_READ_INTERVAL_SECONDS = 0.5


class MLXWorker(JobThread):
    def __init__(self, device: str = "auto", cpu_buffer_cache_mb: int = 0):
        """device: model.device (auto|cpu|gpu); cpu_buffer_cache_mb: engine.cpu_buffer_cache_mb."""
        super().__init__("mlx-worker")
        self._device = device
        self._cpu_buffer_cache_setting = cpu_buffer_cache_mb
        # MiB of freed buffers MLX keeps for reuse, once the thread has set it on the CPU backend
        # (None: MLX's own limit, as on Metal and CUDA).
        self.cpu_buffer_cache_mb: int | None = None
        self.memory: dict[str, int] = {}  # refreshed after jobs; read by /info without MLX calls
        self._memory_read_at = float("-inf")

    def _stopped_error(self) -> Exception:
        return WorkerStopped("the MLX worker has stopped")

    def _prepare_thread(self) -> None:
        import mlx.core as mx

        if self._device == "cpu":
            mx.set_default_device(mx.cpu)
        elif self._device == "gpu":
            mx.set_default_device(mx.gpu)
        limit = set_cpu_buffer_cache(self._cpu_buffer_cache_setting, on_cpu_backend())
        self.cpu_buffer_cache_mb = None if limit is None else limit >> 20

    def _after_step(self, whole_job: bool) -> None:
        """MLX's memory read after every whole job, and after a drain's steps at most every
        MEMORY_READ_INTERVAL_SECONDS."""
        if whole_job or time.monotonic() - self._memory_read_at >= MEMORY_READ_INTERVAL_SECONDS:
            self._record_memory()

    def stalled(self, limit_seconds: float) -> str | None:
        """Why the worker cannot take work (dead, or one job running past the limit), or None."""
        if self._stopped or not self._thread.is_alive():
            return "the MLX worker is not running"
        started = self.job_started_at
        if started is not None and time.monotonic() - started > limit_seconds:
            return f"the MLX worker has been running one job for over {limit_seconds:.0f} s"
        return None

    def _record_memory(self) -> None:
        import mlx.core as mx

        self._memory_read_at = time.monotonic()
        try:
            self.memory = {
                "active_bytes": int(mx.get_active_memory()),
                "peak_bytes": int(mx.get_peak_memory()),
                "cache_bytes": int(mx.get_cache_memory()),
            }
        except Exception:  # noqa: BLE001 - memory stats are informational
            pass
