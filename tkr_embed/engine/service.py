"""EmbeddingService: the one entry point routes call.

embed(items) -> vectors, in order: cache lookup -> prepare misses in the CPU pool (tokenise,
resize images) -> batcher -> MLX worker -> normalise -> cache fill. Routes never see MLX or a model.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import resource
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..config import ModelSettings, Settings
from ..cores import available_cores
from ..models.base import IMAGE, EmbedItem, Prepared, UnsupportedInput
from ..models.registry import LoadedModel, ResolvedModel, load_embedder, resolve_model_dir
from .batcher import Batcher, resolve_batch_tokens
from .buffer_cache import resolve_cpu_buffer_cache
from .cache import EmbeddingCache, item_key
from .replicas import ReplicaFailed, ReplicaLane, resolve_replicas, start_all
from .shapes import buckets_up_to
from .shards import ShardedForward, make_sharded_forward
from .worker import MLXWorker

log = logging.getLogger(__name__)


class ModalityNotSupported(ValueError):
    """An image was sent to a text-only model."""


class TooManyTokens(ValueError):
    """truncate=False and some inputs exceed the model's limit: (index, tokens) for each."""

    def __init__(self, offenders: list[tuple[int, int]], limit: int):
        listed = ", ".join(f"input[{i}] has {n} tokens" for i, n in offenders)
        super().__init__(f"{listed}; the model accepts at most {limit} (send truncate: true to cut them)")
        self.offenders = offenders
        self.limit = limit


@dataclass
class EmbedResult:
    vectors: np.ndarray  # float32 [n, dimension]
    cached: list[bool]
    token_counts: list[int]  # tokens per item, no padding (a cache hit reports what it cost when computed)
    truncated: list[bool]


