"""Population-based training of federations (Jaderberg et al. 2017, arXiv:1711.09846).

A population of federations built from one config trains side by side (worker processes; in
this process with `workers = 0`), each with its own hyper-parameters: client learning rate,
local steps and server learning rate. Every `interval` rounds the members are ranked by their
accuracy on a validation half of the test split (seeded; `accuracy`), and the other half
reports an unbiased test accuracy (`test_accuracy`: no selection ever saw it); by truncation selection the bottom `fraction` copies the whole state (model, server
optimizer, clients' states) and hyper-parameters of a member drawn from the top `fraction`
(exploit), then multiplies each copied hyper-parameter by a factor drawn from `factors`
(explore; local steps are rounded and kept >= 1). Every generation's members, scores and copies
go to `lineage.json`, and `lineage.png` draws them.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from koinon.config import Config
from koinon.errors import ConfigError

__all__ = ["HYPERS", "Member", "exploit_explore", "population_based_training"]

HYPERS = ("client.lr", "client.steps", "server.lr")


@dataclass
class Member:
    """One federation of the population: its hyper-parameters and its whole training state."""

    index: int
    hypers: dict[str, float]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    accuracy: float = 0.0  # on the validation half: what selection ranks
    test_accuracy: float = 0.0  # on the other half: what a report may quote


def exploit_explore(members: list[Member], rng: np.random.Generator, fraction: float = 0.25,
                    factors: tuple[float, ...] = (0.8, 1.2)) -> dict[int, int]:
    """Truncation selection in place: each member of the bottom `fraction` (by accuracy) takes
    the state and hyper-parameters of a random member of the top `fraction`, then perturbs
    each hyper-parameter by a factor from `factors`. Returns {copier: copied}."""
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"pbt fraction must be in (0, 0.5], got {fraction}")
    ranked = sorted(members, key=lambda m: (-m.accuracy, m.index))
    cut = max(1, int(round(fraction * len(members))))
    top, bottom = ranked[:cut], ranked[-cut:]
    copies = {}
    for loser in bottom:
        winner = top[int(rng.integers(len(top)))]
        loser.state = {k: v.clone() for k, v in winner.state.items()}
        hypers = {}
        for key, value in winner.hypers.items():
            new = value * float(rng.choice(factors))
            hypers[key] = max(1, int(round(new))) if key == "client.steps" else new
        loser.hypers = hypers
        copies[loser.index] = winner.index
    return copies


def _train(cfg_dict: dict[str, Any], hypers: dict[str, float], state: dict[str, torch.Tensor],
           rounds: int) -> tuple[dict[str, torch.Tensor], float, float]:
    """`rounds` more rounds of one member (in a worker process); returns its state and its
    validation and test accuracy (the two seeded halves of the test split)."""
    from koinon.experiment.runner import build_federation

    torch.set_num_threads(1)
    cfg = Config.from_dict(cfg_dict).with_overrides(dict(hypers))
    fed = build_federation(cfg)
    try:
        if state:
            fed.load_state_dict(state)  # the round counter too: rounds continue where it stood
        fed.fit(rounds, eval_every=rounds)
        return (fed.state_dict(), *_halves(fed, cfg.seed))
    finally:
        fed.close()


def _halves(fed: Any, seed: int) -> tuple[float, float]:
    """(validation, test) accuracy of `fed`'s model on two seeded halves of its test split."""
    from koinon.local import evaluate

    ds = fed.data.dataset
    order = torch.from_numpy(np.random.default_rng([seed, 0x9B7, 1]).permutation(len(ds.y_test)))
    half = len(order) // 2
    out = []
    for part in (order[:half], order[half:]):
        accuracy, _ = evaluate(fed.model, fed.layout, fed.params, ds.x_test[part], ds.y_test[part], fed.loss_fn)
        out.append(float(accuracy))
    return out[0], out[1]


def population_based_training(cfg: Config, *, population: int = 4, generations: int = 4, interval: int = 5,
                              workers: int = 2, fraction: float = 0.25, factors: tuple[float, ...] = (0.8, 1.2),
                              out: str | Path | None = None) -> list[dict[str, Any]]:
    """Run PBT over federations built from `cfg` (see the module docstring); returns the lineage
    (one record per member and generation) and, with `out`, writes lineage.json and lineage.png."""
    if population < 2 or generations < 1 or interval < 1 or workers < 0:
        raise ConfigError("pbt needs population >= 2, generations >= 1, interval >= 1, workers >= 0")
    if cfg.topology.name != "federated":
        raise ConfigError("pbt runs federations: topology.name must be 'federated'")
    rng = np.random.default_rng([cfg.seed, 0x9B7])
    base = {"client.lr": cfg.client.lr, "client.steps": cfg.client.steps or 10,
            "server.lr": cfg.server.lr or 1.0}
    members = []
    for i in range(population):  # members start spread around the config's values
        hypers = {k: v * float(rng.choice(factors)) if i else v for k, v in base.items()}
        hypers["client.steps"] = max(1, int(round(hypers["client.steps"])))
        members.append(Member(i, hypers))
    cfg_dict = cfg.to_dict()
    lineage: list[dict[str, Any]] = []
    pool = ProcessPoolExecutor(workers) if workers > 0 else None
    try:
        for gen in range(generations):
            jobs = [(cfg_dict, m.hypers, m.state, interval) for m in members]
            results = list(pool.map(_train, *zip(*jobs))) if pool else [_train(*j) for j in jobs]
            for m, (state, accuracy, test_accuracy) in zip(members, results):
                m.state, m.accuracy, m.test_accuracy = state, accuracy, test_accuracy
            snapshot = {m.index: dict(m.hypers) for m in members}
            copies = exploit_explore(members, rng, fraction, factors) if gen < generations - 1 else {}
            for m in members:
                lineage.append({"generation": gen, "member": m.index, "round": (gen + 1) * interval,
                                "hypers": snapshot[m.index], "accuracy": m.accuracy,
                                "test_accuracy": m.test_accuracy,
                                "copied_from": copies.get(m.index)})
    finally:
        if pool is not None:
            pool.shutdown()
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "lineage.json").write_text(json.dumps(lineage, indent=1))
        plot_lineage(lineage, folder / "lineage.png")
    return lineage


def plot_lineage(lineage: list[dict[str, Any]], path: Path) -> None:
    """Accuracy of every member by generation; a dashed line where a member copied another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    by_member: dict[int, list[dict[str, Any]]] = {}
    for rec in lineage:
        by_member.setdefault(rec["member"], []).append(rec)
    at = {(r["generation"], r["member"]): r for r in lineage}
    for member, recs in sorted(by_member.items()):
        ax.plot([r["round"] for r in recs], [r["accuracy"] for r in recs], marker="o", label=f"member {member}")
    for r in lineage:
        if r["copied_from"] is not None:
            src = at[(r["generation"], r["copied_from"])]
            nxt = at.get((r["generation"] + 1, r["member"]))
            if nxt is not None:
                ax.plot([src["round"], nxt["round"]], [src["accuracy"], nxt["accuracy"]], "k--", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy (selection)")
    ax.set_title("population-based training: members and copies (dashed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
