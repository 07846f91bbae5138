"""Simulation speed: koinon's runtimes against a plain hand-written PyTorch FedAvg loop.

Workloads (digits MLP 64-64-10, SGD lr 0.05, batch 16):
  a  demo: 100 clients (Dirichlet 0.5), 10 per round, 1 local epoch
  b  100 clients, all 100 every round, 1 local epoch
  c  20 clients (~72 samples each), all every round, 5 local epochs
  d  10,000 clients of MNIST-1D (IID), 1,000 per round, 1 local epoch
Each (workload, runtime) runs in its own process, so peak RSS is its own. Prints seconds per
round, client updates per second, peak RSS, the ratio to the plain loop, and final accuracy.
Also times a whole `koinon run` of workload (a) for 30 rounds, start-up included.

    python benchmarks/simulation.py                 # everything
    python benchmarks/simulation.py --workloads a,c --runtimes loop,vectorized --rounds 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    "a": dict(dataset="digits", num_clients=100, per_round=10, epochs=1, partition="dirichlet", rounds=30),
    "b": dict(dataset="digits", num_clients=100, per_round=100, epochs=1, partition="dirichlet", rounds=10),
    "c": dict(dataset="digits", num_clients=20, per_round=20, epochs=5, partition="iid", rounds=10),
    "d": dict(dataset="mnist1d", num_clients=10_000, per_round=1_000, epochs=1, partition="iid", rounds=3,
              num_samples=60_000),
}
LR, BATCH = 0.05, 16
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.toml"  # from any directory


def _setup(w: dict):
    import torch

    import koinon as kn

    opts = {"num_samples": w["num_samples"]} if "num_samples" in w else {}
    ds = kn.DATASETS.build(w["dataset"], opts, "data", seed=0, test_fraction=0.2, num_clients=w["num_clients"])
    data = kn.partition_dataset(ds, w["partition"], w["num_clients"], seed=0, options={"alpha": 0.5} if w["partition"] == "dirichlet" else {})
    model = kn.build_model("mlp", {"hidden": [64]}, ds.input_shape, ds.num_classes, seed=0)
    return torch, kn, ds, data, model


def plain_loop(w: dict, rounds: int) -> tuple[float, float]:
    """The reference: one model, torch.optim.SGD per client, FedAvg on state dicts. Nothing else."""
    torch, kn, ds, data, model = _setup(w)
    import numpy as np

    from koinon.local import CohortTrainer
    from koinon.params import Layout
    from koinon.server import SAMPLERS

    # Same cohorts and the same batch order as koinon (its sampler and batch schedule), so the
    # accuracy columns are comparable run for run; the training itself is plain PyTorch.
    sampler = SAMPLERS.get("uniform")()
    local = kn.LocalTraining(lr=LR, batch_size=BATCH, epochs=w["epochs"])
    batches = CohortTrainer(model, Layout.from_module(model), data, kn.LocalSGD(), local).client_batches
    sizes = data.sizes.numpy()
    x, y = ds.x_train, ds.y_train
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    for r in range(rounds + 1):
        if r == 1:  # koinon's runtimes get an untimed warm-up round; so does the loop
            start = time.perf_counter()
        rng = np.random.default_rng([0, r, 0x5A3B])
        cohort = sampler.sample(np.arange(w["num_clients"]), sizes, w["per_round"], rng)
        total = 0
        acc_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for c in cohort:
            idx = data.client_indices[c]
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            for row in batches(c, 0, r):
                ix = row[row >= 0]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[ix]), y[ix]).backward()
                opt.step()
            n = len(idx)
            total += n
            for k, v in model.state_dict().items():
                acc_state[k] += v * n
        global_state = {k: v / total for k, v in acc_state.items()}
    elapsed = time.perf_counter() - start
    model.load_state_dict(global_state)
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    return elapsed, acc


def koinon_runtime(w: dict, rounds: int, runtime: str) -> tuple[float, float]:
    torch, kn, ds, data, model = _setup(w)
    rt_options = {"num_workers": 2} if runtime == "ray" else {}
    from koinon.runtime import RUNTIMES

    rt = RUNTIMES.build(runtime, rt_options, "runtime")
    fed = kn.Federation(model, data, local=kn.LocalTraining(lr=LR, batch_size=BATCH, epochs=w["epochs"]),
                        runtime=rt, clients_per_round=w["per_round"], seed=0)
    fed.run_round(evaluate=False)  # warm-up round (Ray actors, first-call overheads) not timed
    start = time.perf_counter()
    for _ in range(rounds):
        fed.run_round(evaluate=False)
    elapsed = time.perf_counter() - start
    acc, _ = fed.evaluate()
    fed.close()
    return elapsed, acc


def one(workload: str, runtime: str, rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    w = WORKLOADS[workload]
    elapsed, acc = plain_loop(w, rounds) if runtime == "loop" else koinon_runtime(w, rounds, runtime)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if runtime == "ray":  # the actors' memory counts too
        rss_mb += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"workload": workload, "runtime": runtime, "rounds": rounds, "s_per_round": elapsed / rounds,
            "updates_per_s": rounds * w["per_round"] / elapsed, "peak_rss_mb": rss_mb, "accuracy": acc}


def cli_run_seconds() -> float:
    """Wall time of a whole `koinon run` of workload (a), 30 rounds, start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run(
            [str(Path(sys.executable).with_name("koinon")), "run", str(DEMO), "--quiet",
             "--out", f"{tmp}/run", "--set", "server.rounds=30", "--set", "client.epochs=1",
             "--set", "client.momentum=0.0", "--set", "server.eval_every=30"],
            check=True, stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="a,b,c,d")
    p.add_argument("--runtimes", default="loop,inprocess,vectorized,ray")
    p.add_argument("--rounds", type=int, default=0, help="override each workload's number of rounds")
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "RUNTIME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.rounds or WORKLOADS[args.one[0]]["rounds"])))
        return
    rows = []
    for wl in args.workloads.split(","):
        base = None
        for rt in args.runtimes.split(","):
            if rt == "ray":
                try:
                    import ray  # noqa: F401
                except ImportError:
                    print(f"({wl}, ray): skipped, ray is not installed (pip install 'koinon[ray]')")
                    continue
            if wl == "d" and rt in ("loop", "inprocess") and args.rounds == 0:
                rounds = 1  # 1,000 sequential clients per round: one round says enough
            else:
                rounds = args.rounds or WORKLOADS[wl]["rounds"]
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", wl, rt, "--rounds", str(rounds)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"({wl}, {rt}) failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if rt == "loop":
                base = row["s_per_round"]
            row["speedup"] = base / row["s_per_round"] if base else float("nan")
            rows.append(row)
            print(f"{wl}  {rt:<11} {row['s_per_round'] * 1000:9.1f} ms/round  {row['updates_per_s']:9.0f} updates/s  "
                  f"{row['peak_rss_mb']:7.0f} MB peak  x{row['speedup']:5.1f} vs loop  acc {row['accuracy']:.3f}",
                  flush=True)
    print()
    print("| workload | runtime | s/round | client updates/s | peak RSS (MB) | vs plain loop | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['runtime']} | {r['s_per_round']:.4f} | {r['updates_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['speedup']:.1f}x | {r['accuracy']:.3f} |")
    if "a" in args.workloads.split(","):
        print(f"\nkoinon run, workload (a), 30 rounds, start-up included: {cli_run_seconds():.2f} s")


if __name__ == "__main__":
    main()