def l2_normalize(v: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


class ModelUnloaded(RuntimeError):
    """The model was unloaded (evicted) between a request finding it and embedding: retry."""


def _load_measured(resolved: ResolvedModel, *args) -> tuple[LoadedModel, int]:
    """Worker thread: load, and how much MLX memory the model took (the pool's budget counts it)."""
    import mlx.core as mx

    before = mx.get_active_memory()
    loaded = load_embedder(resolved, *args)
    return loaded, max(0, int(mx.get_active_memory()) - int(before))


def _release(loaded: LoadedModel) -> None:
    """Worker thread: drop a model's arrays and return the freed buffers to the system."""
    import mlx.core as mx

    del loaded
    gc.collect()
    mx.clear_cache()


class EmbeddingService:
    def __init__(self, settings: Settings, resolved: ResolvedModel | None = None,
                 model: ModelSettings | None = None, shared_with: "EmbeddingService | None" = None):
        """resolved: the model directory when the caller already found it (the CLI does, to
        report a missing or unsupported model before the server starts).
        model: which model (default: settings.model). shared_with: another service whose MLX
        worker and CPU pool this one uses (the model pool: one thread touches MLX, always)."""
        self.settings = settings
        self.model_settings = model or settings.model
        self._resolved = resolved
        self._owns_worker = shared_with is None
        self._shared_with = shared_with
        self.sharded: ShardedForward | None = None  # made on the worker at start (shared in a pool)
        self.replicas: list[ReplicaLane] = []  # engine.cpu_replicas: processes that run the batches (engine/replicas.py)
        if shared_with is None:
            self.worker = MLXWorker(settings.model.device, settings.engine.cpu_buffer_cache_mb)
            self.cpu_pool = ThreadPoolExecutor(settings.engine.cpu_threads or available_cores(),
                                               thread_name_prefix="tkr-cpu")
        else:
            self.worker, self.cpu_pool = shared_with.worker, shared_with.cpu_pool
        self.active_requests = 0  # embed() calls in progress (the pool never evicts a busy model)
        self.memory_bytes = 0  # MLX memory the loaded weights took (measured on the worker)
        c = settings.cache
        self.cache = EmbeddingCache(c.max_size, c.ttl_seconds, c.enabled)
        self.loaded: LoadedModel | None = None
        self.batcher: Batcher | None = None
        self.started_at = time.time()
        # Read by /metrics and /admin/stats (event-loop thread only, so plain counters).
        self.items_by_modality: Counter[str] = Counter()
        self.tokens_total = 0
        self.on_batch: Callable[[int], None] | None = None  # observer of each forward pass's size

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        m = self.model_settings
        loop = asyncio.get_running_loop()
        # Resolving may download (network, disk): keep it off the event loop, and off the worker.
        resolved = self._resolved or await loop.run_in_executor(
            self.cpu_pool, lambda: resolve_model_dir(m.path, m.name, m.revision, m.download_dir)
        )
        if self._owns_worker:
            self.worker.start()
            e = self.settings.engine
            self.sharded = await self.worker.submit(make_sharded_forward, e.cpu_shards, e.shape_buckets,
                                                    e.max_batch_items, e.compile, e.length_buckets,
                                                    e.pack_sequences)
        else:
            self.sharded = self._shared_with.sharded
        self.loaded, self.memory_bytes = await self.worker.submit(
            _load_measured, resolved, m.quantization, m.max_tokens, m.min_pixels, m.max_pixels
        )
        emb = self.loaded.embedder
        await self.worker.submit(self.sharded.adopt, emb)
        log.info("loaded %s (%s, %d-d, quantization %s) in %.2fs", resolved.model_id, self.loaded.family,
                 emb.dimension, self.loaded.quantization, self.loaded.load_seconds)
        e = self.settings.engine
        max_tokens = resolve_batch_tokens(e.max_batch_tokens, self.sharded.on_cpu)
        # The budget counts the shape the device runs (bucketed rows and length on CUDA): measured
        # on an H100, images 10% and long texts 5% faster than counting items x longest.
        padded = self.sharded.padded_tokens(emb.max_tokens)
        forward = functools.partial(self.sharded, emb)  # worker thread: a batch's vectors
        warm = EmbedItem(text="warm-up")
        prepared = await loop.run_in_executor(self.cpu_pool, emb.prepare, warm)
        self.replicas = await self._start_replicas(resolved, [prepared])
        self.batcher = Batcher(self.worker, forward, max_tokens, e.max_batch_items,
                               e.max_queue_items, e.retry_after_seconds, on_batch=self.on_batch,
                               min_padding_efficiency=e.min_padding_efficiency, padded_tokens=padded,
                               packed=self.sharded.packs(emb),
                               lanes=[(r, r.forward) for r in self.replicas],
                               # A lone item while the other replicas idle runs on this process's
                               # MLX worker, with a BLAS thread per core (ShardedForward._whole):
                               # at one client 22-24 ms per short text and 83-85 per long one
                               # there, against 26 and 91 on a replica (docs/benchmarks.md,
                               # "engine replicas instead of split batches").
                               lone=functools.partial(self.worker.call, forward))
        self.batcher.start()
        # Warm-up: the first forward pass compiles kernels; pay it now, not on a user's request
        # (one item per shard, so every CPU stream has run once).
        await self.worker.submit(forward, [prepared] * self.sharded.shards)
        if self.sharded.buckets is not None:  # and every bucketed batch size, at this length
            started, sizes = time.perf_counter(), buckets_up_to(e.max_batch_items)
            for size in sizes:
                await self.worker.submit(forward, [prepared] * size)
            log.info("warmed %d batch shapes in %.1fs", len(sizes), time.perf_counter() - started)
        # Everything alive now (the model, the libraries) lives as long as the process: take it out
        # of the garbage collector's view. Without this, each full collection walked millions of
        # import-time objects and stalled the event loop for ~0.2 s (p95 at 64 clients: 250 ms).
        # (Only for the default model: a pooled one may be evicted, and frozen objects are never collected.)
        if self._owns_worker:
            gc.collect()
            gc.freeze()

    async def _start_replicas(self, resolved: ResolvedModel, warm: list[Prepared]) -> list[ReplicaLane]:
        """engine.cpu_replicas > 1 on the CPU backend (the server's own model only, not a pooled
        one): the replica processes, started and warmed; [] otherwise."""
        m, e = self.model_settings, self.settings.engine
        n = resolve_replicas(e.cpu_replicas, self.sharded.on_cpu, self.sharded.packs(self.loaded.embedder),
                             available_cores(), bucketed=self.sharded.buckets is not None)
        if n <= 1 or not self._owns_worker:
            return []
        load_args = (m.quantization, m.max_tokens, m.min_pixels, m.max_pixels)
        # engine.cpu_buffer_cache_mb is the server's ceiling: each replica keeps its share of it
        cache_mb = max(1, (resolve_cpu_buffer_cache(e.cpu_buffer_cache_mb) // n) >> 20)
        replicas = [ReplicaLane(i, resolved, load_args, cache_mb, self.sharded.pack) for i in range(n)]
        try:
            await asyncio.get_running_loop().run_in_executor(None, start_all, replicas, warm)
        except ReplicaFailed as exc:
            if e.cpu_replicas:  # asked for: the server does not start without them
                raise
            log.warning("engine replicas did not start (%s): batches split across CPU streams instead", exc)
            return []
        log.info("batches run on %d replica processes, one core each (engine.cpu_replicas)", n)
        return replicas

    async def stop(self) -> None:
        if self.batcher:
            await self.batcher.stop()
        for r in self.replicas:
            await asyncio.get_running_loop().run_in_executor(None, r.stop)
        if not self._owns_worker:  # a pooled model: free its weights, leave the shared worker running
            loaded, self.loaded, self.batcher = self.loaded, None, None
            if loaded is not None:
                await self.worker.submit(_release, loaded)
            return
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)

    # ---- properties the API reads -------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.loaded is not None and self.batcher is not None

    @property
    def model_id(self) -> str:
        return self.loaded.resolved.model_id

    @property
    def dimension(self) -> int:
        return self.loaded.embedder.dimension

    @property
    def modalities(self) -> frozenset[str]:
        return self.loaded.embedder.modalities

    @property
    def _model_key(self) -> str:
        r = self.loaded.resolved
        return f"{r.model_id}|{r.revision}|{self.loaded.quantization}"

    # ---- the hot path ----------------------------------------------------------------------
    def require_images(self) -> None:
        if IMAGE not in self.modalities:
            raise ModalityNotSupported(
                f"model '{self.model_id}' embeds text only; to embed images, serve a multimodal model "
                f"(config key model.path / EMBEDDING_MODEL_PATH, e.g. OpenSearch-AI/Ops-MM-embedding-v1-7B)"
            )

    def _check_modalities(self, items: Sequence[EmbedItem]) -> None:
        if any(i.images for i in items):
            self.require_images()
        for i in items:
            if i.text is None and not i.images:
                raise UnsupportedInput("an item needs text, an image, or both")

    def decode_tokens(self, ids: list[int]) -> str:
        """Token ids -> text with the served model's tokenizer (CPU work, no MLX)."""
        emb = self.loaded.embedder
        bad = [t for t in ids if not 0 <= t < emb.vocab_size]
        if bad:
            raise UnsupportedInput(f"token id {bad[0]} is outside the model's vocabulary (0..{emb.vocab_size - 1})")
        return emb.decode(ids)

    def _prepare_inline(self, items: Sequence[EmbedItem]) -> bool:
        """Short text-only requests are tokenised on the event loop (engine.inline_prepare_chars):
        ~50 us for ~100 characters, the tokeniser releasing the GIL meanwhile. The hand-off to the
        CPU pool and back cost as much on 2 CPU cores, and an H100 host's front ends ~0.3 ms of
        CPU per request more (docs/benchmarks.md, "The request path, leaner"). Anything longer,
        or with images, still goes to the pool so the loop never stalls."""
        budget = self.settings.engine.inline_prepare_chars
        for item in items:
            if item.images or item.text is None:
                return False
            budget -= len(item.text) + len(item.instruction or "")
            if budget < 0:
                return False
        return True

    def _prepare_all(self, items: Sequence[EmbedItem]) -> list[Prepared]:
        emb = self.loaded.embedder
        return [emb.prepare(i) for i in items]

    async def embed(self, items: Sequence[EmbedItem], normalize: bool = True, truncate: bool = True) -> EmbedResult:
        """Vectors for items, in order. truncate=False refuses (TooManyTokens) rather than cuts
        inputs over the model's token limit; nothing is computed then."""
        if not self.ready:
            raise ModelUnloaded(f"the model {self.model_settings.name or self.model_settings.path} was unloaded; retry")
        self.active_requests += 1
        try:
            return await self._embed(items, normalize, truncate)
        finally:
            self.active_requests -= 1

    async def _embed(self, items: Sequence[EmbedItem], normalize: bool, truncate: bool) -> EmbedResult:
        self._check_modalities(items)
        keys = [item_key(self._model_key, it, normalize) for it in items]
        n = len(items)
        out: list[np.ndarray | None] = [None] * n
        cached = [False] * n
        tokens = [0] * n
        full = [0] * n
        # Identical items within one request are computed once.
        todo: dict[str, list[int]] = {}
        for idx, key in enumerate(keys):
            hit = self.cache.get(key)
            if hit is not None:
                out[idx] = hit.vector
                cached[idx] = True
                tokens[idx], full[idx] = hit.tokens, hit.full_tokens
            else:
                todo.setdefault(key, []).append(idx)
        if todo:
            new_items = [items[idxs[0]] for idxs in todo.values()]
            if self._prepare_inline(new_items):
                prepared = self._prepare_all(new_items)
            else:
                prepared = await asyncio.get_running_loop().run_in_executor(self.cpu_pool, self._prepare_all, new_items)
            for idxs, p in zip(todo.values(), prepared):
                for idx in idxs:
                    tokens[idx], full[idx] = p.num_tokens, p.full_tokens
        if not truncate:
            offenders = [(i, f) for i, (t, f) in enumerate(zip(tokens, full)) if f > t]
            if offenders:
                raise TooManyTokens(offenders, self.loaded.embedder.max_tokens)
        if todo:
            futures = self.batcher.submit(prepared)
            try:
                raw = await asyncio.gather(*futures)
            except BaseException:
                for f in futures:  # the client went away (or a batch failed): drop what is still queued
                    f.cancel()
                raise
            for (key, idxs), p, vec in zip(todo.items(), prepared, raw):
                vec = np.asarray(vec, dtype=np.float32)
                if normalize:
                    vec = l2_normalize(vec)
                self.cache.put(key, vec, p.num_tokens, p.full_tokens)
                for idx in idxs:
                    out[idx] = vec
        truncated = [f > t for t, f in zip(tokens, full)]
        for it in items:
            self.items_by_modality["+".join(sorted(it.modalities))] += 1
        self.tokens_total += sum(tokens)
        return EmbedResult(np.stack(out).astype(np.float32, copy=False), cached, tokens, truncated)

    # ---- introspection ---------------------------------------------------------------------
    def counters(self) -> dict:
        """Items, tokens and cache figures for /metrics (a front end reports everyone's: remote.py)."""
        return {"items_by_modality": dict(self.items_by_modality), "tokens_total": self.tokens_total,
                "cache_hits": self.cache.hits, "cache_misses": self.cache.misses,
                "cache_size": self.cache.stats()["size"]}

    def batch_sizes(self) -> dict[int, int] | None:
        """Forward passes by size, where the Metrics histogram cannot observe them (None: it does)."""
        return None

    def shape_times(self) -> list[dict] | None:
        """Forward passes per bucketed shape and the worker's seconds in them, for /info (None:
        batches are not bucketed). Every model of a pool shares the worker, and this tally."""
        return self.sharded.shape_times()

    def replica_stats(self) -> list[dict]:
        """Each engine replica's pid, busy seconds, batches and restarts, for /info ([]: none)."""
        return [r.stats() for r in self.replicas]

    def engine_layout(self) -> dict:
        """How the engine runs the model: the model's own description and the forward pass's
        switches (a front end reports the engine process's, as it learned them on linking)."""
        emb = self.loaded.embedder
        return {"describe": emb.describe(),
                "cpu_shards": self.sharded.shards,  # CPU streams each batch is split across
                "cpu_replicas": len(self.replicas),  # processes that run whole batches (0: none)
                "shape_buckets": self.sharded.buckets is not None,  # batches padded to bucketed shapes
                "packed_sequences": self.sharded.packs(emb),  # batches run unpadded (models/packed_bert.py)
                "compiled": bool(getattr(emb, "compiled", False)),  # the decoder runs mx.compile'd
                # MiB of freed buffers MLX keeps for reuse on the CPU backend (None: MLX's own limit)
                "cpu_buffer_cache_mb": self.worker.cpu_buffer_cache_mb}

    def info(self) -> dict:
        lm = self.loaded
        emb = lm.embedder
        layout = self.engine_layout()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {
            "model": {
                "id": lm.resolved.model_id,
                "family": lm.family,
                "dimension": emb.dimension,
                "modalities": sorted(emb.modalities),
                "max_tokens": emb.max_tokens,
                "quantization": lm.quantization,
                "revision": lm.resolved.revision,
                "load_seconds": round(lm.load_seconds, 3),
                **layout["describe"],
            },
            "memory": {
                "mlx": dict(self.worker.memory),
                "process_peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,
            },
            "cache": self.cache.stats(),
            "batcher": self.batcher.stats(),
            "worker": {
                "busy_seconds": round(self.worker.busy_seconds, 3),
                "jobs_run": self.worker.jobs_run,
                "device": self.settings.model.device,  # the worker's, shared by every model
                "shapes": self.shape_times(),  # bucketed shapes run: batches and seconds each
                "replicas": self.replica_stats(),  # engine.cpu_replicas: each one's work
                **{k: v for k, v in layout.items() if k != "describe"},  # describe went into "model"
            },
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }
