"""How much wall time the communication overlap of the islands' worker processes saves.

    .venv/bin/python benchmarks/islands_overlap.py [--latency-ms 0 300] [--modes co2]

Runs `koinon launch` (M worker processes on this machine) for Streaming DiLoCo and CO2, each
with the workers blocking on every exchange (`--blocking`) and overlapping it, over an emulated
link of the given latencies (`Link`: loopback alone is far faster than any WAN), and prints,
for worker 0 between its first and last round records (process start-up excluded), the seconds
per outer round (H inner steps) and the seconds per round its training stood still waiting for
an exchange (`comm_wait_s`: the part of the communication that was not hidden). Medians of
`--repeats` alternating runs: on a shared machine wall times are noisy, the waits much less so.
Both variants compute the same parameters (checked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from koinon.config import load_config
from koinon.islands.cli import launch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODES = {"streaming": "diloco_streaming.toml", "co2": "diloco_co2.toml"}


def per_round(out: Path) -> tuple[float, float]:
    """Worker 0's wall time and communication wait per round, over rounds 2..R (round 1
    includes the warm-up)."""
    rows = [json.loads(ln) for ln in (out / "worker-0.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["round"])
    first, last = rows[0], rows[-1]
    n = max(last["round"] - first["round"], 1)
    return ((last["wall_s"] - first["wall_s"]) / n,
            (last["comm_wait_s"] - first["comm_wait_s"]) / n)


def measure(mode: str, latency_ms: float, blocking: bool, workers: int, rounds: int,
            examples: Path, root: Path, tau: int = -1) -> tuple[float, float, str]:
    """One launch; `tau` >= 0 overrides Streaming DiLoCo's overlap (in inner steps)."""
    sets = [f"server.rounds={rounds}", "server.eval_every=1000"]
    if mode == "streaming" and tau >= 0:
        sets.append(f"diloco.overlap={tau}")
    cfg = load_config(examples / MODES[mode], sets)
    out = root / f"{mode}-{latency_ms:g}-{'blocking' if blocking else 'overlap'}"
    summary = launch(cfg, workers, out, timeout_s=60, blocking=blocking,
                     link_latency_ms=latency_ms, overwrite=True, max_wall_s=600)
    if not summary["identical_params"] or summary["survivors"] != list(range(workers)):
        raise RuntimeError(f"{mode}: the launch did not finish cleanly: {summary}")
    wall, wait = per_round(out)
    return wall, wait, summary["params_sha256"][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/islands_overlap.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 300.0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tau", type=int, default=-1,
                   help="Streaming DiLoCo's overlap in inner steps (default: the example's, 2)")
    p.add_argument("--examples", type=Path, default=EXAMPLES)
    args = p.parse_args(argv)
    print("| mode | link latency | s/round blocking | s/round overlap | comm wait/round "
          "blocking | comm wait/round overlap |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for latency in args.latency_ms:
                walls: dict[bool, list[float]] = {True: [], False: []}
                waits: dict[bool, list[float]] = {True: [], False: []}
                hashes = set()
                for _ in range(args.repeats):
                    for blocking in (True, False):
                        wall, wait, h = measure(mode, latency, blocking, args.workers,
                                                args.rounds, args.examples, Path(tmp), args.tau)
                        walls[blocking].append(wall)
                        waits[blocking].append(wait)
                        hashes.add(h)
                if len(hashes) != 1:
                    raise RuntimeError(f"{mode}: overlap changed the parameters ({hashes})")
                w = [statistics.median(walls[b]) for b in (True, False)]
                c = [statistics.median(waits[b]) for b in (True, False)]
                name = f"{mode} tau={args.tau}" if mode == "streaming" and args.tau >= 0 else mode
                print(f"| {name} | {latency:g} ms | {w[0]:.3f} | {w[1]:.3f} | {c[0]:.3f} | "
                      f"{c[1]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
