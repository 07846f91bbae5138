"""Deployed SecAgg+: `koinon server` and N `koinon client` processes on 127.0.0.1 (mutual TLS),
the same run with plain uploads and with `privacy.secagg = true` (and the consistency check):
bytes per client per round (what crossed the wire as the protocol's messages or the upload) and
seconds per round (server wall clock, training included), and the server's SecAgg work.

    python benchmarks/secagg_deploy.py [--clients 5] [--rounds 3] [--quick]
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

KOINON = [sys.executable, "-c", "import sys; from koinon.cli import main; sys.exit(main())"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def deployed(tmp: Path, certs: Path, clients: int, rounds: int, privacy: dict) -> list[dict]:
    cfg = {
        "seed": 0,
        "data": {"name": "digits", "partition": "dirichlet", "alpha": 1.0, "num_clients": clients},
        "model": {"name": "mlp", "hidden": [128]},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9},
        "server": {"rounds": rounds, "clients_per_round": clients},
        "runtime": {"name": "inprocess"},
        "deploy": {"round_timeout_s": 60.0, "wait_clients_s": 120.0},
        "privacy": privacy,
    }
    config = tmp / "fed.toml"
    config.write_text(tomli_w.dumps(cfg))
    state = tmp / "state"
    logs = [(tmp / "server.log").open("wb")]
    server = subprocess.Popen([*KOINON, "server", str(config), "--listen", "127.0.0.1:0", "--certs", str(certs),
                               "--state", str(state)], stdout=logs[0], stderr=subprocess.STDOUT, env=ENV)
    port_file = state / "server.port"
    end = time.monotonic() + 120
    while not (port_file.is_file() and port_file.read_text().strip()):
        if time.monotonic() > end or server.poll() is not None:
            raise SystemExit(f"server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
        time.sleep(0.05)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    procs = []
    for i in range(clients):
        logs.append((tmp / f"client-{i}.log").open("wb"))
        procs.append(subprocess.Popen([*KOINON, "client", "--server", address, "--certs", str(certs), "--id",
                                       f"client-{i}", "--data", f"partition:{i}", "--state", str(tmp / f"c{i}")],
                                      stdout=logs[-1], stderr=subprocess.STDOUT, env=ENV))
    try:
        if server.wait(600) != 0:
            raise SystemExit(f"server failed: {(tmp / 'server.log').read_text()[-2000:]}")
        for p in procs:
            p.wait(60)
    finally:
        for p in [server, *procs]:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    return [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines() if line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 clients, 2 rounds")
    args = ap.parse_args()
    clients, rounds = (3, 2) if args.quick else (args.clients, args.rounds)
    runs = {"plain upload": {}, "SecAgg+": {"secagg": True},
            "SecAgg+ with consistency check": {"secagg": True, "secagg_consistency": True}}
    print(f"Deployed run: {clients} client processes + koinon server on 127.0.0.1 (mutual TLS), digits, "
          f"MLP [128] (9,610 parameters), {rounds} rounds, every client in every round")
    print("| aggregation | bytes up / client / round | bytes down / client / round | s / round (server wall) "
          "| server SecAgg s / round | final accuracy |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="koinon-secagg-") as root:
        certs = Path(root) / "certs"
        create_certs(certs, clients, ["127.0.0.1", "localhost"])
        for name, privacy in runs.items():
            tmp = Path(root) / name.replace(" ", "_").replace("+", "p")
            tmp.mkdir()
            records = deployed(tmp, certs, clients, rounds, privacy)
            n = clients * len(records)
            up = sum(r["uplink_bytes"] for r in records) / n
            down = sum(r["downlink_bytes"] for r in records) / n
            wall = records[-1]["wall_s"] / len(records)
            server_s = sum(r.get("secagg_server_s", 0.0) for r in records) / len(records)
            secagg = f"{server_s:.3f}" if privacy else "-"
            print(f"| {name} | {up:,.0f} | {down:,.0f} | {wall:.2f} | {secagg} | {records[-1]['test_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
