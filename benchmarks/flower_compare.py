"""Whole process, koinon against Flower's simulation, on one small federated workload.

Workload: scikit-learn's digits, 10 IID clients, all 10 train every round, 30 rounds, 5 local
epochs of SGD (lr 0.05, momentum 0.9, batch 16) on the MLP 64-64-10, FedAvg, the test split
evaluated centrally after every round. What is timed is what a user waits for: the wall time
of the whole command, from process start (Python, torch, the framework) to exit.

- koinon: `koinon run examples/demo.toml --set data.partition=iid --set data.num_clients=10
  --set server.clients_per_round=10 --set server.rounds=30` (the demo's model, optimizer and
  batch; its run folder with the plot and the model goes to a temporary directory).
- Flower: the same model and hyperparameters as a `ClientApp` (`NumPyClient`, a
  `torch.optim.SGD` per fit, the client's samples preloaded as tensors) and a `ServerApp`
  (`FedAvg`, `fraction_fit = 1.0`, central evaluation every round) run by
  `flwr.simulation.run_simulation` with 10 virtual SuperNodes on its default Ray backend, one
  CPU per client, in a process of its own. Flower is not koinon's dependency: install it into
  a separate environment and pass its interpreter, e.g.

      python -m venv /tmp/flwr && /tmp/flwr/bin/pip install "flwr[simulation]==1.42.*"
      # torch, numpy and scikit-learn for it (these must be importable by that interpreter):
      echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
          > /tmp/flwr/lib/python3.11/site-packages/zz_koinon_env.pth
      python benchmarks/flower_compare.py --flower-python /tmp/flwr/bin/python

Without `--flower-python` it uses this interpreter when it can import flwr; otherwise (or when
the given interpreter cannot import flwr) it prints koinon's figure and says Flower is not
installed. `--repeats N` runs each N times, interleaved, and
prints every run with the range; `--quick` runs 3 rounds. Both sides print their final test
accuracy (the splits differ: koinon's IID partition and Flower's shuffle are not the same
samples, so the accuracies agree only roughly).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo.toml"
CLIENTS, EPOCHS, LR, MOMENTUM, BATCH = 10, 5, 0.05, 0.9, 16

# The Flower side, run by the interpreter given with --flower-python. It must not import koinon.
FLOWER_APP = r'''
import json, sys, time
import numpy as np
import torch
from sklearn.datasets import load_digits
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

ROUNDS, CLIENTS, EPOCHS, LR, MOMENTUM, BATCH = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                 float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
torch.set_num_threads(1)
digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target, dtype=torch.long)
perm = np.random.default_rng(0).permutation(len(y))
n_test = int(0.2 * len(y))
test, train = perm[:n_test], perm[n_test:]
shards = np.array_split(train, CLIENTS)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def get(m):
    return [p.detach().numpy().copy() for p in m.state_dict().values()]


def put(m, arrays):
    m.load_state_dict({k: torch.from_numpy(a) for k, a in zip(m.state_dict().keys(), arrays)})


class Client(NumPyClient):
    def __init__(self, cid):
        self.x, self.y = x[shards[cid]], y[shards[cid]]
        self.model = model()

    def fit(self, parameters, config):
        put(self.model, parameters)
        opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        g = torch.Generator().manual_seed(int(config.get("round", 0)))
        for _ in range(EPOCHS):
            order = torch.randperm(len(self.y), generator=g)
            for i in range(0, len(order), BATCH):
                ix = order[i:i + BATCH]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(self.model(self.x[ix]), self.y[ix]).backward()
                opt.step()
        return get(self.model), len(self.y), {}


def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()


final = {}


def evaluate(server_round, parameters, config):
    m = model()
    put(m, parameters)
    with torch.no_grad():
        out = m(x[test])
        loss = torch.nn.functional.cross_entropy(out, y[test]).item()
        acc = (out.argmax(1) == y[test]).float().mean().item()
    final["accuracy"] = acc
    return loss, {"accuracy": acc}


def server_fn(context: Context):
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=CLIENTS,
                      min_available_clients=CLIENTS, evaluate_fn=evaluate,
                      on_fit_config_fn=lambda r: {"round": r},
                      initial_parameters=ndarrays_to_parameters(get(model())))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))


run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
               num_supernodes=CLIENTS, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
print(json.dumps({"accuracy": final.get("accuracy")}))
'''


def koinon_run(rounds: int) -> tuple[float, float]:
    """Wall seconds of the whole `koinon run` process, and its final accuracy."""
    exe = Path(sys.executable).with_name("koinon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "koinon.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run(
            [*cmd, "run", str(DEMO), "--quiet", "--out", str(out), "--set", "data.partition=iid",
             "--set", f"data.num_clients={CLIENTS}", "--set", f"server.clients_per_round={CLIENTS}",
             "--set", f"server.rounds={rounds}", "--set", f"client.epochs={EPOCHS}"],
            check=True, stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
        if not (out / "accuracy.png").exists():
            raise RuntimeError("koinon run wrote no accuracy.png")
    return wall, summary["final_accuracy"]


def flower_available(python: str | None) -> str:
    """'' when `python` can import flwr, torch and scikit-learn, else why not."""
    if not python:
        return "no --flower-python given"
    try:
        out = subprocess.run([python, "-c", "import flwr, torch, sklearn; print(flwr.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except OSError as exc:
        return f"{python}: {exc}"
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return f"{python} cannot import flwr, torch and scikit-learn ({lines[-1] if lines else 'failed'})"
    return ""


def flower_run(python: str, rounds: int) -> tuple[float, float]:
    """Wall seconds of the whole Flower simulation process, and its final accuracy."""
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    out = subprocess.run([python, "-c", FLOWER_APP, str(rounds), str(CLIENTS), str(EPOCHS), str(LR),
                          str(MOMENTUM), str(BATCH)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError("Flower run failed: " + "\n".join(out.stderr.strip().splitlines()[-5:]))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return wall, result["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flower-python", help="an interpreter that has flwr[simulation]==1.42.*, torch and scikit-learn")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1, help="runs of each, interleaved")
    p.add_argument("--quick", action="store_true", help="3 rounds, one run each (a smoke run)")
    args = p.parse_args()
    rounds, repeats = (3, 1) if args.quick else (args.rounds, args.repeats)
    if args.flower_python is None and importlib.util.find_spec("flwr") is not None:
        args.flower_python = sys.executable  # flwr is importable here: no second environment needed
    why_not = flower_available(args.flower_python)
    if why_not:
        print(f"Flower is not installed ({why_not}); timing koinon only")
    print(f"{rounds} rounds, {CLIENTS} IID digits clients all training every round, {EPOCHS} local epochs, "
          f"whole process wall time")
    times: dict[str, list[float]] = {"koinon": [], "flower": []}
    for i in range(repeats):
        wall, acc = koinon_run(rounds)
        times["koinon"].append(wall)
        print(f"run {i + 1}  koinon  {wall:6.2f} s  final accuracy {acc:.4f}", flush=True)
        if not why_not:
            assert args.flower_python is not None
            wall, acc = flower_run(args.flower_python, rounds)
            times["flower"].append(wall)
            print(f"run {i + 1}  flower  {wall:6.2f} s  final accuracy {acc:.4f}", flush=True)
    k = times["koinon"]
    line = f"koinon {min(k):.2f}-{max(k):.2f} s"
    if times["flower"]:
        f = times["flower"]
        ratios = [b / a for a, b in zip(k, f)]
        line += f", Flower {min(f):.2f}-{max(f):.2f} s, Flower / koinon {min(ratios):.1f}-{max(ratios):.1f}x (run by run)"
    print(line)


if __name__ == "__main__":
    main()
