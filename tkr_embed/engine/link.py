"""The wire between HTTP front-end processes and the one engine process (server.frontends > 1).

One Python process spends ~0.6 ms of its one GIL per single-item request on HTTP, JSON, auth and
tokenising; at ~1,000 requests/s it is saturated while an H100 that embeds 3,000 short texts/s
sits mostly idle (docs/benchmarks.md). With several front ends, each process does that work for
its own connections and sends prepared items (token ids, pixels: numpy arrays) here; the engine
process batches items from every front end together, runs the MLX worker, and answers with the
raw pooled vectors. Front ends keep everything after that (normalising, their cache, encoding).

Frames on a Unix socket: a 4-byte big-endian length, then a pickled list of messages: whatever
one side produced in one event-loop turn goes out as one frame (a finished batch of 64 answers
its front ends with one write each, not 64). Pickle is only safe between trusted peers: the
socket lives in a directory only the server's user can open (serving.py).

front end -> engine                         engine -> front end
("embed", rid, [Prepared, ...])             ("ok", rid, float32 [n, d])
                                            ("full", rid, retry_after, depth, limit)  -> QueueFull
                                            ("err", rid, message)
("cancel", rid)      the client went away:  queued items are dropped before their forward pass
("stats", counters)  every second, with     ("stats", snapshot): the engine's batcher and worker,
                     this front end's        and every front end's counters summed (/metrics)
                     cache and item counters
On connect the engine first sends ("hello", meta): what the front end needs to prepare items.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import pickle
import struct
import time
from typing import Callable, Sequence

import numpy as np

from ..models.base import Prepared
from .batcher import QueueFull
from .service import ModelUnloaded

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
STATS_INTERVAL_SECONDS = 1.0


def frame(messages: list[tuple]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> list[tuple]:
    (n,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(n))


class Outbox:
    """Messages queued during one event-loop turn, written as one frame at its end."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer
        self._queued: list[tuple] = []

    def put(self, message: tuple) -> None:
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(message)

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        if not self._writer.is_closing():
            self._writer.write(frame(queued))


class EngineGone(ModelUnloaded):
    """The link to the engine process broke (it stopped or died): 503, retry (api/deps.py)."""


