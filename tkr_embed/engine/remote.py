"""FrontendService: the EmbeddingService of a front-end process (server.frontends > 1).

The same hot path as in one process (cache lookup, prepare in the CPU pool, await one future per
item, normalise, cache fill: all inherited), but the batcher and the MLX worker are the engine
process's, reached through an EngineLink (link.py). Each front end keeps its own cache. Figures
the engine owns (queue, batches, worker, MLX memory) come from the snapshot the engine sends
every second, so /info, /metrics and /ready read them without a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from pathlib import Path
from typing import Callable

from ..config import Settings
from ..models.registry import LoadedModel, ResolvedModel, load_preparer
from .link import STATS_INTERVAL_SECONDS, EngineLink
from .service import EmbeddingService

log = logging.getLogger(__name__)

# No snapshot for this long: the engine is wedged (its event loop answers the stats request).
SNAPSHOT_STALE_SECONDS = 10.0


class _EngineFigures:
    """One part of the engine's latest snapshot (link.py), read without a round trip."""

    part = ""

    def __init__(self, link: EngineLink):
        self.link = link

    def _figures(self) -> dict:
        return self.link.snapshot.get(self.part, {})

    def _get(self, key: str, default=0):
        return self._figures().get(key, default)


class RemoteBatcher(_EngineFigures):
    """The engine's batcher as the service and the API see it: submit() plus its figures."""

    part = "batcher"

    def __init__(self, link: EngineLink):
        super().__init__(link)
        self.submit = link.submit

    def stats(self) -> dict:
        return dict(self._figures())

    depth = property(lambda self: self._get("queue_depth"))
    items_dropped = property(lambda self: self._get("items_dropped"))
    padded_tokens = property(lambda self: self.link.snapshot.get("padded_tokens", 0))

    async def stop(self) -> None:
        pass


class RemoteWorker(_EngineFigures):
    """The engine's MLX worker as /ready and /metrics see it."""

    part = "worker"

    busy_seconds = property(lambda self: self._get("busy_seconds", 0.0))
    jobs_run = property(lambda self: self._get("jobs_run"))
    memory = property(lambda self: self._get("memory", {}))

    def stalled(self, limit_seconds: float) -> str | None:
        if self.link.closed.done():
            return "the engine process is not reachable"
        if self.link.snapshot_at and time.monotonic() - self.link.snapshot_at > SNAPSHOT_STALE_SECONDS:
            return f"the engine process has not answered for over {SNAPSHOT_STALE_SECONDS:.0f} s"
        if not self._get("alive", True):
            return "the MLX worker is not running"
        running = self._get("job_running_seconds", None)
        if running is not None and running > limit_seconds:
            return f"the MLX worker has been running one job for over {limit_seconds:.0f} s"
        return None


class FrontendService(EmbeddingService):
    def __init__(self, settings: Settings, engine_socket: str, index: int = 0, engine_pid: int | None = None):
        """engine_pid: the engine process (this front end's parent); while it lives, linking is
        retried (it may be loading a model for minutes); once it is gone, start() fails."""
        super().__init__(settings)
        self.engine_socket = engine_socket
        self.engine_pid = engine_pid
        self.index = index
        self.link: EngineLink | None = None
        self._stats_task: asyncio.Task | None = None
        self.on_engine_lost: Callable[[], None] | None = None  # the process leaves (serving.py)

    async def start(self) -> None:
        pid = self.engine_pid
        self.link = link = await EngineLink.connect(self.engine_socket, lambda: pid is None or os.getppid() == pid)
        link.closed.add_done_callback(lambda _: self.on_engine_lost and self.on_engine_lost())
        meta = link.meta
        m = self.model_settings
        resolved = ResolvedModel(Path(meta["path"]), meta["model_id"], meta["revision"])
        loop = asyncio.get_running_loop()
        preparer = await loop.run_in_executor(self.cpu_pool, lambda: load_preparer(
            resolved, meta["quantization"], m.max_tokens, m.min_pixels, m.max_pixels))
        if (preparer.dimension, preparer.max_tokens) != (meta["dimension"], meta["max_tokens"]):
            raise RuntimeError(f"front end and engine disagree about the model: {preparer.dimension}-d, "
                               f"{preparer.max_tokens} tokens here; {meta['dimension']}-d, {meta['max_tokens']} there")
        self.worker = RemoteWorker(link)
        self.memory_bytes = meta["memory_bytes"]
        self._push_stats()
        await asyncio.wait_for(link.has_snapshot.wait(), SNAPSHOT_STALE_SECONDS)  # /info and /admin/stats read it
        self._stats_task = loop.create_task(self._stats_loop(), name="engine-stats")
        self.loaded = LoadedModel(preparer, resolved, meta["family"], meta["quantization"], meta["load_seconds"])
        self.batcher = RemoteBatcher(link)
        log.info("front end %d linked to the engine (%s, %d-d)", self.index, resolved.model_id, preparer.dimension)
        gc.collect()
        gc.freeze()  # as the engine does: long-lived objects out of the collector's view

    def _push_stats(self) -> None:
        self.link.send_stats(EmbeddingService.counters(self))  # this front end's own

    async def _stats_loop(self) -> None:
        while not self.link.closed.done():
            await asyncio.sleep(STATS_INTERVAL_SECONDS)
            self._push_stats()

    async def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
        if self.link is not None:
            await self.link.close()
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    def counters(self) -> dict:
        """Every front end's item, token and cache counters summed (by the engine, each second)."""
        return self.link.snapshot.get("frontends") or super().counters()

    def batch_sizes(self) -> dict[int, int]:
        return {int(k): v for k, v in self.link.snapshot.get("batch_sizes", {}).items()}

    def shape_times(self) -> list[dict] | None:
        return self.link.snapshot.get("worker", {}).get("shapes")

    def replica_stats(self) -> list[dict]:
        return self.link.snapshot.get("worker", {}).get("replicas", [])

    def engine_layout(self) -> dict:
        """The engine process's (it runs the model; this process only prepares inputs)."""
        return self.link.meta["layout"]

    def info(self) -> dict:
        info = super().info()  # memory.mlx and worker: the engine's, from its snapshot
        info["cache"]["scope"] = f"front end {self.index} of {self.settings.server.frontends}"
        info["frontends"] = {
            "count": self.settings.server.frontends, "this": self.index,
            "linked": self.link.snapshot.get("connections", 0),
            # this front end's requests, from sending to the engine to its answer
            "engine_answers": self.link.answered,
            "engine_answer_mean_ms": round(1000 * self.link.answer_seconds / max(1, self.link.answered), 3)}
        return info
