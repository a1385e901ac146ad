"""Running the server: one process (server.frontends: 1), or one engine process and several HTTP
front ends (server.frontends > 1).

With front ends, the process `tkr-embed serve` started is the engine process: it reserves the
HTTP port, starts the front ends (spawned processes that each listen on it with SO_REUSEPORT on
Linux, so the kernel spreads new connections evenly; elsewhere they share one inherited socket),
loads the model, and only then opens a Unix socket the front ends link
to (engine/link.py). It never answers HTTP itself: its GIL belongs to the batcher and the MLX
worker. It also supervises: a front end that dies is started again, a signal drains them all
before the engine stops.

Exit codes (service files and watchdogs rely on them): 0 a clean stop (signal, drained);
3 the model cannot load (restarting will not help); 1 anything else.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import uvicorn

from .config import Settings
from .models.registry import ResolvedModel

log = logging.getLogger("tkr_embed")

# A front end that exits this soon after starting, twice in a row, is not restarted again.
CRASH_LOOP_SECONDS = 10.0


class DrainingServer(uvicorn.Server):
    """uvicorn with our shutdown policy. SIGTERM/SIGINT: /ready turns 503 at once; uvicorn stops
    accepting, lets in-flight requests (and so every queued item) finish within the grace period,
    then the lifespan stops the service. A second signal forces the exit, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, app, settings: Settings):
        super().__init__(config)
        self.app, self.settings = app, settings

    def handle_exit(self, sig, frame) -> None:
        from .api.app import begin_drain

        if not self.app.state.draining:
            log.info("signal %s: draining (up to %.0f s for accepted requests)", sig,
                     self.settings.server.shutdown_grace_seconds)
        begin_drain(self.app)
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once it has shut down, so the process would die
        # "by SIGTERM" (-15) after a clean drain; our policy is exit 0 then (supervisors treat
        # 0 as a requested stop). A second SIGINT still forces the exit (force_exit above).
        self._captured_signals.clear()


def uvicorn_config(settings: Settings, app) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.server.host, port=settings.server.port, log_level=settings.logging.level.lower(),
        proxy_headers=True, forwarded_allow_ips=settings.server.forwarded_allow_ips, access_log=False,  # ours: logs.py
        timeout_graceful_shutdown=settings.server.shutdown_grace_seconds,
    )


def serve_app(settings: Settings, service, sockets: list[socket.socket] | None = None,
              background_load: bool = True, one_of_frontends: bool = False,
              on_server=None) -> int:
    """The app around `service` under uvicorn until it stops; returns the exit code.
    on_server(stop): handed a function that stops the server (a front end's engine going away)."""
    from .api.app import create_app

    def stop(*_) -> None:  # a load failure: exit code 3 below, a model problem, not worth a restart loop
        server.should_exit = True

    app = create_app(settings, service, background_load=background_load, on_load_failure=stop,
                     one_of_frontends=one_of_frontends)
    server = DrainingServer(uvicorn_config(settings, app), app, settings)
    if on_server is not None:
        on_server(stop)
    try:
        server.run(sockets=sockets)
    except SystemExit:  # uvicorn's own start failure (the port is taken: logged), its exit code 3 is ours for models
        return 3 if app.state.load_error else 1
    if app.state.load_error:
        return 3
    return 0 if server.started else 1


def serve_one_process(settings: Settings, resolved: ResolvedModel) -> int:
    from .engine.service import EmbeddingService

    return serve_app(settings, EmbeddingService(settings, resolved))


def leave(code: int) -> None:
    """Exit without the interpreter's finalisation. After MLX ran on a worker thread, exiting the
    interpreter can abort ("terminate called without an active exception"; raw.py and
    bench/compile_check.py hit it too): a clean drain once ended in SIGABRT, exit -6."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- several front ends -------------------------------------------------------------------------
def frontend_main(settings: Settings, sock: socket.socket | None, engine_socket: str, index: int, engine_pid: int,
                  engine_ready: bool = False) -> None:
    """A front-end process (spawned): the HTTP app on the inherited socket, its service linked to
    the engine. Leaves when signalled (draining first) or when the engine goes away.
    engine_ready: a replacement for a front end that died; it links before taking connections
    (the others serve meanwhile), where the first ones answer /health while the model loads.
    sock None: listen on settings.server's address with SO_REUSEPORT (Linux)."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the engine process only; it stops us in order
    from .logs import setup_logging_for

    setup_logging_for(settings)
    from .engine.remote import FrontendService

    service = FrontendService(settings, engine_socket, index, engine_pid)
    leave(serve_app(settings, service, [sock or bind_http_socket(settings, reuse_port=True)],
                    background_load=not engine_ready, one_of_frontends=True,
                    on_server=lambda stop: setattr(service, "on_engine_lost", stop)))


