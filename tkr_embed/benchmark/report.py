"""Markdown tables from a benchmark result (what docs/benchmarks.md shows).

    python -m tkr_embed.benchmark.report docs/bench/cpu.json
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path


def tables(result: dict) -> str:
    out = []
    raw = result["raw"]
    if result.get("cpus"):
        cpus = result["cpus"]
        out.append(f"Cores: servers and raw ceilings on {cpus['server'] or 'any'}, load generator on "
                   f"{cpus['loadgen'] or 'any'}.\n")
    if raw:
        out.append("Raw ceilings (batched forward only; best batch in bold):\n")
        out.append("| case | system | " + " | ".join(f"batch {r['batch']}" for r in next(iter(next(iter(raw.values())).values()))["results"]) + " |")
        out.append("|---|---|" + "---|" * len(next(iter(next(iter(raw.values())).values()))["results"]))
        for case, systems in raw.items():
            for system, r in systems.items():
                best = r["best"]["batch"]
                cells = [f"**{x['items_per_s']}**" if x["batch"] == best else str(x["items_per_s"]) for x in r["results"]]
                out.append(f"| {case} | {system} | " + " | ".join(cells) + " |")
        out.append("\nitems/s.\n")
    out.append("Servers (requests/s, one item each but `ingest`'s 32; p50 / p99 ms; ratio to the raw MLX "
               "engine's best batch):\n")
    levels = result["concurrency"]
    out.append("| case | server | " + " | ".join(f"{c} clients" for c in levels) + " |")
    out.append("|---|---|" + "---|" * len(levels))
    for case, systems in result["servers"].items():
        for system, rows in systems.items():
            cells = []
            for r in rows:
                ratio = f", {r['ratio_to_engine']:.2f}x" if r.get("ratio_to_engine") is not None else ""
                err = f", {r['errors']} errors" if r["errors"] else ""
                per = r.get("items_per_request", 1)
                items = f" = {r['items_per_s']} items/s" if per > 1 else ""
                cells.append(f"{r['requests_per_s']}{items} ({r['p50_ms']} / {r['p99_ms']}{ratio}{err})")
            out.append(f"| {case} | {system} | " + " | ".join(cells) + " |")
    if result.get("summary"):
        out.append("\ntkr-embed / peer, items/s at each concurrency:\n")
        out.append("| case | pair | " + " | ".join(f"{c}" for c in levels) + " |")
        out.append("|---|---|" + "---|" * len(levels))
        for case, pairs in result["summary"].items():
            for pair, by_c in pairs.items():
                out.append(f"| {case} | {pair} | " + " | ".join(f"{by_c.get(str(c), '')}x" for c in levels) + " |")
    if result.get("later_rounds"):
        # recomputed: results written before a ratio was added show it too
        from .suite import paired

        rounds = [{"raw": result["raw"], "servers": result["servers"]}, *result["later_rounds"]]
        result = {**result, "paired": paired(copy.deepcopy(rounds))}
    if result.get("paired"):
        rounds = 1 + len(result.get("later_rounds", []))
        out.append(f"\nPaired over {rounds} rounds (raw ceilings, then servers, alternating): median ratio "
                   "(each round's):\n")
        out.append("| case | ratio | " + " | ".join(f"{c} clients" for c in levels) + " |")
        out.append("|---|---|" + "---|" * len(levels))
        for case, pairs in result["paired"].items():
            for pair, by_c in pairs.items():
                cells = [f"{m['median']:.2f}x ({', '.join(f'{v:.2f}' for v in m['rounds'])})" if m else ""
                         for m in (by_c.get(str(c)) for c in levels)]
                out.append(f"| {case} | {pair} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(tables(json.loads(Path(sys.argv[1]).read_text())))
