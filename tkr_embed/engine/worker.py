"""The one thread that touches MLX.

MLX is not thread-safe (and since 0.31.2 a stream made on one thread is invisible to others), so
loading, every forward pass and every mx.eval run here, one job at a time. The event loop only
awaits the futures this thread resolves. Starting, it picks MLX's device for the process and, on
the CPU backend, how much freed memory MLX keeps for reuse (engine/buffer_cache.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable

from ..models.quantize import on_cpu_backend
from .buffer_cache import set_cpu_buffer_cache

log = logging.getLogger(__name__)

_STOP = object()


class WorkerStopped(RuntimeError):
    pass


class MLXWorker:
    def __init__(self, device: str = "auto", cpu_buffer_cache_mb: int = 0):
        """device: model.device (auto|cpu|gpu); cpu_buffer_cache_mb: engine.cpu_buffer_cache_mb."""
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self._device = device
        self._cpu_buffer_cache_setting = cpu_buffer_cache_mb
        # MiB of freed buffers MLX keeps for reuse, once the thread has set it on the CPU backend
        # (None: MLX's own limit, as on Metal and CUDA).
        self.cpu_buffer_cache_mb: int | None = None
        self._stopped = False
        self.busy_seconds = 0.0
        self.jobs_run = 0
        self.memory: dict[str, int] = {}  # refreshed after each job; read by /info without MLX calls
        self.job_started_at: float | None = None  # monotonic time the running job began (None: idle)

    def start(self) -> None:
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    def _run(self) -> None:
        import mlx.core as mx

        if self._device == "cpu":
            mx.set_default_device(mx.cpu)
        elif self._device == "gpu":
            mx.set_default_device(mx.gpu)
        limit = set_cpu_buffer_cache(self._cpu_buffer_cache_setting, on_cpu_backend())
        self.cpu_buffer_cache_mb = None if limit is None else limit >> 20
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            self.job_started_at = time.monotonic()
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting coroutine
                fut.set_exception(e)
            else:
                fut.set_result(result)
            finally:
                self.job_started_at = None
                self.busy_seconds += time.perf_counter() - start
                self.jobs_run += 1
                self._record_memory(mx)

    def stalled(self, limit_seconds: float) -> str | None:
        """Why the worker cannot take work (dead, or one job running past the limit), or None."""
        if self._stopped or not self._thread.is_alive():
            return "the MLX worker is not running"
        started = self.job_started_at
        if started is not None and time.monotonic() - started > limit_seconds:
            return f"the MLX worker has been running one job for over {limit_seconds:.0f} s"
        return None

    def _record_memory(self, mx) -> None:
        try:
            self.memory = {
                "active_bytes": int(mx.get_active_memory()),
                "peak_bytes": int(mx.get_peak_memory()),
                "cache_bytes": int(mx.get_cache_memory()),
            }
        except Exception:  # noqa: BLE001 - memory stats are informational
            pass

    def _enqueue(self, fn: Callable[..., Any], args: tuple) -> concurrent.futures.Future:
        if self._stopped:
            raise WorkerStopped("the MLX worker has stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, fut))
        return fut

    def submit(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """Run fn(*args) on the worker; await the returned future from the event loop."""
        return asyncio.wrap_future(self._enqueue(fn, args))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Blocking variant of submit, for code without an event loop (CLI, tests)."""
        return self._enqueue(fn, args).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._jobs.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
