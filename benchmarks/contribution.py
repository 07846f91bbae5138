"""Contribution scores against clients of known quality, and what scoring costs.

Populations on digits (IID shares, an MLP 64-64-10, the demo's local training: 5 epochs of
batch 16 at lr 0.05 with momentum 0.9; every client in every round):

- 10 clients: 3 clean, noisy labels at 20 / 50 / 80 %, a duplicate of client 0, a free rider
  (sends the global model back), a label flipper, a sign flipper;
- 50 clients: 15 clean, 5 each with noisy labels at 20 / 40 / 60 / 80 %, 5 duplicates of clean
  clients, 3 free riders, 4 label flippers, 3 sign flippers.

True quality: clean and duplicates 1, noisy 1 - rate, free riders 0, flippers -1. For each
method: the Spearman correlation of its total scores with the true quality, the seconds and
coalition models it spent, its overhead on the training run (its seconds over the wall time
of the same run's training, i.e. its wall time less the ledger's: measured in one run, so load
on a shared machine slows both alike), and the cents paid to free riders and attackers out of a
budget of 100 000. Goals: GTG-Shapley's correlation >= 0.9 with 50 clients at under 20 %
overhead; every attacker and free rider paid nothing.

Seeds 0 and 1 by default (each redraws the split, the model and which samples each role holds).

A second workload (`--workload mnist1d`, also in the default run) where training is not tiny:
the same 50 roles on MNIST-1D (20 000 generated signals, 16 000 to train: 320 a client), an MLP
40-256-256-10 with the same local training, 5 rounds, an owner's validation set of 200 signals
(`validation_fraction = 0.05` of the test split). Its training round takes seconds, not the
20-40 ms of the digits round, so the overhead is the scoring's cost relative to real work.

Simulated clients' receipt signatures are not counted as the ledger's: in a deployment each
client signs on its own device (they count as the clients' training time here).

    nice -n 10 python benchmarks/contribution.py            # about 20 minutes on 2 loaded cores
    nice -n 10 python benchmarks/contribution.py --workload digits   # the digits rows only
    nice -n 10 python benchmarks/contribution.py --quick    # 10 clients, 3 rounds, 2 methods
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from koinon.clients import LocalTraining
from koinon.ledger.population import score_population
from koinon.ledger.shapley import Budget

TEN = ["clean"] * 3 + ["noisy:0.2", "noisy:0.5", "noisy:0.8", "duplicate:0", "free_rider", "label_flip",
                       "sign_flip"]
FIFTY = (["clean"] * 15 + [f"noisy:{r}" for r in (0.2, 0.4, 0.6, 0.8) for _ in range(5)]
         + [f"duplicate:{j}" for j in range(5)] + ["free_rider"] * 3 + ["label_flip"] * 4 + ["sign_flip"] * 3)


METHODS = [("gtg", "gtg", 0), ("gtg@200", "gtg", 200), ("tmc@200", "tmc", 200), ("loo", "loo", 0),
           ("shapfed", "shapfed", 0), ("cosine", "cosine", 0), ("trust", "trust", 0)]
"""(label, method, coalition evaluations a round; 0: the method's own stop)."""

MNIST1D_METHODS = [("gtg@200", "gtg", 200), ("gtg@100", "gtg", 100), ("loo", "loo", 0), ("cosine", "cosine", 0),
                   ("trust", "trust", 0)]
MNIST1D = {"model": "mlp", "model_options": {"hidden": [256, 256]}, "dataset": "mnist1d",
           "dataset_options": {"num_samples": 20_000}, "validation_fraction": 0.05}
"""The second workload: 50 clients of 320 MNIST-1D signals each, an MLP 40-256-256-10."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 clients, 3 rounds, one seed, gtg@200 and cosine")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", default="0,1", help="comma-separated; each redraws data, model and roles' samples")
    p.add_argument("--utility", default="loss", choices=["loss", "accuracy"])
    p.add_argument("--workload", default="both", choices=["both", "digits", "mnist1d"],
                   help="digits: the 10- and 50-client tables; mnist1d: 50 clients with real training work")
    p.add_argument("--mnist1d-rounds", type=int, default=5)
    args = p.parse_args()
    rounds = 3 if args.quick else args.rounds
    seeds = [0] if args.quick else [int(x) for x in args.seeds.split(",")]
    methods = [m for m in METHODS if m[0] in ("gtg@200", "cosine")] if args.quick else METHODS
    populations = [("10", TEN)] if args.quick else [("10", TEN), ("50", FIFTY)]
    if args.workload == "mnist1d":
        populations = []
    if args.workload in ("both", "mnist1d") and not args.quick:
        populations.append(("50 MNIST-1D", FIFTY))
    local = LocalTraining(lr=0.05, epochs=5, batch_size=16, momentum=0.9)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, roles in populations:
            workload = MNIST1D if "MNIST" in size else {}
            todo = MNIST1D_METHODS if workload else methods + (
                [("exact", "exact", 0)] if size == "10" and not args.quick else [])
            for label, name, evals in todo:
                runs = []
                for seed in seeds:
                    r = score_population(roles, name, rounds=args.mnist1d_rounds if workload else rounds, seed=seed,
                                         out=Path(tmp) / f"{size}-{label}-{seed}", local=local, utility=args.utility,
                                         budget=Budget(evaluations=evals), **workload)  # type: ignore[arg-type]
                    runs.append(r)
                    print(f"  {size} clients, {label}, seed {seed}: rho {r.spearman:.3f}, ledger {r.ledger_s:.2f} s "
                          f"(scoring {r.scoring_s:.2f} s), {r.evaluations} evaluations, {r.bad_paid} cents to "
                          f"attackers, training {_training(r):.2f} s, accuracy {r.accuracy:.3f}", flush=True)
                rows.append((size, label, runs))
    print(f"\n{rounds} rounds on digits ({args.mnist1d_rounds} on MNIST-1D), seeds {', '.join(map(str, seeds))}, "
          f"utility {args.utility}; figures per seed, separated by /")
    print("| clients | method | Spearman | scoring s | logging s | coalition evals | overhead (all) | "
          "overhead (scoring) | cents to attackers | training s |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def each(runs, fmt):
        return " / ".join(fmt(r) for r in runs)

    for size, label, runs in rows:
        print(f"| {size} | {label} | {each(runs, lambda r: f'{r.spearman:.3f}')} | "
              f"{each(runs, lambda r: f'{r.scoring_s:.2f}')} | {each(runs, lambda r: f'{r.ledger_s - r.scoring_s:.2f}')} | "
              f"{each(runs, lambda r: str(r.evaluations))} | {each(runs, lambda r: f'{_overhead(r):.0%}')} | "
              f"{each(runs, lambda r: f'{r.scoring_s / _training(r):.0%}')} | {each(runs, lambda r: str(r.bad_paid))} | "
              f"{each(runs, lambda r: f'{_training(r):.2f}')} |")
    for size, label, runs in rows:
        if size.startswith("50") and label.startswith("gtg"):
            rho, over = min(r.spearman for r in runs), max(_overhead(r) for r in runs)
            print(f"goal {label}, {size} clients: rho >= 0.9 {'met' if rho >= 0.9 else 'MISSED'} (worst seed "
                  f"{rho:.3f}); overhead < 20 % {'met' if over < 0.2 else 'MISSED'} (worst seed {over:.0%})")
    for size, label, runs in rows:
        worst = max(r.bad_paid for r in runs)
        print(f"goal every attacker and free rider paid nothing, {size} clients, {label}: "
              f"{'met' if worst == 0 else 'MISSED'} (at most {worst} cents of 100000)")


def _training(r) -> float:
    """The run's own training seconds: its wall time less the ledger's (one run, one load)."""
    return r.wall_s - r.ledger_s


def _overhead(r) -> float:
    return r.ledger_s / _training(r)


if __name__ == "__main__":
    main()
