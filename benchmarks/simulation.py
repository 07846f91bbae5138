"""Simulation speed: koinon's runtimes against hand-written PyTorch FedAvg loops.

Workloads (SGD lr 0.05, no momentum, batch 16):
  a  digits MLP 64-64-10, 100 clients (Dirichlet 0.5), 10 per round, 1 local epoch (the demo's)
  b  digits MLP, 100 clients, all 100 every round, 1 local epoch
  c  digits MLP, 20 clients (~72 samples each), all every round, 5 local epochs
  d  MNIST-1D MLP, 10,000 clients (IID), 1,000 per round, 1 local epoch
  e  digits CNN (`cnn`: two 3x3 convs, max-pool, linear), 100 IID clients, 10 per round, 1 epoch
  f  digits CNN, 100 IID clients, all 100 every round, 1 epoch
  g  MNIST-1D 1-D CNN (`cnn1d`: three stride-2 convs, linear), 100 IID clients, 10 per round
  h  MNIST-1D 1-D CNN, 100 IID clients, all 100 every round
Runtimes: `lean` is the baseline every ratio is taken against: the leanest reasonable
hand-written loop (data preloaded as tensors, one model, a manual SGD step under
`torch.no_grad()`, no DataLoader, no torch.optim). `loop` is the plainer loop most code has
(`torch.optim.SGD` built per client, FedAvg on state dicts). Both use koinon's cohorts and batch
order, so the accuracy columns agree run for run. Then koinon's `inprocess`, `vectorized`, `ray`.
Each (workload, runtime) runs in its own process, so peak RSS is its own. Prints seconds per
round, client updates per second, peak RSS, the ratio to the lean loop, and final accuracy.
With (a) selected, also times a whole `koinon run` of the demo for 30 rounds, start-up included.
Runs from any directory; writes nothing unless --out is given (then a JSON of the rows and the
timed run's folder go there; without it the timed run goes to a temporary directory).

    python benchmarks/simulation.py                 # everything
    python benchmarks/simulation.py --workloads e,f --runtimes lean,vectorized --rounds 10
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
    "e": dict(dataset="digits", model="cnn", num_clients=100, per_round=10, epochs=1, partition="iid", rounds=30),
    "f": dict(dataset="digits", model="cnn", num_clients=100, per_round=100, epochs=1, partition="iid", rounds=10),
    "g": dict(dataset="mnist1d", model="cnn1d", num_clients=100, per_round=10, epochs=1, partition="iid", rounds=30),
    "h": dict(dataset="mnist1d", model="cnn1d", num_clients=100, per_round=100, epochs=1, partition="iid", rounds=10),
}
LR, BATCH = 0.05, 16
DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.toml"  # from any directory


def _setup(w: dict):
    import torch

    import koinon as kn

    opts = {"num_samples": w["num_samples"]} if "num_samples" in w else {}
    ds = kn.DATASETS.build(w["dataset"], opts, "data", seed=0, test_fraction=0.2, num_clients=w["num_clients"])
    data = kn.partition_dataset(ds, w["partition"], w["num_clients"], seed=0, options={"alpha": 0.5} if w["partition"] == "dirichlet" else {})
    name = w.get("model", "mlp")
    model = kn.build_model(name, {"hidden": [64]} if name == "mlp" else {}, ds.input_shape, ds.num_classes, seed=0)
    return torch, kn, ds, data, model


def _cohort_schedule(w: dict, data, model, kn):
    """koinon's cohort sampler and batch schedule, so a hand-written loop trains the same
    clients on the same batches as koinon does (its training itself stays plain PyTorch)."""
    import numpy as np

    from koinon.local import CohortTrainer
    from koinon.params import Layout
    from koinon.server import SAMPLERS

    sampler = SAMPLERS.get("uniform")()
    local = kn.LocalTraining(lr=LR, batch_size=BATCH, epochs=w["epochs"])
    trainer = CohortTrainer(model, Layout.from_module(model), data, kn.LocalSGD(), local)
    sizes = data.sizes.numpy()

    def cohort(r: int) -> list[int]:
        rng = np.random.default_rng([0, r, 0x5A3B])
        return [int(c) for c in sampler.sample(np.arange(w["num_clients"]), sizes, w["per_round"], rng)]

    return cohort, trainer


def lean_loop(w: dict, rounds: int) -> tuple[float, float, float]:
    """The leanest reasonable hand-written FedAvg: data preloaded as tensors, one model, a
    manual SGD step under `torch.no_grad()`, no DataLoader, no torch.optim, FedAvg on the
    parameter tensors. The cohort's batches are looked up once a round (koinon's order)."""
    torch, kn, ds, data, model = _setup(w)
    cohort_of, trainer = _cohort_schedule(w, data, model, kn)
    x, y = ds.x_train, ds.y_train
    params = list(model.parameters())
    global_params = [p.detach().clone() for p in params]
    loss_fn = torch.nn.functional.cross_entropy
    start, cpu = time.perf_counter(), time.process_time()
    for r in range(rounds + 1):
        if r == 1:  # koinon's runtimes get an untimed warm-up round; so does the loop
            start, cpu = time.perf_counter(), time.process_time()
        cohort = cohort_of(r)
        idx, steps = trainer.schedule(cohort, 0, r)
        acc = [torch.zeros_like(p) for p in global_params]
        total = 0
        for i, c in enumerate(cohort):
            with torch.no_grad():
                for p, g in zip(params, global_params):
                    p.copy_(g)
            for row in idx[i, : int(steps[i])]:
                ix = row[row >= 0]
                grads = torch.autograd.grad(loss_fn(model(x[ix]), y[ix]), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(g, alpha=LR)
            n = len(data.client_indices[c])
            total += n
            with torch.no_grad():
                for a, p in zip(acc, params):
                    a.add_(p, alpha=n)
        global_params = [a / total for a in acc]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    with torch.no_grad():
        for p, g in zip(params, global_params):
            p.copy_(g)
        acc_test = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    return elapsed, cpu, acc_test


def plain_loop(w: dict, rounds: int) -> tuple[float, float, float]:
    """The plain loop: one model, torch.optim.SGD per client, FedAvg on state dicts."""
    torch, kn, ds, data, model = _setup(w)
    cohort_of, trainer = _cohort_schedule(w, data, model, kn)
    batches = trainer.client_batches
    x, y = ds.x_train, ds.y_train
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    start, cpu = time.perf_counter(), time.process_time()
    for r in range(rounds + 1):
        if r == 1:  # koinon's runtimes get an untimed warm-up round; so does the loop
            start, cpu = time.perf_counter(), time.process_time()
        cohort = cohort_of(r)
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
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.load_state_dict(global_state)
    with torch.no_grad():
        acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    return elapsed, cpu, acc


def koinon_runtime(w: dict, rounds: int, runtime: str) -> tuple[float, float, float]:
    torch, kn, ds, data, model = _setup(w)
    rt_options = {"num_workers": 2} if runtime == "ray" else {}
    from koinon.runtime import RUNTIMES

    rt = RUNTIMES.build(runtime, rt_options, "runtime")
    fed = kn.Federation(model, data, local=kn.LocalTraining(lr=LR, batch_size=BATCH, epochs=w["epochs"]),
                        runtime=rt, clients_per_round=w["per_round"], seed=0)
    fed.run_round(evaluate=False)  # warm-up round (Ray actors, first-call overheads) not timed
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        fed.run_round(evaluate=False)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    acc, _ = fed.evaluate()
    fed.close()
    return elapsed, cpu, acc


def one(workload: str, runtime: str, rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    w = WORKLOADS[workload]
    if runtime == "lean":
        elapsed, cpu, acc = lean_loop(w, rounds)
    elif runtime == "loop":
        elapsed, cpu, acc = plain_loop(w, rounds)
    else:
        elapsed, cpu, acc = koinon_runtime(w, rounds, runtime)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if runtime == "ray":  # the actors' memory counts too
        rss_mb += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"workload": workload, "runtime": runtime, "rounds": rounds, "s_per_round": elapsed / rounds,
            "cpu_s_per_round": cpu / rounds,
            "updates_per_s": rounds * w["per_round"] / elapsed, "peak_rss_mb": rss_mb, "accuracy": acc}


def cli_run_seconds(folder: Path) -> float:
    """Wall time of a whole `koinon run` of the demo, 30 rounds, start-up included."""
    start = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).with_name("koinon")), "run", str(DEMO), "--quiet", "--overwrite",
         "--out", str(folder), "--set", "server.rounds=30"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="a,b,c,d,e,f,g,h")
    p.add_argument("--runtimes", default="lean,loop,inprocess,vectorized,ray")
    p.add_argument("--rounds", type=int, default=0, help="override each workload's number of rounds")
    p.add_argument("--out", type=Path, help="write rows.json and the timed run's folder here")
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "RUNTIME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.rounds or WORKLOADS[args.one[0]]["rounds"])))
        return
    rows = []
    for wl in args.workloads.split(","):
        base = base_cpu = None
        for rt in args.runtimes.split(","):
            if rt == "ray":
                try:
                    import ray  # noqa: F401
                except ImportError:
                    print(f"({wl}, ray): skipped, ray is not installed (pip install 'koinon[ray]')")
                    continue
            if wl == "d" and rt in ("lean", "loop", "inprocess") and args.rounds == 0:
                rounds = 1  # 1,000 sequential clients per round: one round says enough
            else:
                rounds = args.rounds or WORKLOADS[wl]["rounds"]
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", wl, rt, "--rounds", str(rounds)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"({wl}, {rt}) failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if rt == "lean":
                base, base_cpu = row["s_per_round"], row["cpu_s_per_round"]
            row["speedup"] = base / row["s_per_round"] if base else float("nan")
            row["cpu_speedup"] = base_cpu / row["cpu_s_per_round"] if base else float("nan")
            rows.append(row)
            print(f"{wl}  {rt:<11} {row['s_per_round'] * 1000:9.1f} ms/round  {row['updates_per_s']:9.0f} updates/s  "
                  f"{row['peak_rss_mb']:7.0f} MB peak  x{row['speedup']:5.1f} vs lean  "
                  f"(CPU {row['cpu_s_per_round'] * 1000:8.1f} ms, x{row['cpu_speedup']:5.1f})  acc {row['accuracy']:.3f}",
                  flush=True)
    print()
    print("| workload | runtime | s/round | client updates/s | peak RSS (MB) | vs lean loop | CPU s/round | "
          "vs lean, CPU | accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['runtime']} | {r['s_per_round']:.4f} | {r['updates_per_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['speedup']:.1f}x | {r['cpu_s_per_round']:.4f} | {r['cpu_speedup']:.1f}x | "
              f"{r['accuracy']:.3f} |")
    result: dict = {"rows": rows}
    if "a" in args.workloads.split(","):
        if args.out is not None:
            result["koinon_run_s"] = cli_run_seconds(args.out / "demo_run")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                result["koinon_run_s"] = cli_run_seconds(Path(tmp) / "run")
        print(f"\nkoinon run of the demo, 30 rounds, start-up included: {result['koinon_run_s']:.2f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rows.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
