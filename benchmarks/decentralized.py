"""Decentralized learning benchmark: D-PSGD over graphs against server FedAvg, and failures.

    python benchmarks/decentralized.py [--rounds 40] [--target 0.8]

Task: scikit-learn digits, 50 clients (nodes) with a Dirichlet(0.5) label skew, an MLP
(64-32-10, 2,410 parameters), 2 local epochs of SGD (lr 0.05, momentum 0.9) a round, seed 0.
Server FedAvg samples 10 clients a round and counts uplink + downlink; D-PSGD trains all 50
nodes every round and counts each node's payload times its degree; MoDeST samples 10 trainers and
2 aggregators a round and counts every model sent. "avg acc" is the accuracy
of the average of the live models (what one final merge yields, "A Single Merging Suffices");
"node acc" is the mean accuracy of the individual node models, before that merge. Bytes to
target: total bytes when the (averaged) model first reaches `--target` accuracy on the held-out
test split (360 images), evaluated every round. Failures: 50% or 80% of the nodes crash at
half-time (random ones, or the most central by betweenness) and the rest go on.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import koinon as kn
from koinon.topology import Gossip

NODES = 50


def _setup() -> tuple[nn.Module, kn.FederatedData]:
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=NODES)
    data = kn.partition_dataset(ds, "dirichlet", NODES, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), data


def _local() -> kn.LocalTraining:
    return kn.LocalTraining(lr=0.05, epochs=2, momentum=0.9)


def fedavg(rounds: int, target: float) -> dict:
    model, data = _setup()
    fed = kn.Federation(model, data, local=_local(), clients_per_round=10, runtime="vectorized", seed=0)
    total, reached = 0, None
    for r in fed.fit(rounds):
        total += r.uplink_bytes + r.downlink_bytes
        if reached is None and (r.test_accuracy or 0.0) >= target:
            reached = total
    return {"name": "server FedAvg (10/round)", "acc": r.test_accuracy, "node_acc": None,
            "bytes": total, "to_target": reached, "live": NODES}


def gossip(name: str, graph: str, rounds: int, target: float, **kw) -> dict:
    model, data = _setup()
    net = Gossip(model, data, graph=graph, local=_local(), seed=0, **kw)
    total, reached = 0, None
    for r in net.fit(rounds):
        total += r.bytes_total
        if reached is None and (r.averaged_accuracy or 0.0) >= target:
            reached = total
    return {"name": name, "acc": r.averaged_accuracy, "node_acc": r.mean_accuracy,
            "bytes": total, "to_target": reached, "live": r.num_live}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    r, t, half = args.rounds, args.target, args.rounds // 2
    start = time.perf_counter()
    rows = [
        fedavg(r, t),
        gossip("D-PSGD ring", "ring", r, t),
        gossip("D-PSGD exponential", "exponential", r, t),
        gossip("D-PSGD Barabasi-Albert m=2", "barabasi_albert", r, t),
        gossip("MoDeST (10 trainers, 2 aggr.)", "ring", r, t, sampling="modest",
               trainers_per_round=10, aggregators_per_round=2),
        gossip("exponential, 50% random fail", "exponential", r, t, failures={half: 0.5}),
        gossip("exponential, 80% random fail", "exponential", r, t, failures={half: 0.8}),
        gossip("BA, 50% central fail", "barabasi_albert", r, t, failures={half: 0.5},
               failure_choice="central"),
        gossip("BA, 80% central fail", "barabasi_albert", r, t, failures={half: 0.8},
               failure_choice="central"),
    ]
    print(f"digits, {NODES} nodes, Dirichlet(0.5), {r} rounds, target accuracy {t}; "
          f"failures at round {half + 1}")
    print(f"{'run':32s} {'avg acc':>8s} {'node acc':>8s} {'live':>5s} {'MB total':>9s} {'MB to target':>13s}")
    for row in rows:
        node = "-" if row["node_acc"] is None else f"{row['node_acc']:.3f}"
        print(f"{row['name']:32s} {row['acc']:8.3f} {node:>8s} {row['live']:5d} "
              f"{_mb(row['bytes']):>9s} {_mb(row['to_target']):>13s}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
