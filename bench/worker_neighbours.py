"""What slows the engine's MLX worker in a loaded server? Its batch-32 rate beside each kind of neighbour.

    python bench/worker_neighbours.py --model DIR --device gpu --dtype bfloat16 --rounds 3

On an H100 the server's worker took 15.7 ms per 32-item batch of short texts where the raw loop
took 12.5 on the same machine (docs/benchmarks.md, "q, k and v as one matmul"), and spinning
processes on other host cores cost the raw loop only ~5%. What the server has and the raw loop
lacks is traffic: the engine process's event loop reads ~2,000 frames/s from its front ends'
sockets and writes their answers, on a thread of the worker's own process. This times the raw loop
(batch 32 over 8 different short-text batches in turn, padded to the server's shape buckets, the
decoder compiled: the server's own forward) beside each neighbour, alternating in rounds
(--case image: batches of --image-side images instead; `--neighbours quiet` alone gives the
server's forward per shape with nothing beside it):

  quiet      nothing else running
  spin-out   4 other processes spinning in pure Python (busy host cores, no system calls)
  echo-out   a socket echo server (asyncio, length-prefixed frames) in another process, driven by
             4 client processes at --rate frames/s in all: the server's traffic, outside
  echo-in    the same echo server on a thread of this process: the server's traffic, inside
  gil-in     a thread of this process computing in pure Python for 0.4 ms of every 1 ms: the
             event loop's share of the GIL without its system calls

If echo-in costs the worker what the server costs it and echo-out does not, the traffic's cost is
inside the process (the GIL, or the sandbox's handling of one process's system calls); if gil-in
costs as much, it is the GIL. Prints one JSON line: the median batch time (ms) per neighbour and round, each
neighbour's median speed against quiet, and the frames/s the echo clients reached. With several
--batch sizes, `--neighbours quiet` gives the raw loop's time per bucketed shape, to set beside
the server's (bench/profile_server.py reports the worker's time per shape it ran).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEIGHBOURS = ("quiet", "spin-out", "echo-out", "echo-in", "gil-in")
_LEN = struct.Struct(">I")
ANSWER_BYTES = 4 * 1536 * 4  # a front end's answer: a few 1536-d float32 vectors


async def _echo_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    answer = _LEN.pack(ANSWER_BYTES) + bytes(ANSWER_BYTES)
    try:
        while True:
            (n,) = _LEN.unpack(await reader.readexactly(4))
            await reader.readexactly(n)
            writer.write(answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def serve_echo(path: str, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """An asyncio echo server on a Unix socket: each frame in, one answer frame out."""
    async def serve() -> None:
        server = await asyncio.start_unix_server(_echo_session, path)
        if ready is not None:
            ready.set()
        async with server:
            while stop is None or not stop.is_set():
                await asyncio.sleep(0.05)

    asyncio.run(serve())


def echo_client(path: str, rate: float) -> None:
    """Frames of ~600 bytes (a pickled batch of prepared short texts) at `rate` per second, until
    SIGTERM; then prints the frames/s it reached."""
    import signal

    s = socket.socket(socket.AF_UNIX)
    for _ in range(100):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    frame = _LEN.pack(600) + bytes(600)
    sent, t0 = 0, time.perf_counter()

    def report(*_):
        print(sent / (time.perf_counter() - t0), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    while True:
        now = time.perf_counter()
        due = t0 + sent / rate
        if due > now:
            time.sleep(due - now)
        s.sendall(frame)
        (n,) = _LEN.unpack(_recv(s, 4))
        _recv(s, n)
        sent += 1


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("echo server closed")
        buf += chunk
    return bytes(buf)


def gil_share(stop: threading.Event, busy_s: float = 0.0004, period_s: float = 0.001) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            pass
        time.sleep(period_s - busy_s)


class Neighbour:
    """Starts one kind of neighbour around a timed window and stops it after."""

    def __init__(self, kind: str, rate: float):
        self.kind, self.rate = kind, rate
        self.procs: list[subprocess.Popen] = []
        self.clients: list[subprocess.Popen] = []
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.path = os.path.join(tempfile.mkdtemp(), "echo.sock")

    def _python(self, code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                cwd=str(Path(__file__).resolve().parents[1]))

    def __enter__(self) -> "Neighbour":
        here = "import sys; sys.path.insert(0, 'bench'); import worker_neighbours as w; "
        if self.kind == "spin-out":
            self.procs = [self._python("while True: pass") for _ in range(4)]
        elif self.kind in ("echo-out", "echo-in"):
            if self.kind == "echo-out":
                self.procs = [self._python(here + f"w.serve_echo({self.path!r})")]
            else:
                ready = threading.Event()
                self.thread = threading.Thread(target=serve_echo, args=(self.path, ready, self.stop), daemon=True)
                self.thread.start()
                ready.wait(10)
            self.clients = [self._python(here + f"w.echo_client({self.path!r}, {self.rate / 4})")
                            for _ in range(4)]
        elif self.kind == "gil-in":
            self.thread = threading.Thread(target=gil_share, args=(self.stop,), daemon=True)
            self.thread.start()
        time.sleep(1.0)  # every neighbour running before the clock starts
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for p in self.clients:
            p.terminate()  # each prints its frames/s
        for p in self.procs:
            p.kill()
        for p in self.clients + self.procs:
            p.wait()
        if self.thread is not None:
            self.thread.join(5)


def main() -> None:
    from tkr_embed.benchmark.raw import prepared_inputs, sharded_engine
    from tkr_embed.engine.shapes import per_batch_ms

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="gpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[32])
    ap.add_argument("--case", default="short", choices=["short", "long", "image", "fused"],
                    help="the items of each batch (image, fused: --image-side pixels)")
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2000, help="echo frames per second, all 4 clients together")
    ap.add_argument("--neighbours", nargs="+", default=list(NEIGHBOURS), choices=NEIGHBOURS)
    args = ap.parse_args()

    worker, emb, forward = sharded_engine(args.model, args.device, 0, args.dtype, shape_buckets="on")
    rows: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    shapes: dict[int, list] = {}
    for b in args.batch:
        batches = [prepared_inputs(emb, args.case, b, args.image_side, offset=k * 1000) for k in range(8)]
        shapes[b] = sorted({forward.buckets.shape(b, max(p.cost for p in bt), emb.max_tokens) for bt in batches})

        def loop(seconds: float, batches=batches) -> float:
            n, times = 0, []
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                s = time.perf_counter()
                forward(emb, batches[n % 8])
                times.append(time.perf_counter() - s)
                n += 1
            return round(1000 * statistics.median(times), 2)

        worker.call(loop, 2 * args.seconds)  # every bucketed shape traced and compiled
        for r in range(args.rounds):
            for kind in (args.neighbours if r % 2 == 0 else args.neighbours[::-1]):
                with Neighbour(kind, args.rate) as nb:
                    rows.setdefault(f"{kind} b{b}", []).append(worker.call(loop, args.seconds))
                got = [float(p.stdout.read() or 0) for p in nb.clients]
                if got:
                    rates.setdefault(kind, []).append(round(sum(got), 1))
                print(f"batch {b} round {r + 1} {kind}: {rows[f'{kind} b{b}'][-1]} ms", file=sys.stderr, flush=True)
    ratios = {}
    for key, v in rows.items():
        quiet = rows.get("quiet " + key.split(" ")[1])
        if quiet:
            ratios[key] = round(statistics.median(q / x for q, x in zip(quiet, v)), 3)
    # every timed forward per bucketed shape, all neighbours together: mean ms in all, building the
    # graph, and the worker's CPU (as bench/profile_server.py reports the server's)
    tally = per_batch_ms(forward.shape_times())
    print(json.dumps({"device": args.device, "dtype": args.dtype, "rate": args.rate, "shapes (rows, length)": shapes,
                      "median_batch_ms": rows, "speed_vs_quiet": ratios, "echo_frames_per_s": rates,
                      "shapes": tally}), flush=True)
    os._exit(0)  # MLX-CUDA 0.32.4 aborts at interpreter exit with the worker's stream alive (raw.py)


if __name__ == "__main__":
    main()
