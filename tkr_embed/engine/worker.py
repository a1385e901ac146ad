"""The one thread that touches MLX.

MLX is not thread-safe (and since 0.31.2 a stream made on one thread is invisible to others), so
loading, every forward pass and every mx.eval run here, one job at a time. The event loop only
awaits the futures this thread resolves.

Batches can overlap on the device (engine.pipeline_depth): a batch job launches its forward pass
(mx.async_eval) and the worker collects the vectors later, so the next batch's graph is built and
queued while this one runs. Between launches the worker waits for another job until the oldest
batch should be done (its shape's last measured device time), then blocks on it: a batch's
vectors are never held back much longer than the device takes. On an H100 (bench/stream_overlap.py)
two batches in flight took 32 short texts from 2,382 to 2,967 items/s, the rate one batch of 64
had one at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)

_STOP = object()

# Collecting a batch that was already done takes microseconds; longer means the worker waited.
_WAITED = 0.0002
_EARLY = 0.9


class WorkerStopped(RuntimeError):
    pass


class _InFlight:
    """A launched batch (whatever its launch returned: anything with collect()) awaiting collection."""

    __slots__ = ("pending", "future", "started", "shape")

    def __init__(self, pending: Any, future: concurrent.futures.Future, started: float):
        self.pending, self.future, self.started = pending, future, started
        self.shape = getattr(pending, "shape", None)


class MLXWorker:
    def __init__(self, device: str = "auto", pipeline_depth: int = 1):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mlx-worker", daemon=True)
        self._device = device
        self._stopped = False
        self.pipeline_depth = pipeline_depth  # launched batches not yet collected, at most
        self.busy_seconds = 0.0
        self.jobs_run = 0
        self.overlapped = 0  # batches launched while another was still on the device
        self.memory: dict[str, int] = {}  # refreshed after each job; read by /info without MLX calls
        self.job_started_at: float | None = None  # monotonic time the running job began (None: idle)
        self._in_flight: deque[_InFlight] = deque()
        # Device seconds per batch shape (from launch, or from the previous batch's end, to done):
        # how long to keep taking jobs before blocking on the oldest batch.
        self._device_seconds: dict[tuple, float] = {}

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
        while True:
            job = self._next_job()
            if job is None:  # collected a batch instead
                continue
            if job is _STOP:
                while self._in_flight:
                    self._collect()
                return
            fn, args, fut, launches = job
            if not fut.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            self.job_started_at = time.monotonic()
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting coroutine
                fut.set_exception(e)
            else:
                if launches:
                    self.overlapped += bool(self._in_flight)
                    self._in_flight.append(_InFlight(result, fut, time.perf_counter()))
                else:
                    fut.set_result(result)
            finally:
                self.job_started_at = None
                self.busy_seconds += time.perf_counter() - start
                self.jobs_run += 1
                if not launches:
                    self._record_memory(mx)

    def _next_job(self):
        """The next job, or None after collecting the oldest batch (when the pipeline is full, or
        no job came before that batch should be done)."""
        if not self._in_flight:
            return self._jobs.get()
        if len(self._in_flight) >= self.pipeline_depth:
            self._collect()
            return None
        oldest = self._in_flight[0]
        # A little before it should be done, so that collecting it usually waits a moment: that
        # wait is what measures the device time (a batch found already done only bounds it).
        expected = _EARLY * self._device_seconds.get(oldest.shape, 0.0)
        wait = oldest.started + expected - time.perf_counter()
        try:
            return self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
        except queue.Empty:
            self._collect()
            return None

    def _collect(self) -> None:
        import mlx.core as mx

        done = self._in_flight.popleft()
        begin = time.perf_counter()
        self.job_started_at = time.monotonic()
        try:
            result = done.pending.collect()
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting coroutine
            done.future.set_exception(e)
        else:
            done.future.set_result(result)
        finally:
            end = time.perf_counter()
            self.job_started_at = None
            self.busy_seconds += end - begin
            self._record_memory(mx)
        if done.shape is not None:
            known = self._device_seconds.get(done.shape)
            took = end - done.started
            if end - begin > _WAITED or known is None:  # the device finished just now: a measurement
                self._device_seconds[done.shape] = took if known is None else 0.7 * known + 0.3 * took
            else:  # done before the worker looked: it waited too long for jobs; wait less next time
                self._device_seconds[done.shape] = min(known, took) * 0.8
        if self._in_flight:  # the next batch ran on the device after this one
            nxt = self._in_flight[0]
            nxt.started = max(nxt.started, end)

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

    def _enqueue(self, fn: Callable[..., Any], args: tuple, launches: bool = False) -> concurrent.futures.Future:
        if self._stopped:
            raise WorkerStopped("the MLX worker has stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, fut, launches))
        return fut

    def submit(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """Run fn(*args) on the worker; await the returned future from the event loop."""
        return asyncio.wrap_future(self._enqueue(fn, args))

    def submit_launch(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """Run fn(*args), which launches work on the device and returns an object with collect();
        the future resolves to collect()'s result once the worker collects it (in launch order)."""
        return asyncio.wrap_future(self._enqueue(fn, args, launches=True))

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
