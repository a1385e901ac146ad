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
# MLX's memory figures are read after a job at most this often: three calls into MLX between two
# batches, on the path from one to the next, for figures /info shows to a person.
MEMORY_READ_INTERVAL_SECONDS = 0.5


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
        self.memory: dict[str, int] = {}  # refreshed after jobs; read by /info without MLX calls
        self._memory_read_at = float("-inf")
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
            fn, args, fut, in_steps = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                # a job run in steps (the batcher's drain) accounts for each step itself
                result = fn(*args) if in_steps else self._account(fn, args, memory_every_time=True)
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting coroutine
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def step(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Worker thread: fn(*args) as one unit of work: timed into busy_seconds, counted in
        jobs_run, its start shown to stalled(), MLX's memory read after it at most every
        MEMORY_READ_INTERVAL_SECONDS."""
        return self._account(fn, args, memory_every_time=False)

    def _account(self, fn: Callable[..., Any], args: tuple, memory_every_time: bool) -> Any:
        start = time.perf_counter()
        self.job_started_at = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.job_started_at = None
            self.busy_seconds += time.perf_counter() - start
            self.jobs_run += 1
            if memory_every_time or time.monotonic() - self._memory_read_at >= MEMORY_READ_INTERVAL_SECONDS:
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

    def _enqueue(self, fn: Callable[..., Any], args: tuple, in_steps: bool = False) -> concurrent.futures.Future:
        if self._stopped:
            raise WorkerStopped("the MLX worker has stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, fut, in_steps))
        return fut

    def post(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Any thread, the worker's own included: queue fn() as a job that runs its work in steps
        (each through step(), so stalled() and busy_seconds see each step, not the whole job)."""
        return self._enqueue(fn, (), in_steps=True)

    @property
    def jobs_waiting(self) -> int:
        """Jobs queued behind the running one."""
        return self._jobs.qsize()

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
