"""Every client algorithm on Dirichlet-split digits and MNIST-1D: rounds and bytes to a target.

For each dataset (sklearn digits with the digits MLP; generated MNIST-1D with the 1-D CNN),
Dirichlet alpha 0.5 and 0.1 over 20 clients (10 a round, two local epochs of SGD, batch 16),
every algorithm runs from the same seeds; the table gives the mean over seeds of the rounds
and the megabytes (uplink + downlink, the real payloads) until the test accuracy first reaches
the target (- where a seed never does; n/3 says how many seeds did), the final accuracy, and
the accuracy under an L-infinity PGD attack (`robust_accuracy`, the attack the `adversarial`
algorithm trains against). Paper figures are not repeated: the seed papers ran CIFAR / EMNIST
/ Shakespeare-LEAF models we do not have here.

    nice -n 10 .venv/bin/python benchmarks/zoo.py [--quick] [--seeds 3] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

from koinon.clients.adversarial import robust_accuracy
from koinon.clients.autoflip import pruned_macs
from koinon.config import Config
from koinon.experiment.runner import build_federation

SPARSE = {"codec.name": "threshold", "codec.threshold": 1e-30,  # keeps every float32 value above 1e-30
          "downlink.name": "threshold", "downlink.threshold": 1e-30}
# name -> client options (lr and local epochs shared); chosen once, not tuned per dataset.
ALGORITHMS: dict[str, dict] = {
    "fedavg": {},
    "fedprox": {"client.mu": 0.01},
    "scaffold": {},
    "fednova": {},
    "feddyn": {"client.alpha": 0.01},
    "fedsam": {"client.rho": 0.05},
    "fedspeed": {"client.rho": 0.05, "client.alpha": 0.5, "client.lam": 10.0},
    "mime_lite": {"client.beta": 0.9},
    "worker_momentum": {"client.beta": 0.9},
    "moon": {"client.mu_con": 1.0, "client.tau": 0.5},
    "spsa": {"client.lr": 0.02},  # zeroth-order: one byte per local step up
    "adversarial": {},  # PGD options per dataset below
    # FRL trains supermask rankings over fixed random weights (linear layers; the CNN's convolutions stay random).
    "frl": {"model.peft": {"name": "supermask", "density": 0.5}, "client.optimizer": "adamw", "client.lr": 0.02},
    "fedlex": {"client.explore_rounds": 2},
    # AutoFLIP's pruned (zero) update coordinates cost only a bitmap bit under a sparse codec that
    # keeps every non-zero; FedAvg under the same codec is the byte baseline.
    "autoflip": {"client.explore_rounds": 2, "client.sparsity": 0.5, "client.structured": 0.2, **SPARSE},
    "fedavg+sparse": {"client.algorithm": "fedavg", **SPARSE},
}
# dataset -> (settings, target accuracy, PGD radius / step / steps for training and for the robust accuracy)
DATASETS = {
    "digits": ({"data.name": "digits", "model.name": "mlp", "client.lr": 0.1}, 0.85, (0.1, 0.025, 5)),
    "mnist1d": ({"data.name": "mnist1d", "data.num_samples": 4000, "model.name": "cnn1d", "model.channels": 32,
                 "client.lr": 0.1}, 0.45, (0.2, 0.05, 5)),
}


def run(dataset: str, alpha: float, name: str, seed: int, rounds: int) -> dict:
    settings, target, (eps, step, steps) = DATASETS[dataset]
    options = dict(ALGORITHMS[name])
    if name == "adversarial":
        options.update({"client.pgd_eps": eps, "client.pgd_step": step, "client.pgd_steps": steps})
    cfg = Config().with_overrides({
        **settings, "seed": seed, "data.partition": "dirichlet", "data.alpha": alpha, "data.num_clients": 20,
        "server.clients_per_round": 10, "server.rounds": rounds, "client.algorithm": name,
        "client.batch_size": 16, "client.epochs": 2, **options})
    fed = build_federation(cfg)
    reached, bytes_to, total, acc, up = None, None, 0, 0.0, 0
    for r in range(rounds):
        res = fed.run_round(evaluate=True)
        total += res.uplink_bytes + res.downlink_bytes
        up += res.uplink_bytes
        acc = res.test_accuracy or 0.0
        if reached is None and acc >= target:
            reached, bytes_to = r + 1, total
    ds = fed.data.dataset
    robust = robust_accuracy(fed.model, fed.layout, fed.params, ds.x_test, ds.y_test, eps, step, steps)
    macs = None
    if options.get("client.algorithm", name) == "autoflip":
        macs = pruned_macs(fed.model, fed.layout, fed.server.server_state["mask"], ds.x_test)
    fed.close()
    return {"rounds": reached, "bytes": bytes_to, "final": acc, "robust": robust, "total": total, "up": up, "macs": macs}


def _mean(values: list) -> str:
    got = [v for v in values if v is not None]
    return "-" if not got else f"{statistics.mean(got):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 5 rounds, digits only")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--only", nargs="*", default=None, help="algorithms to run")
    args = parser.parse_args()
    seeds = [0] if args.quick else list(range(args.seeds))
    rounds = 5 if args.quick else args.rounds
    names = args.only or list(ALGORITHMS)
    datasets = ["digits"] if args.quick else list(DATASETS)
    t0 = time.perf_counter()
    for dataset in datasets:
        for alpha in (0.5, 0.1):
            target = DATASETS[dataset][1]
            eps = DATASETS[dataset][2][0]
            print(f"\n{dataset}, Dirichlet {alpha}, 20 clients (10 a round), {rounds} rounds, "
                  f"{len(seeds)} seed(s); target accuracy {target}; robust: PGD eps {eps}\n")
            print("| algorithm | rounds to target | MB to target (up+down) | reached | final accuracy | robust accuracy |")
            print("|---|---:|---:|---:|---:|---:|")
            notes: list[str] = []
            for name in names:
                runs = [run(dataset, alpha, name, s, rounds) for s in seeds]
                mb = [None if r["bytes"] is None else r["bytes"] / 1e6 for r in runs]
                reached = sum(r["rounds"] is not None for r in runs)
                finals = [r["final"] for r in runs]
                robust = [r["robust"] for r in runs]
                spread = f" ± {statistics.stdev(finals):.3f}" if len(finals) > 1 else ""
                print(f"| {name} | {_mean([r['rounds'] for r in runs])} | {_mean(mb)} | {reached}/{len(runs)} | "
                      f"{statistics.mean(finals):.3f}{spread} | {statistics.mean(robust):.3f} |", flush=True)
                if name in ("autoflip", "fedavg+sparse"):
                    saved = [r["macs"] for r in runs if r["macs"] is not None]
                    notes.append(f"{name}: {statistics.mean(r['up'] for r in runs) / 1e6:.2f} MB up, "
                                 f"{statistics.mean(r['total'] - r['up'] for r in runs) / 1e6:.2f} MB down in all "
                                 f"{rounds} rounds" + (f", {statistics.mean(saved):.1%} of the weight "
                                                       "multiply-adds pruned" if saved else ""))
            for note in notes:
                print(f"- {note}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
