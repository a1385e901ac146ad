"""Use an optimised BLAS for MLX's Linux CPU backend.

MLX's Linux CPU wheel links the reference (netlib) BLAS: f32 matmuls run ~35x slower than with
OpenBLAS. Preloading the system's OpenBLAS (Debian/Ubuntu: libopenblas0-pthread) fixes that;
preloading has to happen before the process starts, so the launcher re-executes itself once
with LD_PRELOAD set. TKR_EMBED_BLAS=off disables this.
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


def preload_env(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-exec with, or None when nothing needs doing."""
    env = dict(os.environ if env is None else env)
    if sys.platform != "linux" or env.get("TKR_EMBED_BLAS", "").lower() == "off" or env.get(_MARK):
        return None
    if "blas" in env.get("LD_PRELOAD", "").lower():
        return None
    lib = find_fast_blas()
    if lib is None:
        return None
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env[_MARK] = lib
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
        return f"OpenBLAS preloaded ({preload})"
    return ("reference BLAS (slow): install OpenBLAS (apt-get install libopenblas0-pthread) "
            "and tkr-embed preloads it")
