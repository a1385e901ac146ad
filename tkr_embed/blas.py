"""Use an optimised BLAS for MLX's Linux CPU backend.

MLX's Linux CPU wheel links the reference (netlib) BLAS: f32 matmuls run ~35x slower than with
OpenBLAS. Preloading the system's OpenBLAS (Debian/Ubuntu: libopenblas0-pthread) fixes that;
preloading has to happen before the process starts, so the launcher re-executes itself once
with LD_PRELOAD set. TKR_EMBED_BLAS=off disables this.

It also sets OPENBLAS_THREAD_TIMEOUT=4 (unless set already): OpenBLAS's idle worker threads spin,
calling sched_yield, for 2^28 cycles (~0.1 s) after each call before they sleep, and a lone
request's matmuls run on every core (engine/shards.py), so at one client a request every ~25 ms
kept a core spinning for good: the server used 1.87 cores instead of 1.58, a tenth of it in the
kernel, at the same requests/s. With 4 (2^4 cycles) the workers sleep as soon as they are idle.
OpenBLAS reads the variable when it loads, so it travels with the re-exec.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
    "/opt/conda/lib/libopenblas.so.0",
]
_MARK = "TKR_EMBED_BLAS_REEXEC"


def find_fast_blas() -> str | None:
    arch = platform.machine()
    for pattern in CANDIDATES:
        for path in glob.glob(pattern.format(arch=arch)):
            if os.path.isfile(path):
                return path
    return None


# The variables the launcher passes on to the re-exec'd process (and the test runner exports).
PRELOAD_VARS = ("LD_PRELOAD", "OPENBLAS_THREAD_TIMEOUT")
THREAD_TIMEOUT_LOG2_CYCLES = "4"


def preload_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-exec with (OpenBLAS preloaded, its idle threads made to sleep), or
    None when nothing needs doing."""
    env = dict(os.environ if env is None else env)
    if sys.platform != "linux" or env.get("TKR_EMBED_BLAS", "").lower() == "off" or env.get(_MARK):
        return None
    changed = False
    if "blas" not in env.get("LD_PRELOAD", "").lower():
        lib = find_fast_blas()
        if lib is not None:
            env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
            changed = True
    if "openblas" in env.get("LD_PRELOAD", "").lower() and "OPENBLAS_THREAD_TIMEOUT" not in env:
        env["OPENBLAS_THREAD_TIMEOUT"] = THREAD_TIMEOUT_LOG2_CYCLES
        changed = True
    if not changed:
        return None
    env[_MARK] = "1"  # once: never re-exec again, whatever the result
    return env


def ensure_fast_blas(argv: list[str]) -> None:
    """Re-exec `python -m tkr_embed argv` with OpenBLAS preloaded, if one is found and missing."""
    env = preload_env()
    if env is None:
        return
    os.execve(sys.executable, [sys.executable, "-m", "tkr_embed", *argv], env)


@functools.lru_cache(maxsize=1)
def _thread_setter():
    """(name, function) of the thread-count setter of the BLAS loaded in this process, or None."""
    import ctypes

    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads"):
        fn = getattr(process, name, None)
        if fn is not None:
            return name, fn
    return None


def set_blas_threads(n: int, quiet: bool = False) -> str | None:
    """Set the thread count of the BLAS loaded in this process (OpenBLAS or MKL), if one exposes
    it; returns the library's setter that was called, or None (reference BLAS, Accelerate).
    quiet: no log line (the engine switches per batch, engine/shards.py)."""
    import ctypes

    found = _thread_setter()
    if found is None:
        return None
    name, fn = found
    fn(ctypes.c_int(n))
    if not quiet:
        log.info("BLAS threads set to %d (%s)", n, name)
    return name


def describe() -> str:
    preload = os.environ.get("LD_PRELOAD", "")
    if sys.platform != "linux":
        return f"{sys.platform}: MLX uses the platform's accelerated BLAS"
    if "blas" in preload.lower():
        timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        return f"OpenBLAS preloaded ({preload})" + (f", OPENBLAS_THREAD_TIMEOUT={timeout}" if timeout else "")
    return ("reference BLAS (slow): install OpenBLAS (apt-get install libopenblas0-pthread) "
            "and tkr-embed preloads it")
