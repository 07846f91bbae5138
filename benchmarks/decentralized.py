"""Decentralized learning benchmark: D-PSGD over graphs against server FedAvg, and failures.

    python benchmarks/decentralized.py [--rounds 40] [--target 0.8] [--out runs/decentralized]
    python benchmarks/decentralized.py --only byzantine     # the Bristle table alone (~3 min)

Task: scikit-learn digits, 50 clients (nodes) with a Dirichlet(0.5) label skew, an MLP
(64-32-10, 2,410 parameters), 2 local epochs of SGD (lr 0.05, momentum 0.9) a round, seed 0.
Server FedAvg samples 10 clients a round and counts uplink + downlink; D-PSGD trains all 50
nodes every round and counts each node's payload times its degree; MoDeST samples 10 trainers and
2 aggregators a round and counts every model sent. "avg acc" is the accuracy
of the average of the live models (what one final merge yields, "A Single Merging Suffices");
"node acc" is the mean accuracy of the individual node models, before that merge. Bytes to
target: total bytes when the (averaged) model first reaches `--target` accuracy on the held-out
test split (360 images), evaluated every round. Failures: 50% or 80% of the nodes crash at
half-time (random ones, or the most central by betweenness) and the rest go on; MoDeST is
also run with 80% of the nodes crashing (the paper's "80% unresponsive" scenario).

Plots (PNG, matplotlib Agg) in `--out`: `accuracy_vs_mb.png`, averaged-model accuracy against
cumulative MB sent for FedAvg, the D-PSGD graphs and MoDeST; `failures.png`, accuracy against
round for the failure runs (and the failure-free exponential / BA runs for reference).

Byzantine peers (`--only byzantine` runs just this part): the same task on a random 6-regular
graph, 30 % of the nodes Byzantine (sign flipping: they send minus their model; Gaussian: a
N(0, 1) model; label flipping), for plain D-PSGD (whole model averaged), head-only averaging
(Bristle's frozen features and head exchange, no defense) and Bristle (distance-based
prioritizer + per-class performance-based integrator). Bristle pretrains the features on 10 %
of every node's samples (a public split) and resets the head; "node acc" is the mean accuracy
of the honest nodes' own models, "B/node/round" the bytes a node sends per round.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import koinon as kn
from koinon.topology import Gossip
from koinon.topology.bristle import BristleOptions
from koinon.topology.byzantine import ByzantineOptions
from koinon.topology.gossip import GossipOptions, split_options

NODES = 50



def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Label, grid, legend and write one figure; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

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
    total, reached, curve = 0, None, []
    for r in fed.fit(rounds):
        total += r.uplink_bytes + r.downlink_bytes
        curve.append((r.round, total, r.test_accuracy))
        if reached is None and (r.test_accuracy or 0.0) >= target:
            reached = total
    return {"name": "server FedAvg (10/round)", "acc": r.test_accuracy, "node_acc": None,
            "bytes": total, "to_target": reached, "live": NODES, "curve": curve}


def gossip(name: str, graph: str, rounds: int, target: float, **kw) -> dict:
    model, data = _setup()
    net = Gossip(model, data, graph=graph, local=_local(), seed=0, **split_options(kw))
    total, reached, curve, trained = 0, None, [], []
    for r in net.fit(rounds):
        total += r.bytes_total
        curve.append((r.round, total, r.averaged_accuracy))
        trained.append(r.num_clients)
        if reached is None and (r.averaged_accuracy or 0.0) >= target:
            reached = total
    return {"name": name, "acc": r.averaged_accuracy, "node_acc": r.mean_accuracy,
            "bytes": total, "to_target": reached, "live": r.num_live, "curve": curve,
            "trained": trained}


def byzantine(name: str, rounds: int, bristle: bool | dict, attack: str | None) -> dict:
    # Frozen features are non-trainable layout entries, which the vectorized runtime does not
    # take: Bristle runs in process (the head is 330 parameters, that costs little).
    model, data = _setup()
    net = Gossip(model, data, graph="random_regular", local=_local(), seed=0,
                 options=GossipOptions(graph_options={"degree": 6}, eval_nodes=NODES,
                                       runtime="inprocess" if bristle else "vectorized"),
                 bristle=BristleOptions.parse(bristle),
                 byzantine=ByzantineOptions(attack, 0.3 if attack else 0.0))
    results = net.fit(rounds, eval_every=rounds)
    last = results[-1]
    return {"name": name, "attack": attack or "none", "acc": last.averaged_accuracy,
            "node_acc": last.mean_accuracy, "min_acc": last.min_accuracy,
            "per_round": results[0].bytes_per_node}


def byzantine_table(rounds: int) -> None:
    print(f"\nByzantine peers: digits, {NODES} nodes, Dirichlet(0.5), random 6-regular graph, "
          f"30 % attackers, {rounds} rounds")
    print(f"{'run':22s} {'attack':11s} {'avg acc':>8s} {'node acc':>8s} {'min node':>8s} {'B/node/round':>13s}")
    for name, bristle in (("D-PSGD (whole model)", False), ("head-only averaging", {"defense": False}),
                          ("Bristle", True)):
        for attack in (None, "sign_flip", "gaussian", "label_flip"):
            row = byzantine(name, rounds, bristle, attack)
            print(f"{name:22s} {row['attack']:11s} {row['acc']:8.3f} {row['node_acc']:8.3f} "
                  f"{row['min_acc']:8.3f} {row['per_round']:13.0f}", flush=True)


def plot(rows: list[dict], out: Path, half: int, target: float) -> list[Path]:
    """The two figures; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows[:5]:
        ax.plot([b / 1e6 for _, b, _ in row["curve"]], [a for _, _, a in row["curve"]],
                marker=".", label=row["name"])
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target}")
    ax.set_xscale("log")
    paths.append(_save(fig, ax, "cumulative MB sent (log)", "accuracy of the averaged model",
                       f"digits, {NODES} nodes, Dirichlet(0.5): accuracy against communication",
                       out / "accuracy_vs_mb.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in [rows[2], rows[3], *rows[5:]]:
        style = "--" if "fail" not in row["name"] else "-"
        ax.plot([r for r, _, _ in row["curve"]], [a for _, _, a in row["curve"]], style,
                label=row["name"])
    ax.axvline(half + 1, color="red", linestyle=":", linewidth=1, label=f"failures (round {half + 1})")
    paths.append(_save(fig, ax, "round", "accuracy of the averaged live model",
                       "D-PSGD and MoDeST when 50% / 80% of the nodes fail mid-training",
                       out / "failures.png"))
    return paths


def compare(rows: list[dict], half: int) -> list[str]:
    """The lines that set MoDeST against D-PSGD and check the 80% failure runs."""
    lines = []
    modest = rows[4]
    dpsgd = [row for row in rows[1:4] if row["to_target"] is not None]
    if modest["to_target"] is None:
        lines.append("MoDeST vs D-PSGD bytes to target: MoDeST did not reach the target")
    elif not dpsgd:
        lines.append("MoDeST vs D-PSGD bytes to target: no D-PSGD run reached the target")
    else:
        ratios = ", ".join(f"{row['name'].removeprefix('D-PSGD ')} {row['to_target'] / modest['to_target']:.1f}x"
                           for row in dpsgd)
        lines.append(f"MoDeST vs D-PSGD bytes to target: D-PSGD needs {ratios} MoDeST's "
                     f"{modest['to_target'] / 1e6:.1f} MB (the MoDeST paper reports 3x-14x)")
    for row in rows:
        if "80%" not in row["name"]:
            continue
        at_fail = row["curve"][half - 1][2]
        after = [a for _, _, a in row["curve"][half:]]
        going = all(t > 0 for t in row["trained"][half:])
        lines.append(f"{row['name']}: {row['live']} of {NODES} nodes left; training "
                     f"{'continues' if going else 'STOPPED'} (accuracy {at_fail:.3f} before the "
                     f"failure, {min(after):.3f} at worst after, {after[-1]:.3f} at the end)")
    return lines


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--out", type=Path, default=Path("runs/decentralized"), help="PNG folder")
    parser.add_argument("--only", choices=("all", "graphs", "byzantine"), default="all")
    args = parser.parse_args()
    r, t, half = args.rounds, args.target, args.rounds // 2
    start = time.perf_counter()
    if args.only != "graphs":
        byzantine_table(r)
        if args.only == "byzantine":
            print(f"({time.perf_counter() - start:.0f} s)")
            return
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
        gossip("MoDeST, 80% random fail", "ring", r, t, sampling="modest", trainers_per_round=10,
               aggregators_per_round=2, failures={half: 0.8}),
    ]
    print(f"digits, {NODES} nodes, Dirichlet(0.5), {r} rounds, target accuracy {t}; "
          f"failures at round {half + 1}")
    print(f"{'run':32s} {'avg acc':>8s} {'node acc':>8s} {'live':>5s} {'MB total':>9s} {'MB to target':>13s}")
    for row in rows:
        node = "-" if row["node_acc"] is None else f"{row['node_acc']:.3f}"
        print(f"{row['name']:32s} {row['acc']:8.3f} {node:>8s} {row['live']:5d} "
              f"{_mb(row['bytes']):>9s} {_mb(row['to_target']):>13s}")
    for line in compare(rows, half):
        print(line)
    for path in plot(rows, args.out, half, t):
        print(f"wrote {path}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