# Linux balances a port's connections across the listening sockets of an SO_REUSEPORT group. With
# one shared socket, whichever front end wakes first accepts: on an H100 one front end of 8 was
# found serving none of 64 clients' connections. (macOS accepts the option but does not balance.)
REUSE_PORT = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def bind_http_socket(settings: Settings, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """listen=False with reuse_port: reserve the port (port 0 resolves here) without taking
    connections, so front ends can join it and a restarted one finds it still ours."""
    host, port = settings.server.host, settings.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class EngineProcess:
    def __init__(self, settings: Settings, resolved: ResolvedModel):
        self.settings = settings
        self.resolved = resolved
        self.count = settings.server.frontends
        self.ctx = multiprocessing.get_context("spawn")  # no fork: MLX and threads do not survive it
        self.procs: list = [None] * self.count
        self.started_at = [0.0] * self.count
        self.quick_exits = [0] * self.count
        self.stopping = asyncio.Event()
        self.engine_ready = False  # the model is loaded and the engine socket open
        self.workdir = tempfile.mkdtemp(prefix="tkr-embed-")  # 0700: only this user reaches the socket
        self.engine_socket = os.path.join(self.workdir, "engine.sock")

    def _start_frontend(self, i: int, sock: socket.socket) -> None:
        shared = None if REUSE_PORT else sock  # REUSE_PORT: each front end listens on its own
        p = self.ctx.Process(target=frontend_main, args=(self.frontend_settings, shared, self.engine_socket, i,
                                                         os.getpid(), self.engine_ready),
                             name=f"tkr-embed-frontend-{i}", daemon=False)
        p.start()
        self.procs[i], self.started_at[i] = p, time.monotonic()

    def _signal(self, sig: int) -> None:
        if not self.stopping.is_set():
            log.info("signal %s: draining %d front ends (up to %.0f s for accepted requests)",
                     signal.Signals(sig).name, self.count, self.settings.server.shutdown_grace_seconds)
        self.stopping.set()

    async def _supervise(self, sock: socket.socket) -> int:
        """Until a signal: restart front ends that die. Returns 1 if one keeps dying at once."""
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            for i, p in enumerate(self.procs):
                if self.stopping.is_set() or p.is_alive():
                    continue
                quick = time.monotonic() - self.started_at[i] < CRASH_LOOP_SECONDS
                self.quick_exits[i] = self.quick_exits[i] + 1 if quick else 0
                if self.quick_exits[i] >= 2:
                    log.error("front end %d exited (code %s) twice right after starting; stopping", i, p.exitcode)
                    return 1
                log.error("front end %d exited (code %s); starting it again", i, p.exitcode)
                self._start_frontend(i, sock)
        return 0

    async def _stop_frontends(self) -> None:
        for p in self.procs:
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.server.shutdown_grace_seconds + 10
        loop = asyncio.get_running_loop()
        for p in self.procs:
            if p is not None:
                await loop.run_in_executor(None, p.join, max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    log.error("front end %s did not stop in time; killing it", p.name)
                    p.kill()

    async def run(self) -> int:
        from .api.app import bootstrap_key, open_key_store
        from .engine.link import EngineHost
        from .engine.service import EmbeddingService

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signal, sig)
        if self.settings.security.require_api_key:  # before the front ends: none of them creates one
            store = open_key_store(self.settings)
            bootstrap_key(self.settings, store)
            store.close()
        # Request metrics of every front end, summed at scrape (prometheus_client's multiprocess mode).
        metrics_dir = os.path.join(self.workdir, "metrics")
        os.mkdir(metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            sock = bind_http_socket(self.settings, reuse_port=REUSE_PORT, listen=not REUSE_PORT)
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", self.settings.server.host, self.settings.server.port, e.strerror)
            shutil.rmtree(self.workdir, ignore_errors=True)
            return 1
        host, port = sock.getsockname()[:2]
        # server.port 0 means any free port: the one reserved here, for every front end
        self.frontend_settings = self.settings.model_copy(
            update={"server": self.settings.server.model_copy(update={"port": port})})
        for i in range(self.count):
            self._start_frontend(i, sock)
        log.info("serving http://%s:%d from %d front-end processes; the model loads in this one (pid %d)",
                 host, port, self.count, os.getpid())

        service = EmbeddingService(self.settings, self.resolved)
        engine = EngineHost(service)
        service.on_batch = engine.observe_batch
        code = 0
        try:
            loading = asyncio.ensure_future(service.start())
            stop_wait = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait((loading, stop_wait), return_when=asyncio.FIRST_COMPLETED)
            if loading.done() and loading.exception() is None:
                stop_wait.cancel()
                await engine.start(self.engine_socket)
                self.engine_ready = True
                code = await self._supervise(sock)
            elif loading.done():
                log.error("the model failed to load: %s: %s", type(loading.exception()).__name__, loading.exception())
                code = 3
            else:
                loading.cancel()
        finally:
            self.stopping.set()
            await self._stop_frontends()
            await engine.stop()
            await service.stop()
            sock.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code


def serve_with_frontends(settings: Settings, resolved: ResolvedModel) -> int:
    # Each front end's CPU pool and the engine's: a thread per core in every process would
    # oversubscribe; the engine needs none (it does not tokenise), front ends share the cores.
    if not settings.engine.cpu_threads:
        from .cores import available_cores  # the cores this process may use, not the machine's

        cores = max(1, available_cores() // settings.server.frontends)
        settings = settings.model_copy(update={"engine": settings.engine.model_copy(update={"cpu_threads": cores})})
    return asyncio.run(EngineProcess(settings, resolved).run())
