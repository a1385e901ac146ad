"""The model pool: several models served at once, each addressed by its name or an alias.

The default model (settings.model) is always loaded; `settings.models` adds more. Every model is an
EmbeddingService of its own (cache, batcher) on the default service's one MLX worker thread, so MLX
is still touched by one thread only. A model that is not preloaded loads on first use; concurrent
requests for it share that one load. Under a memory budget (pool.memory_budget_mb), the least
recently used idle model that is not preloaded is unloaded before another one loads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelSettings, Settings
from .service import EmbeddingService

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


class OverBudget(RuntimeError):
    pass


class ModelBusy(RuntimeError):
    pass


def model_name(m: ModelSettings) -> str:
    """The id a model is addressed by before it is loaded: its name, else its path's last part."""
    return m.name or m.path.rstrip("/").split("/")[-1]


@dataclass
class PoolEntry:
    settings: ModelSettings
    service: EmbeddingService | None = None
    loading: asyncio.Task | None = None
    last_used: float = 0.0
    loads: int = 0
    names: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> bool:
        return self.service is not None and self.service.ready

    @property
    def label(self) -> str:
        """The model's id once loaded, else its configured name (or path)."""
        return self.service.model_id if self.loaded else (self.names or [self.settings.path])[0]


class ModelPool:
    def __init__(self, settings: Settings, default: EmbeddingService):
        self.settings = settings
        self.default = default
        budget = settings.pool.memory_budget_mb
        self.budget_bytes = int(budget * 1024 * 1024) if budget else None
        first = PoolEntry(settings.model, service=default)
        self.entries: list[PoolEntry] = [first] + [PoolEntry(m) for m in settings.models]
        for e in self.entries:
            e.names = [model_name(e.settings), *e.settings.aliases]
        if settings.model.name is None:  # the default's id is what loading finds (e.g. the repo id)
            first.names = list(settings.model.aliases)
        self._lock = asyncio.Lock()  # eviction decisions and load starts, one at a time

    # ---- lookup ----------------------------------------------------------------------------
    def entry(self, name: str | None) -> PoolEntry:
        if name is None:
            return self.entries[0]
        for e in self.entries:
            if name in e.names or (e.service is not None and e.service.ready and name == e.service.model_id):
                return e
        if not self.entries[0].loaded:
            return self.entries[0]  # its id is not known before it loads: the caller answers "loading"
        raise UnknownModel(name)

    def served_names(self) -> list[str]:
        out: list[str] = []
        for e in self.entries:
            for n in ([e.service.model_id] if e.loaded else []) + e.names:
                if n not in out:
                    out.append(n)
        return out

    # ---- use -------------------------------------------------------------------------------
    async def get(self, name: str | None) -> EmbeddingService:
        """The ready service for a model name (None: the default), loading it if needed."""
        e = self.entry(name)
        e.last_used = time.monotonic()
        if e.loaded:
            return e.service
        async with self._lock:
            if e.loading is None or e.loading.done():
                if e.loaded:
                    return e.service
                e.loading = asyncio.get_running_loop().create_task(self._load(e), name=f"load {e.label}")
            task = e.loading
        await asyncio.shield(task)  # one load, however many requests wait for it
        return e.service

    async def load(self, name: str) -> PoolEntry:
        await self.get(name)
        return self.entry(name)

    async def _load(self, e: PoolEntry) -> None:
        need = estimate_bytes(e.settings)
        async with self._lock:
            await self._make_room(need, keep=e)
        service = EmbeddingService(self.settings, model=e.settings, shared_with=self.default)
        service.on_batch = self.default.on_batch
        await service.start()
        e.service, e.loads = service, e.loads + 1
        log.info("pool: loaded %s (%.1f MB; %s)", service.model_id, service.memory_bytes / 2**20, self._usage())

    async def _make_room(self, need: int, keep: PoolEntry) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes() + need > self.budget_bytes:
            idle = [e for e in self.entries if e is not keep and e.loaded and not e.settings.preload
                    and e is not self.entries[0] and e.service.active_requests == 0
                    and (e.service.batcher is None or e.service.batcher.depth == 0)]
            if not idle:
                raise OverBudget(f"loading {keep.label} needs ~{need / 2**20:.0f} MB; {self._usage()} and "
                                 "no idle model that is not preloaded can be unloaded")
            victim = min(idle, key=lambda x: x.last_used)
            log.info("pool: unloading %s (least recently used) to make room for %s", victim.label, keep.label)
            await self._unload(victim)

    async def unload(self, name: str) -> PoolEntry:
        e = self.entry(name)
        if e is self.entries[0]:
            raise ModelBusy("the default model stays loaded (it is the one requests without a model use)")
        if e.loaded and e.service.active_requests:
            raise ModelBusy(f"{name} is serving {e.service.active_requests} request(s); try again")
        async with self._lock:
            await self._unload(e)
        return e

    async def _unload(self, e: PoolEntry) -> None:
        service, e.service = e.service, None
        if service is not None:
            await service.stop()

    async def start_preloaded(self) -> None:
        for e in self.entries[1:]:
            if e.settings.preload:
                await self.get(e.label)

    async def stop(self) -> None:
        for e in self.entries[1:]:
            if e.loading is not None and not e.loading.done():
                e.loading.cancel()
            await self._unload(e)

    # ---- figures ---------------------------------------------------------------------------
    def used_bytes(self) -> int:
        return sum(e.service.memory_bytes for e in self.entries if e.loaded)

    def _usage(self) -> str:
        budget = f" of {self.budget_bytes / 2**20:.0f} MB" if self.budget_bytes else ""
        return f"{self.used_bytes() / 2**20:.1f} MB in use{budget}"

    def describe(self) -> dict:
        now = time.monotonic()
        models = []
        for i, e in enumerate(self.entries):
            s = e.service if e.loaded else None
            models.append({
                "id": e.label, "names": e.names, "path": e.settings.path,
                "default": i == 0, "preload": i == 0 or e.settings.preload,
                "status": "loaded" if s else "loading" if e.loading and not e.loading.done() else "unloaded",
                "memory_bytes": s.memory_bytes if s else 0,
                "estimated_bytes": estimate_bytes(e.settings),
                "active_requests": s.active_requests if s else 0,
                "idle_seconds": round(now - e.last_used, 1) if e.last_used else None,
                "loads": e.loads + (1 if i == 0 else 0),
                "dimension": s.dimension if s else None,
            })
        return {"models": models, "memory": {"used_bytes": self.used_bytes(), "budget_bytes": self.budget_bytes}}


def estimate_bytes(m: ModelSettings) -> int:
    """Before loading: the weights' size on disk, when the model is a local directory (an upper
    bound for full precision; quantising on load takes less). 0 when unknown (not downloaded)."""
    from ..models.registry import resolve_model_dir

    if not (m.path.startswith("pkg://") or Path(m.path).is_dir()):
        return 0  # a Hub id: resolving it could download; no estimate before the first load
    try:
        path = resolve_model_dir(m.path, m.name, m.revision, m.download_dir).path
    except Exception:  # noqa: BLE001 - a broken entry fails at load, with its own message
        return 0
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
