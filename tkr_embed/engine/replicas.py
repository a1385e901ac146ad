"""Engine replicas on MLX's CPU backend: processes that each run whole batches on one core.

The engine's other way to use several cores, CPU streams (engine/shards.py), splits every batch
into one part per core and joins the parts at the batch's end. On a machine whose cores the
server shares with its own event loop and its clients, a preempted stream then leaves the other
cores idle at every batch's end: a bursty neighbour of an eighth of a core cost the raw engine
8.7-9.6% on 2 cores (docs/benchmarks.md, "where the server's idle time comes from"). Replicas
never join: each takes the next batch from the batcher the moment its last one ends, so a core
that is preempted delays only its own batch.

Each replica is a process with its own copy of the model (its own GIL and MLX: MLX cannot be
called from two threads of one process), fed by a thread of this process (a lane) over a pipe:
prepared items (numpy arrays) in, the batch's float32 vectors out. Pickle is only safe between
trusted peers; both ends are this server's own processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from ..models.base import Prepared
from .jobs import JobThread

log = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 600.0  # loading a model from disk and its first forward pass


def resolve_replicas(setting: int, on_cpu: bool, packs: bool, cores: int, bucketed: bool = False) -> int:
    """engine.cpu_replicas: 0 = auto, one per core on Linux's CPU backend where the model runs
    packed sequences (the small BERT-family text encoders, whose copies cost little memory);
    otherwise no replicas. Replicas run only on the CPU backend, and never where batches are
    padded to bucketed shapes (engine.shape_buckets): a replica runs the streams' own forward,
    unbucketed. 1: no replicas."""
    if not on_cpu or bucketed:
        return 1
    if setting == 0:
        return cores if packs and sys.platform.startswith("linux") else 1
    return setting


class ReplicaFailed(RuntimeError):
    """The replica process died or could not load the model."""


def name_process(name: str) -> None:
    """The process's name as ps, top and /proc/PID/comm show it (Linux; at most 15 bytes): a
    replica reads as tkr-replica-N, not as one more python."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


def _replica_main(conn, name: str, resolved, load_args: tuple, buffer_cache_mb: int, pack: bool) -> None:
    """The replica process: load the model on the CPU backend, one core's worth of threads, then
    answer batches until the pipe closes. One thread only: it is the only one that touches MLX."""
    name_process(name)
    try:
        import mlx.core as mx

        from ..blas import set_blas_threads
        from ..models.registry import load_embedder
        from .buffer_cache import set_cpu_buffer_cache
        from .shards import ShardedForward

        mx.set_default_device(mx.cpu)
        set_cpu_buffer_cache(buffer_cache_mb, True)
        set_blas_threads(1, quiet=True)  # this replica's matmuls on its own core
        embedder = load_embedder(resolved, *load_args).embedder
        forward = ShardedForward(1, pack=pack)
        forward.adopt(embedder)
        conn.send(("ready", os.getpid()))
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which refuses to start
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went away
            return
        if message is None:
            return
        try:
            conn.send(("ok", forward(embedder, message)))
        except Exception as exc:  # noqa: BLE001 - the batcher retries the items one by one
            conn.send(("err", f"{type(exc).__name__}: {exc}"))


class ReplicaLane(JobThread):
    """One replica process and the thread of this process that feeds it (engine/jobs.py: what the
    batcher needs of a worker), plus `forward`, which runs a batch on the replica."""

    def __init__(self, index: int, resolved, load_args: tuple, buffer_cache_mb: int, pack: bool):
        super().__init__(f"replica-lane-{index}")
        self._spawn_args = (resolved, load_args, buffer_cache_mb, pack)
        self.index = index
        self.pid: int | None = None
        # jobs_run counts the batcher's steps on this lane (lone items among them run elsewhere)
        self.batches_sent = 0  # batches the replica process ran
        self.restarts = 0
        self._process = self._conn = None

    def start(self) -> None:
        """Blocking: start the process and wait until its model is loaded."""
        self._spawn()
        super().start()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has MLX's threads
        self._conn, child = ctx.Pipe()
        name = f"tkr-replica-{self.index}"
        self._process = ctx.Process(target=_replica_main, name=name, daemon=True,
                                    args=(child, name, *self._spawn_args))
        self._process.start()
        child.close()
        if not self._conn.poll(START_TIMEOUT_SECONDS):
            self._process.kill()
            raise ReplicaFailed(f"replica {self.index} did not load the model in {START_TIMEOUT_SECONDS:.0f} s")
        status, detail = self._recv()
        if status != "ready":
            raise ReplicaFailed(f"replica {self.index} could not load the model: {detail}")
        self.pid = detail

    def _recv(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            self._process.join(1)
            raise ReplicaFailed(f"replica {self.index} died (exit code {self._process.exitcode})") from exc

    def forward(self, batch: Sequence[Prepared]) -> np.ndarray:
        """The lane's thread: the batch's vectors from the replica. A replica that
        died is started again before this fails: the batch is lost (the batcher retries its items
        one by one, so an item that kills a replica fails alone), the lane is not."""
        self.batches_sent += 1
        try:
            self._conn.send(list(batch))
            status, result = self._recv()
        except (ReplicaFailed, OSError) as exc:
            if self._stopped:
                raise ReplicaFailed(f"replica {self.index} has stopped") from exc
            log.error("replica %d failed running a batch of %d (%s); starting it again", self.index, len(batch), exc)
            self.restarts += 1
            self._conn.close()
            self._spawn()
            raise ReplicaFailed(f"the engine replica running this batch died ({exc}); it was restarted") from exc
        if status != "ok":
            raise RuntimeError(result)
        return result

    def stats(self) -> dict:
        return {"pid": self.pid, "busy_seconds": round(self.busy_seconds, 3), "batches": self.batches_sent,
                "restarts": self.restarts}

    def _stopped_error(self) -> Exception:
        return ReplicaFailed(f"replica {self.index} has stopped")

    def stop(self, timeout: float = 10.0) -> None:
        """The lane takes no more jobs (one running finishes), and the replica exits."""
        if not self._close() or self._process is None:
            return
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def start_all(lanes: Sequence[ReplicaLane], warm: Sequence[Prepared] = ()) -> None:
    """Blocking: start the lanes' replicas in parallel (each loads the model), then run `warm` on
    each, in parallel too. If any fails, every lane is stopped and ReplicaFailed raised."""
    if not lanes:
        return
    try:
        with ThreadPoolExecutor(len(lanes)) as pool:
            list(pool.map(ReplicaLane.start, lanes))
            if warm:
                list(pool.map(lambda lane: lane.forward(warm), lanes))
    except BaseException:
        for lane in lanes:
            lane.stop()
        raise
