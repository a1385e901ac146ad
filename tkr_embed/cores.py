"""The CPU cores this process may run on.

Thread and shard counts follow this, not the machine's core count: under `taskset`, a container's
CPU set, or the benchmark's --server-cpus / --loadgen-cpus, a process pinned to 2 of 16 cores
that sized its pools for 16 would oversubscribe the 2 it has.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call: every core
        return os.cpu_count() or 1
