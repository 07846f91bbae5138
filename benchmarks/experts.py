"""Owners' experts with a router, opting out, and federated distillation, against FedAvg.

    python benchmarks/experts.py                 # digits, 3 seeds (about 2-3 minutes)
    python benchmarks/experts.py --task shakespeare
    python benchmarks/experts.py --quick         # one seed, fewer rounds (smoke run)

Digits task: scikit-learn digits, 4 owners (clients) with an IID share each, every owner's data
in its own domain (owner 0 as is, 1 rotated 90 degrees, 2 with inverted contrast, 3 with one
fixed permutation of the pixels); the test split (360 images) is dealt to the four domains and
shifted the same way. 10 % of every owner's samples form the public split on which the run
pretrains the public seed model (MLP 64-32-10; 20 epochs) that every method starts from.
Rounds: `--rounds` (30) of 1 local epoch of SGD (lr 0.05, momentum 0.9, batch 16), all owners
every round.

Methods: FedAvg (the seed model averaged over the owners every round); experts + FlexOlmo's
domain router (the public model kept as an expert; experts shipped once, at the end); the same
run with owner 0 opted out at inference; the same experts weighted per test domain by SADE
(self-supervised on the domain's unlabeled test inputs) instead of the router; one student (a
copy of the public model) per test domain distilled from the mixture on that domain's unlabeled
inputs (Meta-DMoE's test-time step, without its meta-training); experts + a learned router (DDM: a linear classifier
of the partition, trained on the public split); HDEE (experts of width 16 / 32 / 64 / 128 by
domain difficulty); the FlexOlmo mixture plus Mixture of Thoughts' latent interface (trained on
the public split, experts frozen); LoRA experts (rank-4 adapters on every layer of the frozen public
model, only the adapters shipped); federated distillation (logits on 100 proxy samples a round, int8 codec
both ways) with each loss. "own" is the mean over owners of the accuracy on their own domain;
"others (opt-out)" is how much opting owner 0 out costs on the other owners' domains; bytes are
real payload bytes, both directions summed.

Shakespeare task (`--task shakespeare`): 4 owners, one play each (the natural partition; 10 %
of each play held out as its domain's validation split), the char transformer (dim 64, 2
layers, windows of 32 characters), 30 AdamW steps (lr 0.003, batch 32) a round, the public
model pretrained 1 epoch on 10 % of every owner's windows; validation loss (nats per character)
overall and per owner's play; FedAvg against experts + router and the opt-out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch

from koinon.config import Config
from koinon.experts.domains import domain_test_sets
from koinon.local import LocalTraining, evaluate
from koinon.models import build_model
from koinon.params import Layout
from koinon.topology import TOPOLOGIES, Federation
from koinon.topology.experts import load_experts
from koinon.topology.experts.common import loss_for
from koinon.topology.experts.options import Shared, owners_data, pretrain

DIGITS_DOMAINS = ["none", "rot90", "invert", "permute"]


def digits_config(seed: int, rounds: int, topology: dict[str, Any], model: dict[str, Any] | None = None,
                  codec: str = "identity") -> Config:
    return Config.from_dict({
        "seed": seed,
        "data": {"name": "digits", "partition": "iid", "num_clients": 4},
        "model": model or {"name": "mlp", "hidden": [32]},
        "client": {"epochs": 1, "lr": 0.05, "momentum": 0.9},
        "server": {"rounds": rounds, "eval_every": rounds, "clients_per_round": 4},
        "codec": {"name": codec}, "downlink": {"name": codec},
        "topology": {"domains": DIGITS_DOMAINS, **topology},
    })


def shakespeare_config(seed: int, rounds: int, topology: dict[str, Any]) -> Config:
    return Config.from_dict({
        "seed": seed,
        "data": {"name": "shakespeare", "num_clients": 4, "partition": "natural", "plays": 4, "seq_len": 32,
                 "test_fraction": 0.1},
        "model": {"name": "char_transformer", "dim": 64, "layers": 2, "heads": 4},
        "client": {"steps": 30, "batch_size": 32, "lr": 0.003, "optimizer": "adamw"},
        "server": {"rounds": rounds, "eval_every": rounds, "clients_per_round": 4},
        "topology": {"pretrain_epochs": 1, "pretrain_lr": 0.05, **topology},
    })


def fedavg(cfg: Config, domains: list[str]) -> dict[str, Any]:
    """FedAvg from the same public seed model over the same private data."""
    start = time.perf_counter()
    data = owners_data(cfg, Shared(domains=domains))
    ds = data.dataset
    model = build_model(cfg.model.name, cfg.model.options, ds.input_shape, ds.num_classes, cfg.seed)
    shared = Shared()
    pretrain(model, ds, data.public, int(cfg.topology.options.get("pretrain_epochs", shared.pretrain_epochs)),
             float(cfg.topology.options.get("pretrain_lr", shared.pretrain_lr)), cfg.seed)
    c = cfg.client
    local = LocalTraining(epochs=c.epochs, steps=c.steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                          optimizer=c.optimizer)
    fed = Federation(model, data.private, local=local, clients_per_round=cfg.data.num_clients, seed=cfg.seed,
                     runtime="vectorized", codec=cfg.codec.name, downlink=cfg.downlink.name,
                     loss_fn=loss_for(ds))
    fed.fit(cfg.server.rounds, eval_every=cfg.server.rounds)
    layout = Layout.from_module(model)
    acc, loss = evaluate(model, layout, fed.params, ds.x_test, ds.y_test)
    per = [evaluate(model, layout, fed.params, x, y) for x, y in domain_test_sets(ds) or []]
    return {"acc": acc, "loss": loss, "domain_acc": [a for a, _ in per], "domain_loss": [v for _, v in per],
            "bytes": fed.uplink_total + fed.downlink_total, "wall": time.perf_counter() - start}


def topology_run(cfg: Config, out: str | None = None) -> dict[str, Any]:
    """A topology through the run loop (into `out` when given, to reload it for the opt-out)."""
    from koinon.experiment import run_experiment

    start = time.perf_counter()
    if out is not None:
        run_experiment(copy.deepcopy(cfg), out, overwrite=True, progress=False)
        loaded = load_experts(out)
        m = loaded.metrics()
        import json
        from pathlib import Path

        summary = json.loads((Path(out) / "summary.json").read_text())
        total = summary["uplink_bytes_total"] + summary["downlink_bytes_total"]
        return {"acc": m["accuracy"], "loss": m["loss"], "domain_acc": m["domain_accuracy"],
                "domain_loss": m["domain_loss"], "bytes": total, "wall": time.perf_counter() - start,
                "run": loaded}
    topo = TOPOLOGIES.get(cfg.topology.name)(cfg)
    results = topo.fit(cfg.server.rounds, eval_every=cfg.server.rounds)
    last = results[-1]
    return {"acc": last.test_accuracy, "loss": last.test_loss, "domain_acc": last.domain_accuracy or [],
            "domain_loss": last.domain_loss or [], "bytes": topo.uplink_total + topo.downlink_total,
            "wall": time.perf_counter() - start}


def opt_out(result: dict[str, Any], owner: int) -> dict[str, Any]:
    start = time.perf_counter()
    m = result["run"].metrics([owner])
    return {"acc": m["accuracy"], "loss": m["loss"], "domain_acc": m["domain_accuracy"],
            "domain_loss": m["domain_loss"], "bytes": 0, "wall": time.perf_counter() - start}


def sade(result: dict[str, Any]) -> dict[str, Any]:
    """The same experts weighted per test domain by SADE (labels unused) instead of the router."""
    start = time.perf_counter()
    m = result["run"].metrics(sade=True)
    return {"acc": m["accuracy"], "loss": m["loss"], "domain_acc": m["domain_accuracy"],
            "domain_loss": m["domain_loss"], "bytes": 0, "wall": time.perf_counter() - start}


def student(result: dict[str, Any]) -> dict[str, Any]:
    """One public-sized student per test domain distilled from the mixture (Meta-DMoE's step)."""
    start = time.perf_counter()
    m = result["run"].student_metrics()
    return {"acc": m["accuracy"], "loss": m["loss"], "domain_acc": m["domain_accuracy"],
            "domain_loss": m["domain_loss"], "bytes": 0, "wall": time.perf_counter() - start}


def digits_rows(seed: int, rounds: int, out: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    rows["FedAvg"] = fedavg(digits_config(seed, rounds, {"name": "federated"}), DIGITS_DOMAINS)
    rows["experts + domain router (FlexOlmo)"] = topology_run(
        digits_config(seed, rounds, {"name": "experts"}), f"{out}/flexolmo-{seed}")
    rows["  owner 0 opted out"] = opt_out(rows["experts + domain router (FlexOlmo)"], 0)
    rows["  SADE weights per test domain instead of the router"] = sade(rows["experts + domain router (FlexOlmo)"])
    rows["  one student per test domain, distilled from it (Meta-DMoE)"] = student(
        rows["experts + domain router (FlexOlmo)"])
    rows["experts + learned router (DDM)"] = topology_run(
        digits_config(seed, rounds, {"name": "experts", "router": "learned", "public_expert": False}))
    sizes = [{"hidden": [16]}, {"hidden": [32]}, {"hidden": [64]}, {"hidden": [128]}]
    rows["HDEE: widths 16-128 by difficulty"] = topology_run(
        digits_config(seed, rounds, {"name": "experts", "sizes": sizes}))
    rows["experts + latent interface (Mixture of Thoughts)"] = topology_run(
        digits_config(seed, rounds, {"name": "experts", "interface": "thoughts"}))
    rows["LoRA experts (rank 4) on the public model"] = topology_run(
        digits_config(seed, rounds, {"name": "experts", "expert": "lora", "lora_rank": 4}))
    for loss in ("kl", "bdkd", "taid", "knfu"):
        rows[f"distillation {loss} (int8 logits)"] = topology_run(digits_config(
            seed, rounds, {"name": "distillation", "loss": loss, "proxy_size": 100}, codec="int8"))
    return rows


def shakespeare_rows(seed: int, rounds: int, out: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    rows["FedAvg"] = fedavg(shakespeare_config(seed, rounds, {"name": "federated"}), [])
    rows["experts + domain router (FlexOlmo)"] = topology_run(
        shakespeare_config(seed, rounds, {"name": "experts"}), f"{out}/shakespeare-{seed}")
    rows["  owner 0 opted out"] = opt_out(rows["experts + domain router (FlexOlmo)"], 0)
    return rows


def _mean(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(per_seed: list[dict[str, dict[str, Any]]], metric: str) -> None:
    """Markdown table: overall, each owner's domain, opt-out cost on the others, bytes, wall time."""
    key, dkey = ("acc", "domain_acc") if metric == "accuracy" else ("loss", "domain_loss")
    print(f"| method | overall {metric} | per domain (owner 0 / 1 / 2 / 3) | cost to the others of opting "
          "owner 0 out | bytes | wall s |")
    print("|---|---|---|---|---|---|")
    for name in per_seed[0]:
        runs = [seed[name] for seed in per_seed]
        overall = _mean([r[key] for r in runs])
        per = " / ".join(f"{statistics.mean(r[dkey][d] for r in runs):.3f}" for d in range(len(runs[0][dkey])))
        cost = "-"
        if name.strip() == "owner 0 opted out":
            full = [seed["experts + domain router (FlexOlmo)"] for seed in per_seed]
            sign = 1 if metric == "accuracy" else -1
            cost = _mean([sign * statistics.mean(f[dkey][d] - r[dkey][d] for d in range(1, len(r[dkey])))
                          for f, r in zip(full, runs, strict=True)])
        mb = statistics.mean(r["bytes"] for r in runs) / 1e6
        wall = statistics.mean(r["wall"] for r in runs)
        print(f"| {name} | {overall} | {per or '-'} | {cost} | {mb:.3f} MB | {wall:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["digits", "shakespeare", "all"], default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=0, help="default: 20 (digits), 5 (shakespeare)")
    parser.add_argument("--quick", action="store_true", help="one seed, a few rounds")
    parser.add_argument("--out", default="/tmp/koinon-experts-bench")
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    torch.set_num_threads(1)
    if args.task in ("digits", "all"):
        rounds = args.rounds or (4 if args.quick else 30)
        print(f"## digits, 4 owners in 4 domains ({', '.join(DIGITS_DOMAINS)}), {rounds} rounds, {seeds} seed(s)\n")
        report([digits_rows(s, rounds, args.out) for s in range(seeds)], "accuracy")
    if args.task in ("shakespeare", "all"):
        rounds = args.rounds or (2 if args.quick else 5)
        print(f"\n## shakespeare, 4 owners (plays), char transformer, {rounds} rounds, {seeds} seed(s)\n")
        report([shakespeare_rows(s, rounds, args.out) for s in range(seeds)], "loss")


if __name__ == "__main__":
    main()
