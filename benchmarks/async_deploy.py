"""`koinon server` running FedAvg rounds, FedBuff and FedAsync with real client processes.

One server and N `koinon client` processes on 127.0.0.1 (mutual TLS, state in SQLite), sklearn
digits split Dirichlet(1.0) over N clients, MLP 32, 10 local steps of 32 samples. Every method
gets the same number of client updates (N x rounds). Printed per method: wall seconds from the
first step to the last (the server's clock), accepted updates per second, the largest staleness
seen, final test accuracy, the simulation's final accuracy for the same config (`koinon run`
with `clock.speed = constant`), and whether the deployed model equals the simulated one bit for
bit (expected for FedAvg and for FedBuff with buffer = concurrency = N).

All processes share this machine's cores, so "at their own pace" is the pace the OS gives them.

With `--slow` every client's task takes a seeded log-normal number of seconds more (an emulated
slower device: real calls and bytes, a padded pace), and "wall s to 0.85" shows what asynchrony
buys when clients differ in speed.

    .venv/bin/python benchmarks/async_deploy.py [--quick] [--slow] [--clients 6] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from koinon.deploy.certs import create_certs
from koinon.experiment import load_config, run_experiment

KOINON = [sys.executable, "-c", "import sys; from koinon.cli import main; sys.exit(main())"]
# A client process whose every task takes `KOINON_BENCH_DELAY_S` more seconds: an emulated slower
# device (its gRPC calls, bytes and training are the real ones; only its pace differs).
SLOW_CLIENT = [sys.executable, "-c", (
    "import os, sys, time\n"
    "from koinon.deploy import client\n"
    "delay = float(os.environ['KOINON_BENCH_DELAY_S'])\n"
    "train = client.Worker.train\n"
    "def slow(self, *a, **k):\n"
    "    time.sleep(delay)\n"
    "    return train(self, *a, **k)\n"
    "client.Worker.train = slow\n"
    "from koinon.cli import main\n"
    "sys.exit(main())\n")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def config(n: int, rounds: int, schedule: dict | None) -> dict:
    cfg: dict = {
        "seed": 0,
        "data": {"name": "digits", "partition": "dirichlet", "alpha": 1.0, "num_clients": n},
        "model": {"name": "mlp", "hidden": [32]},
        "client": {"steps": 10, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "server": {"rounds": rounds, "clients_per_round": n},
        "runtime": {"name": "inprocess"},
        "deploy": {"round_timeout_s": 60.0, "wait_clients_s": 120.0},
    }
    if schedule:
        cfg["schedule"] = schedule
    return cfg


def deploy(folder: Path, certs: Path, cfg: dict, n: int, delays: list[float] | None = None) -> tuple[dict, list[dict]]:
    folder.mkdir(parents=True)
    path = folder / "fed.toml"
    path.write_text(tomli_w.dumps(cfg))
    state = folder / "state"
    log = (folder / "server.log").open("wb")
    server = subprocess.Popen([*KOINON, "server", str(path), "--listen", "127.0.0.1:0", "--certs", str(certs),
                               "--state", str(state)], stdout=log, stderr=subprocess.STDOUT, env=ENV)
    port_file = state / "server.port"
    end = time.monotonic() + 120
    while not (port_file.is_file() and port_file.read_text().strip()):
        if time.monotonic() > end or server.poll() is not None:
            raise SystemExit(f"server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.05)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    clients = [subprocess.Popen([*(SLOW_CLIENT if delays else KOINON), "client", "--server", address, "--certs",
                                 str(certs), "--id", f"client-{i}", "--data", f"partition:{i}", "--state",
                                 str(folder / f"client-{i}")],
                                stdout=(folder / f"client-{i}.log").open("wb"), stderr=subprocess.STDOUT,
                                env={**ENV, "KOINON_BENCH_DELAY_S": str(delays[i] if delays else 0.0)})
               for i in range(n)]
    if server.wait(900) != 0:
        raise SystemExit(f"server failed: {(folder / 'server.log').read_text()[-2000:]}")
    for c in clients:
        c.wait(60)
    records = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines() if line]
    return json.loads((state / "summary.json").read_text()), records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 clients, 3 rounds")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--slow", action="store_true",
                   help="clients of different speeds: each task of client i takes 0.2 * exp(z_i) s more, z ~ N(0, 1)")
    args = p.parse_args()
    n, rounds = (3, 3) if args.quick else (args.clients, args.rounds)
    half = max(1, n // 2)
    methods = {
        "FedAvg rounds": (None, rounds),
        f"FedBuff (buffer {n} = concurrency)": ({"name": "fedbuff", "buffer": n, "concurrency": n}, rounds),
        f"FedBuff (buffer {half}, {n} at once)": ({"name": "fedbuff", "buffer": half, "concurrency": n},
                                                   rounds * n // half),
        f"FedAsync (mixing 0.6, {n} at once)": ({"name": "fedasync", "concurrency": n}, rounds * n),
    }
    delays = None
    if args.slow:
        import numpy as np

        delays = [round(0.2 * float(x), 3) for x in np.exp(np.random.default_rng(0).normal(0.0, 1.0, n))]
        print(f"emulated extra seconds per task: {delays}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="koinon-async-deploy-") as tmp:
        root = Path(tmp)
        certs = root / "certs"
        create_certs(certs, n, ["127.0.0.1", "localhost"])
        rows = []
        for i, (label, (schedule, steps)) in enumerate(methods.items()):
            cfg = config(n, steps, schedule)
            summary, records = deploy(root / f"m{i}", certs, cfg, n, delays)
            sim_cfg = load_config(root / f"m{i}" / "fed.toml")
            if schedule:
                sim_cfg = sim_cfg.with_overrides({"clock.speed": "constant"})
            sim = run_experiment(sim_cfg, root / f"sim{i}", progress=False)
            first, last = records[0]["wall_s"], records[-1]["wall_s"]
            updates = sum(r["num_clients"] for r in records)
            wall = max(last - first, 1e-9) * len(records) / max(len(records) - 1, 1)  # first step's share too
            stale = max((r.get("staleness_max", 0.0) for r in records), default=0.0)
            target = 0.85  # wall seconds (from the first step) until a step's test accuracy reaches it
            reach = next((r["wall_s"] - first for r in records if (r["test_accuracy"] or 0) >= target), None)
            rows.append((label, len(records), updates, wall, updates / wall, int(stale), summary["final_accuracy"],
                         sim["final_accuracy"], summary["model_sha256"] == sim["model_sha256"], reach))
            print(f"{label}: {rows[-1][1:]}", file=sys.stderr, flush=True)
    print(f"\n{n} client processes + 1 server on this machine ({os.cpu_count()} cores); "
          f"{rounds * n} client updates per method\n")
    print("| method | server steps | updates applied | wall s | updates/s | max staleness | final acc "
          "| simulation's acc | same model bits | wall s to 0.85 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, steps, updates, wall, rate, stale, acc, sim_acc, same, reach in rows:
        print(f"| {label} | {steps} | {updates} | {wall:.1f} | {rate:.1f} | {stale} | {acc:.4f} | {sim_acc:.4f} "
              f"| {'yes' if same else 'no'} | {'-' if reach is None else f'{reach:.1f}'} |")


if __name__ == "__main__":
    main()
