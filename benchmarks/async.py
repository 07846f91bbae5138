"""Heterogeneous clients in simulated time, and client selection with feedback.

Part 1: 100 clients (sklearn digits, Dirichlet(0.5) label skew, MLP 64), log-normal compute
speeds (sigma 1), 30% of the clients leaving for good at random times. FedAvg runs its rounds;
every other schedule runs for the same simulated time. Printed per method (mean over seeds):
final accuracy, simulated seconds to reach FedAvg's final accuracy (and the fraction of
FedAvg's time), server steps, and megabytes up and down until then. Goal: the best
asynchronous method reaches FedAvg's final accuracy in at most half of FedAvg's time.

Part 2: a source-skewed population: 80 clients hold only digits 0-2 (a redundant source, a few
samples each), 20 hold digits 3-9. Rounds until a target test accuracy with the uniform,
proportional, UCB (over clients, and over the two sources) and curriculum samplers, and with
curriculum ordering of local data. Goal: UCB or curriculum needs fewer rounds than uniform.

    .venv/bin/python benchmarks/async.py [--quick] [--seeds 3] [--plot docs/async.png]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from koinon.config import Config
from koinon.data import FederatedData
from koinon.experiment.runner import build_federation
from koinon.topology.federated import Federation

BASE = {
    "data.name": "digits", "data.partition": "dirichlet", "data.alpha": 0.5, "data.num_clients": 100,
    "model.name": "mlp", "model.hidden": [64], "client.steps": 10, "client.batch_size": 16,
    "client.lr": 0.05, "client.momentum": 0.9, "server.clients_per_round": 10, "runtime.name": "vectorized",
    "clock.speed": "lognormal", "clock.sigma": 1.0, "clock.dropout": 0.3, "clock.dropout_within_s": 60.0,
}
METHODS = {
    "FedAvg": {"schedule.name": "sync"},
    "FedAvg+deadline": {"schedule.name": "sync", "schedule.deadline_s": 0.5},
    "FedAsync": {"schedule.name": "fedasync", "schedule.mixing": 0.5, "schedule.concurrency": 10},
    "FedBuff": {"schedule.name": "fedbuff", "schedule.buffer": 5, "schedule.concurrency": 10},
    "FedCompass": {"schedule.name": "fedcompass", "schedule.min_steps": 2, "schedule.concurrency": 10},
    "FedAMD": {"schedule.name": "fedamd", "schedule.anchor_probability": 0.3},
}


def run_method(overrides: dict, seed: int, rounds: int | None, until_s: float | None) -> list[dict]:
    """(sim time, accuracy, MB up, MB down) after every server step."""
    cfg = Config().with_overrides({**BASE, **overrides, "seed": seed})
    run = build_federation(cfg)
    curve = []
    try:
        while True:
            out = run.run_round(evaluate=True)
            curve.append({"t": out.extra["sim_time_s"], "acc": out.test_accuracy,
                          "up": run.uplink_total / 1e6, "down": run.downlink_total / 1e6})
            if rounds is not None and len(curve) >= rounds:
                break
            if until_s is not None and out.extra["sim_time_s"] >= until_s:
                break
    finally:
        run.close()
    return curve


def smoothed(curve: list[dict], k: int = 5) -> list[float]:
    """Accuracy averaged over the last k evaluations (single evaluations are noisy)."""
    accs = [c["acc"] for c in curve]
    return [float(np.mean(accs[max(0, i - k + 1): i + 1])) for i in range(len(accs))]


def first_reach(curve: list[dict], target: float) -> dict | None:
    for c, acc in zip(curve, smoothed(curve)):
        if acc >= target:
            return c
    return None


def part_one(seeds: list[int], rounds: int, plot: str | None) -> list[dict]:
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    curves: dict[str, list[dict]] = {}
    for seed in seeds:
        start = time.perf_counter()
        fedavg = run_method(METHODS["FedAvg"], seed, rounds, None)
        horizon = fedavg[-1]["t"]
        target = smoothed(fedavg)[-1]
        for name, overrides in METHODS.items():
            curve = fedavg if name == "FedAvg" else run_method(overrides, seed, None, horizon)
            hit = first_reach(curve, target)
            rows[name].append({
                "final": smoothed(curve)[-1], "steps": len(curve),
                "t": hit["t"] if hit else math.inf, "up": hit["up"] if hit else math.nan,
                "down": hit["down"] if hit else math.nan, "horizon": horizon,
            })
            if seed == seeds[0]:
                curves[name] = curve
        print(f"seed {seed}: FedAvg {rounds} rounds = {horizon:.1f} simulated s, final accuracy "
              f"{target:.4f} (mean of its last 5 evaluations); {time.perf_counter() - start:.0f} s wall", flush=True)
    table = []
    print("\n| method | final acc | sim s to FedAvg's final acc | fraction of FedAvg's time | server steps | MB up / down until then |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        reached = [r for r in rs if math.isfinite(r["t"])]
        frac = [r["t"] / r["horizon"] for r in reached]
        t = statistics.mean(r["t"] for r in reached) if reached else math.inf
        line = {"method": name, "final": statistics.mean(r["final"] for r in rs),
                "t": t, "fraction": statistics.mean(frac) if frac else math.inf,
                "reached": f"{len(reached)}/{len(rs)}", "steps": statistics.mean(r["steps"] for r in rs),
                "up": statistics.mean(r["up"] for r in reached) if reached else math.nan,
                "down": statistics.mean(r["down"] for r in reached) if reached else math.nan}
        table.append(line)
        when = f"{t:.1f} ({line['reached']} seeds)" if reached else f"not reached (0/{len(rs)})"
        print(f"| {name} | {line['final']:.4f} | {when} | {line['fraction']:.2f} | {line['steps']:.0f} | "
              f"{line['up']:.2f} / {line['down']:.2f} |")
    best = min((r for r in table if r["method"] not in ("FedAvg", "FedAvg+deadline")), key=lambda r: r["fraction"])
    verdict = "met" if best["fraction"] <= 0.5 else "MISSED"
    print(f"\ngoal (best asynchronous method within half of FedAvg's time): {verdict}; best is "
          f"{best['method']} at {best['fraction']:.2f} of FedAvg's simulated time")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, curve in curves.items():
            ax.plot([c["t"] for c in curve], smoothed(curve), label=name, lw=1.2)
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("test accuracy (mean of last 5 evaluations)")
        ax.set_title(f"digits, 100 clients, log-normal speeds (sigma 1), 30% dropping out; seed {seeds[0]}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        print(f"plot: {plot}")
    return table


def skewed_federation(seed: int, sampler, algorithm: str | dict = "fedavg") -> Federation:
    """80 clients with a few samples of digits 0-2 each, 20 clients sharing digits 3-9."""
    import koinon as kn

    ds = kn.DATASETS.get("digits")(seed=seed, test_fraction=0.2, num_clients=100)
    g = torch.Generator().manual_seed(seed)
    y = ds.y_train
    easy = torch.nonzero(y <= 2).flatten()
    hard = torch.nonzero(y > 2).flatten()
    easy, hard = easy[torch.randperm(len(easy), generator=g)], hard[torch.randperm(len(hard), generator=g)]
    clients = list(torch.tensor_split(easy, 80)) + list(torch.tensor_split(hard, 20))
    data = FederatedData(ds, clients)
    torch.manual_seed(seed)
    model = kn.build_model("mlp", {"hidden": [64]}, ds.input_shape, ds.num_classes, seed)
    return kn.Federation(model, data, local=kn.LocalTraining(lr=0.05, steps=10, batch_size=16, momentum=0.9),
                         clients_per_round=10, seed=seed, sampler=sampler, runtime="vectorized",
                         algorithm=algorithm)


def part_two(seeds: list[int], rounds: int, target: float) -> list[dict]:
    from koinon.server.feedback import UCB, Curriculum

    samplers = {
        "uniform": lambda: "uniform",
        "proportional (data size)": lambda: "proportional",
        "UCB over clients": lambda: UCB(c=0.5),
        "UCB over sources (DUMP)": lambda: UCB(c=0.5, window=5, sources=[0] * 80 + [1] * 20, temperature=0.1),
        "curriculum (easy first)": lambda: Curriculum(start=0.3, pace=20),
        "uniform + curriculum ordering of local data": lambda: "uniform",
        "curriculum selection + ordering": lambda: Curriculum(start=0.3, pace=20),
    }
    table = []
    print(f"\n| sampler | rounds to {target:.0%} test accuracy | final acc after {rounds} rounds |")
    print("|---|---|---|")
    for name, make in samplers.items():
        reached, finals = [], []
        for seed in seeds:
            fed = skewed_federation(seed, make(), "curriculum" if "ordering" in name else "fedavg")
            records = fed.fit(rounds)
            curve = [{"acc": r.test_accuracy} for r in records]
            hit = next((i + 1 for i, a in enumerate(smoothed(curve, 3)) if a >= target), None)
            reached.append(hit)
            finals.append(smoothed(curve, 3)[-1])
        ok = [h for h in reached if h is not None]
        when = f"{statistics.mean(ok):.1f} ({len(ok)}/{len(seeds)} seeds)" if ok else f"not reached (0/{len(seeds)})"
        table.append({"sampler": name, "rounds": statistics.mean(ok) if ok else math.inf,
                      "reached": len(ok), "final": statistics.mean(finals)})
        print(f"| {name} | {when} | {statistics.mean(finals):.4f} |", flush=True)
    base = next(r for r in table if r["sampler"] == "uniform")
    better = [r for r in table if r["sampler"].startswith(("UCB", "curriculum")) and r["rounds"] < base["rounds"]]
    print(f"\ngoal (UCB or curriculum in fewer rounds than uniform): {'met by ' + ', '.join(r['sampler'] for r in better) if better else 'MISSED'}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rounds (a smoke run)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--plot", default=None, help="write accuracy against simulated time here (PNG)")
    parser.add_argument("--json", default=None, help="write the tables here")
    args = parser.parse_args()
    seeds = list(range(1 if args.quick else args.seeds))
    torch.set_num_threads(1)
    one = part_one(seeds, 15 if args.quick else 60, args.plot)
    two = part_two(seeds, 15 if args.quick else 60, 0.6 if args.quick else 0.85)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"schedules": one, "samplers": two}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
