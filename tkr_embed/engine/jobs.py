"""A thread that runs queued jobs one at a time and keeps account of them.

Two things in the engine are such a thread: the MLX worker (engine/worker.py), the one thread
of the process that touches MLX, and each replica's lane (engine/replicas.py), the thread that
feeds a replica process. The batcher (engine/batcher.py) drives both the same way: it posts a
drain job, and the drain runs each batch as one step, timed here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable

_STOP = object()


class WorkerStopped(RuntimeError):
    pass


class JobThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopped = False
        self.busy_seconds = 0.0
        self.jobs_run = 0
        self.job_started_at: float | None = None  # monotonic time the running step began (None: idle)

    def start(self) -> None:
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    # ---- hooks for subclasses, both on the thread itself ----------------------------------------
    def _prepare_thread(self) -> None:
        """Before the first job."""

    def _after_step(self, whole_job: bool) -> None:
        """After each step (whole_job: the step was a job submitted whole, not a drain's step)."""

    # ---- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        self._prepare_thread()
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, fut, in_steps = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                # a job run in steps (the batcher's drain) accounts for each step itself
                result = fn(*args) if in_steps else self._account(fn, args, whole_job=True)
            except BaseException as e:  # noqa: BLE001 - delivered to whoever awaits the future
                fut.set_exception(e)
            else:
                fut.set_result(result)

    def step(self, fn: Callable[..., Any], *args: Any) -> Any:
        """The thread: fn(*args) as one unit of work, timed into busy_seconds, counted in jobs_run,
        its start shown in job_started_at."""
        return self._account(fn, args, whole_job=False)

    def _account(self, fn: Callable[..., Any], args: tuple, whole_job: bool) -> Any:
        start = time.perf_counter()
        self.job_started_at = time.monotonic()
        try:
            return fn(*args)
        finally:
            self.job_started_at = None
            self.busy_seconds += time.perf_counter() - start
            self.jobs_run += 1
            self._after_step(whole_job)

    # ---- any thread ---------------------------------------------------------------------------
    def _stopped_error(self) -> Exception:
        return WorkerStopped(f"the {self._thread.name} thread has stopped")

    def _enqueue(self, fn: Callable[..., Any], args: tuple, in_steps: bool = False) -> concurrent.futures.Future:
        if self._stopped:
            raise self._stopped_error()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, fut, in_steps))
        return fut

    def post(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Any thread, this one included: queue fn() as a job that runs its work in steps (each
        through step(), so busy_seconds and job_started_at see each step, not the whole job)."""
        return self._enqueue(fn, (), in_steps=True)

    @property
    def jobs_waiting(self) -> int:
        """Jobs queued behind the running one."""
        return self._jobs.qsize()

    def submit(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """Run fn(*args) on the thread; await the returned future from the event loop."""
        return asyncio.wrap_future(self._enqueue(fn, args))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Blocking variant of submit, for code without an event loop (CLI, tests, other threads)."""
        return self._enqueue(fn, args).result(timeout)

    def _close(self) -> bool:
        """Take no more jobs; the thread ends after the queued ones. False: already closed."""
        if self._stopped:
            return False
        self._stopped = True
        self._jobs.put(_STOP)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        if self._close() and self._thread.is_alive():
            self._thread.join(timeout)
