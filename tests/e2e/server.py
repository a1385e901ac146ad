"""Start real `python -m tkr_embed serve` processes on loopback for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tkr_embed_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tkr_embed", *args]


@contextmanager
def running_server(*args: str, env: dict | None = None, timeout: float = 90, wait_for: str = "/ready"):
    """Yields once wait_for answers 200 (/ready: loaded and warm; /health: the port is open)."""
    port = free_port()
    cmd = tkr_embed_cmd("serve", "--config", str(ROOT / "config.dev.yaml"), "--port", str(port), *args)
    full_env = {**os.environ, "EMBEDDING_LOG_LEVEL": "WARNING", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(base + wait_for, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server: {wait_for} did not answer 200 in time")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