# ---- the engine side ---------------------------------------------------------------------------
def add_counters(total: dict, part: dict) -> None:
    """Sum one front end's counters into total (nested dicts of numbers, e.g. items by modality)."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_counters(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def hello_meta(service) -> dict:
    """What every front end learns on linking: the model, and how the engine runs it."""
    lm = service.loaded
    emb = lm.embedder
    return {
        "path": str(lm.resolved.path), "model_id": lm.resolved.model_id, "revision": lm.resolved.revision,
        "family": lm.family, "quantization": lm.quantization, "load_seconds": lm.load_seconds,
        "dimension": emb.dimension, "max_tokens": emb.max_tokens, "memory_bytes": service.memory_bytes,
        "layout": service.engine_layout(),
    }


class EngineHost:
    """Runs in the engine process, on its event loop: serves front ends from one EmbeddingService's
    batcher, once that service has started (the model loaded and warm)."""

    def __init__(self, service):
        self.service = service
        self.meta: dict = {}  # the ("hello", meta) every front end receives on connect
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._server: asyncio.AbstractServer | None = None
        self._counters: dict[int, dict] = {}  # per live connection: its front end's last counters
        self._retired: dict = {}  # counters of front ends that disconnected (totals never go back)
        self._conn_ids = itertools.count()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    def observe_batch(self, size: int) -> None:
        self.batch_sizes[size] += 1

    async def start(self, path: str) -> None:
        self.meta = hello_meta(self.service)
        self._server = await asyncio.start_unix_server(self._serve, path)

    async def stop(self) -> None:
        """Closes the socket and every link (front ends still linked see the engine go)."""
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()

    def snapshot(self) -> dict:
        s = self.service
        w = s.worker
        started = w.job_started_at
        totals: dict = {}
        add_counters(totals, self._retired)
        for c in self._counters.values():
            add_counters(totals, {k: v for k, v in c.items() if k != "cache_size"})
        totals["cache_size"] = sum(c.get("cache_size", 0) for c in self._counters.values())
        return {
            "batcher": s.batcher.stats(),
            "padded_tokens": s.batcher.padded_tokens,
            "batch_sizes": dict(self.batch_sizes),
            "worker": {"busy_seconds": round(w.busy_seconds, 3), "jobs_run": w.jobs_run, "memory": dict(w.memory),
                       "shapes": s.shape_times(), "replicas": s.replica_stats(),
                       "alive": w.stalled(float("inf")) is None,
                       "job_running_seconds": None if started is None else time.monotonic() - started},
            "frontends": totals,
            "connections": self.connections,
        }

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._conn_ids)
        self.connections += 1
        self._writers.add(writer)
        pending: dict[int, list[asyncio.Future]] = {}
        out = Outbox(writer)  # small frames; the transport buffers (front ends read constantly)
        try:
            out.put(("hello", self.meta))
            while True:
                try:
                    messages = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                for msg in messages:
                    kind = msg[0]
                    if kind == "embed":
                        self._embed(msg[1], msg[2], out, pending)
                    elif kind == "cancel":
                        for f in pending.pop(msg[1], ()):
                            f.cancel()  # the batcher drops cancelled items before their forward pass
                    elif kind == "stats":
                        self._counters[conn] = msg[1]
                        out.put(("stats", self.snapshot()))
        finally:
            self.connections -= 1
            for futures in pending.values():  # that front end is gone: so are its clients
                for f in futures:
                    f.cancel()
            last = self._counters.pop(conn, None)
            if last:
                add_counters(self._retired, {k: v for k, v in last.items() if k != "cache_size"})
            self._writers.discard(writer)
            writer.close()

    def _embed(self, rid: int, items: Sequence[Prepared], out: Outbox,
               pending: dict[int, list[asyncio.Future]]) -> None:
        try:
            futures = self.service.batcher.submit(items)
        except QueueFull as e:
            out.put(("full", rid, e.retry_after, e.depth, e.limit))
            return
        except Exception as e:  # noqa: BLE001 - shutting down: the front end answers 503
            out.put(("err", rid, str(e)))
            return
        pending[rid] = futures
        remaining = [len(futures)]

        def one_done(_: asyncio.Future) -> None:
            # A callback, not a task per request: the answer is queued in the turn its batch ends.
            remaining[0] -= 1
            if remaining[0] or pending.pop(rid, None) is None:
                return  # more to come, or cancelled
            failed = next((f.exception() for f in futures if not f.cancelled() and f.exception()), None)
            if failed is not None:  # a failed forward pass: that request fails, not the link
                out.put(("err", rid, f"{type(failed).__name__}: {failed}"))
            elif not any(f.cancelled() for f in futures):
                out.put(("ok", rid, np.stack([np.asarray(f.result(), dtype=np.float32) for f in futures])))

        for f in futures:
            f.add_done_callback(one_done)


# ---- the front-end side ------------------------------------------------------------------------
class EngineLink:
    """A front end's one connection to the engine: requests multiplexed by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, meta: dict):
        self._reader, self._writer = reader, writer
        self._out = Outbox(writer)
        self.meta = meta
        self.snapshot: dict = {}
        self.snapshot_at = 0.0  # monotonic time of the last stats answer
        self.has_snapshot = asyncio.Event()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._ids = itertools.count()
        self._waiting: dict[int, tuple[float, list[asyncio.Future]]] = {}  # request id -> (sent at, futures)
        self.answered = 0  # requests the engine answered, and the seconds they took (queue + batch + link)
        self.answer_seconds = 0.0
        self._reading = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, path: str, engine_alive: Callable[[], bool] = lambda: True,
                      retry_seconds: float = 0.2) -> "EngineLink":
        """Waits while the engine loads its model (it opens the socket once the model is warm),
        as long as engine_alive() says it still can."""
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                hello = (await read_frame(reader))[0]
                break
            except (FileNotFoundError, ConnectionError, asyncio.IncompleteReadError):
                if not engine_alive():
                    raise EngineGone("the engine process went away before it served") from None
                await asyncio.sleep(retry_seconds)
        return cls(reader, writer, hello[1])

    def submit(self, items: Sequence[Prepared]) -> list[asyncio.Future]:
        """The Batcher's contract: one future per item, all or none queued."""
        if self.closed.done():
            raise EngineGone("the engine process is not reachable")
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._waiting[rid] = (time.perf_counter(), futures)
        self._out.put(("embed", rid, list(items)))
        # The service cancels every future of a request when its client leaves: tell the engine once.
        futures[0].add_done_callback(lambda f: f.cancelled() and self._cancel(rid))
        return futures

    def _cancel(self, rid: int) -> None:
        if self._waiting.pop(rid, None) is not None and not self.closed.done():
            self._out.put(("cancel", rid))

    def send_stats(self, counters: dict) -> None:
        if not self.closed.done():
            self._out.put(("stats", counters))

    async def _read(self) -> None:
        try:
            while True:
                for msg in await read_frame(self._reader):
                    self._deliver(msg)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self._fail(e)
        except asyncio.CancelledError:
            self._fail(None)
            raise

    def _deliver(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "stats":
            self.snapshot, self.snapshot_at = msg[1], time.monotonic()
            self.has_snapshot.set()
            return
        waiting = self._waiting.pop(msg[1], None)
        if waiting is None:  # cancelled meanwhile
            return
        sent, futures = waiting
        if kind == "ok":
            self.answered += 1
            self.answer_seconds += time.perf_counter() - sent
            for f, v in zip(futures, msg[2]):
                if not f.done():
                    f.set_result(v)
            return
        exc: Exception = QueueFull(*msg[2:5]) if kind == "full" else RuntimeError(msg[2])
        for f in futures:
            if not f.done():
                f.set_exception(exc)

    def _fail(self, cause: BaseException | None) -> None:
        waiting, self._waiting = self._waiting, {}
        for _, futures in waiting.values():
            for f in futures:
                if not f.done():
                    f.set_exception(EngineGone("the engine process went away"))
        if not self.closed.done():
            self.closed.set_result(cause)

    async def close(self) -> None:
        self._reading.cancel()
        try:
            await self._reading
        except asyncio.CancelledError:
            pass
        self._writer.close()

