"""The robustness matrix: aggregator x attack x Byzantine fraction x Dirichlet alpha -> accuracy.

Every cell is a full federation built from one base config by `build_federation`, trained for
the same number of rounds and evaluated once at the end. With no attackers the attack is
irrelevant, so f = 0 runs once per aggregator and alpha (the "clean" column). A rule whose
assumption a cell breaks (f too large for its n) refuses it with a `ValueError` or
`ConfigError`; the cell is recorded as "refused" with that reason and the matrix goes on.
A row may carry aggregator options after colons, `fltrust:root_steps=20` (TOML values), so
one matrix can compare settings of the same rule.

Outputs in `out_dir`: `robustness.json` (every cell, rewritten as cells finish, so an
interrupted matrix keeps what it measured), `robustness.md` (one accuracy table per alpha) and
`robustness_alpha<alpha>.png` (a heat map per alpha). Each record carries the base config's
`seed`, which draws the partition, the attackers, the client sample and the model's
initialisation; `run_seeds` runs the matrix once per seed (in different folders) and
`mean_over_seeds` averages their records into one per cell. `goal_report` judges a matrix
against accuracy goals (`GOALS`: how many points the best rule may lose to attackers).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from koinon.config import Config, parse_override
from koinon.errors import ConfigError, KoinonError
from koinon.files import atomic_write_text

CLEAN = "none"


def default_config() -> Config:
    """Digits, 50 clients with a Dirichlet label skew, 20 a round, 200 rounds of 5 local steps.

    Short local work (5 plain SGD steps at lr 0.1, no local momentum) over many rounds, rather
    than 2 epochs with momentum 0.9 over 30 rounds: a robust rule discards or mixes part of
    every round's signal, so it needs rounds to converge, and small local steps keep the honest
    updates close to each other under label skew (less client drift), which is what distance-
    and rank-based rules rely on. The MLP reaches about 95 % attack-free at alpha 0.5, about
    8 s a run on one core (vectorized runtime).
    """
    return Config().with_overrides({
        "data.name": "digits", "data.partition": "dirichlet", "data.num_clients": 50,
        "server.clients_per_round": 20, "server.rounds": 200, "client.epochs": 1,
        "client.steps": 5, "client.lr": 0.1, "client.momentum": 0.0,
        "runtime.name": "vectorized",
    })


def _cells(aggregators: list[str], attacks: list[str], fractions: list[float],
           alphas: list[float]) -> list[tuple[float, str, str, float]]:
    out = []
    for alpha in alphas:
        for aggregator in aggregators:
            if 0 in fractions:
                out.append((alpha, aggregator, CLEAN, 0.0))
            out += [(alpha, aggregator, attack, f) for attack in attacks for f in fractions if f > 0]
    return out


def parse_row(row: str) -> tuple[str, dict[str, Any]]:
    """`"nnm+fltrust:root_steps=20:root_samples=200"` -> the rule's name and its options."""
    name, *settings = row.split(":")
    options: dict[str, Any] = {}
    for text in settings:
        key, value = parse_override(text) if text.partition("=")[0].strip() and "=" in text else ("", None)
        if not key.isidentifier():
            raise ConfigError(f"aggregator row {row!r}: {text!r} is not key=value; "
                              "expected name:key=value[:key=value...]")
        options[key] = value
    return name.strip(), options


def run_cell(base_config: Config, aggregator: str, attack: str, fraction: float, alpha: float,
             rounds: int) -> dict[str, Any]:
    """Train one federation; a refused configuration becomes a record, not an exception."""
    from koinon.experiment.runner import build_federation

    record: dict[str, Any] = {"alpha": alpha, "aggregator": aggregator, "attack": attack,
                              "fraction": fraction, "seed": base_config.seed}
    start = time.perf_counter()
    try:
        name, options = parse_row(aggregator)
        cfg = base_config.with_overrides({
            "aggregator.name": name, **{f"aggregator.{k}": v for k, v in options.items()},
            "attack.name": attack, "attack.fraction": fraction, "data.alpha": alpha,
            "server.rounds": rounds,
        })
        fed = build_federation(cfg)
        try:
            last = fed.fit(rounds, eval_every=rounds)[-1]
        finally:
            fed.close()
    except (KoinonError, ValueError) as exc:  # the rule's assumption (f vs n) or its options
        record.update(status="refused", reason=str(exc).splitlines()[0])
    else:
        record.update(status="ok", accuracy=last.test_accuracy, test_loss=last.test_loss, **last.extra)
    record["wall_s"] = round(time.perf_counter() - start, 3)
    return record


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_matrix(base_config: Config, aggregators: list[str], attacks: list[str],
               fractions: list[float], alphas: list[float], rounds: int, out_dir: Path,
               *, progress: bool = True, jobs: int = 1) -> list[dict[str, Any]]:
    """Run every cell, write the JSON, the markdown tables and a heat map per alpha.

    `jobs > 1` runs cells in that many worker processes (one torch thread each): cells are
    independent and seeded, so the numbers do not depend on `jobs`; results keep cell order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = _cells(aggregators, attacks, fractions, alphas)
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = stack.enter_context(ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread))
            records = pool.map(run_cell, *zip(*[(base_config, g, a, f, al, rounds)
                                                for al, g, a, f in cells], strict=True))
        else:
            records = (run_cell(base_config, g, a, f, al, rounds) for al, g, a, f in cells)
        _collect(records, cells, results, out_dir, base_config, rounds, progress)
    atomic_write_text(out_dir / "robustness.md", markdown(results))
    for alpha in alphas:
        plot_heatmap([r for r in results if r["alpha"] == alpha], out_dir / f"robustness_alpha{alpha}.png",
                     f"final accuracy, Dirichlet alpha = {alpha}, {rounds} rounds")
    return results


def _collect(records: Iterable[dict[str, Any]], cells: list[tuple[float, str, str, float]],
             results: list[dict[str, Any]], out_dir: Path, base_config: Config, rounds: int,
             progress: bool) -> None:
    for i, record in enumerate(records, start=1):
        alpha, aggregator, attack, fraction = cells[i - 1]
        results.append(record)
        if progress:
            shown = f"{record['accuracy']:.4f}" if record["status"] == "ok" else "refused"
            print(f"[{i}/{len(cells)}] alpha={alpha} {aggregator} {attack} f={fraction}: {shown} "
                  f"({record['wall_s']:.1f} s)", file=sys.stderr, flush=True)
        _write_json(out_dir, base_config, rounds, results)


def _write_json(out_dir: Path, cfg: Config, rounds: int, results: list[dict[str, Any]]) -> None:
    payload = {"base_config": cfg.to_dict(), "rounds": rounds, "results": results}
    atomic_write_text(out_dir / "robustness.json", json.dumps(payload, indent=1))


def mean_over_seeds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (alpha, aggregator, attack, fraction), averaged over the seeds it ran with.

    `accuracy` and `test_loss` become the means, `accuracy_std` the population standard
    deviation over seeds and `seeds` the seeds averaged; a cell refused on any seed stays
    refused (with the first reason). Cells keep their first-seen order.
    """
    import statistics

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["alpha"], r["aggregator"], r["attack"], r["fraction"]), []).append(r)
    out = []
    for (alpha, aggregator, attack, fraction), rows in groups.items():
        record: dict[str, Any] = {"alpha": alpha, "aggregator": aggregator, "attack": attack,
                                  "fraction": fraction, "seeds": [r.get("seed") for r in rows]}
        refused = [r for r in rows if r["status"] != "ok"]
        if refused:
            record.update(status="refused", reason=refused[0]["reason"])
        else:
            accuracies = [r["accuracy"] for r in rows]
            record.update(status="ok", accuracy=statistics.fmean(accuracies),
                          accuracy_std=statistics.pstdev(accuracies),
                          test_loss=statistics.fmean(r["test_loss"] for r in rows))
        out.append(record)
    return out


def _columns(results: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The clean column first, then each attack (in run order) by increasing fraction."""
    attacks = list(dict.fromkeys(r["attack"] for r in results))
    columns = {(r["attack"], r["fraction"]) for r in results}
    return sorted(columns, key=lambda c: (c[0] != CLEAN, attacks.index(c[0]), c[1]))


def _label(column: tuple[str, float]) -> str:
    attack, fraction = column
    return "clean" if attack == CLEAN else f"{attack} {fraction:.0%}"


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per alpha: rows aggregator, columns attack x fraction, cells final accuracy (%).

    Records from `mean_over_seeds` that averaged several seeds show "mean ± std".
    """
    lines: list[str] = []
    for alpha in dict.fromkeys(r["alpha"] for r in results):
        rows = [r for r in results if r["alpha"] == alpha]
        columns = _columns(rows)
        by_key = {(r["aggregator"], r["attack"], r["fraction"]): r for r in rows}
        lines += [f"### Dirichlet alpha = {alpha}", "",
                  "| aggregator | " + " | ".join(_label(c) for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        refusals: dict[str, list[str]] = {}
        for aggregator in dict.fromkeys(r["aggregator"] for r in rows):
            cells = []
            for column in columns:
                r = by_key.get((aggregator, *column))
                if r is None:
                    cells.append("")
                elif r["status"] == "ok" and len(r.get("seeds", ())) > 1:  # mean_over_seeds
                    cells.append(f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}")
                elif r["status"] == "ok":
                    cells.append(f"{100 * r['accuracy']:.1f}")
                else:
                    cells.append("refused")
                    refusals.setdefault(r["reason"], []).append(f"{aggregator} at {_label(column)}")
            lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
        lines.append("")
        for reason, where in refusals.items():
            lines.append(f"- refused ({', '.join(where)}): {reason}")
        if refusals:
            lines.append("")
    return "\n".join(lines)


def plot_heatmap(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Aggregators down, attack x fraction across; refused cells are grey and marked R."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = _columns(results)
    aggregators = list(dict.fromkeys(r["aggregator"] for r in results))
    grid = np.full((len(aggregators), len(columns)), np.nan)
    refused = np.zeros_like(grid, dtype=bool)
    for r in results:
        i, j = aggregators.index(r["aggregator"]), columns.index((r["attack"], r["fraction"]))
        if r["status"] == "ok":
            grid[i, j] = 100 * r["accuracy"]
        else:
            refused[i, j] = True
    label_width = 0.07 * max(len(a) for a in aggregators)  # rows like fltrust:root_steps=20
    fig, ax = plt.subplots(figsize=(1.0 + label_width + 0.62 * len(columns), 1.4 + 0.45 * len(aggregators)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for i in range(len(aggregators)):
        for j in range(len(columns)):
            text = "R" if refused[i, j] else ("" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}")
            dark = not np.isnan(grid[i, j]) and grid[i, j] < 60
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), [_label(c) for c in columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(aggregators)), aggregators, fontsize=8)
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def parse_names(text: str) -> list[str]:
    """`"mean, krum"` -> ["mean", "krum"] (empty items dropped)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_numbers(text: str) -> list[float]:
    """`"0,0.1,0.2"` -> [0.0, 0.1, 0.2] (empty items dropped)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> [0, 1, 2]; empty, non-integer, negative or repeated seeds are refused."""
    try:
        seeds = [int(v.strip()) for v in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"expected comma-separated non-negative integers, e.g. 0,1,2; got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def check_matrix(aggregators: list[str], attacks: list[str], fractions: list[float],
                 alphas: list[float], rounds: int) -> None:
    """One-line KoinonError for a matrix that cannot run, before any cell trains."""
    if rounds < 1:
        raise KoinonError(f"--rounds {rounds}: must be >= 1")
    bad = [f for f in fractions if not 0 <= f < 1] + [a for a in alphas if a <= 0]
    if bad:
        raise KoinonError(f"fractions must be in [0, 1) and alphas > 0, got {bad}")
    from koinon.aggregate import AGGREGATORS
    from koinon.attacks import ATTACKS

    for name in attacks:
        ATTACKS.get(name, key="--attacks")
    for row in aggregators:
        name, _ = parse_row(row)
        if "+" not in name:  # compositions are checked by the federation that builds them
            AGGREGATORS.get(name, key="--aggregators")


def run_seeds(base_config: Config, seeds: list[int], aggregators: list[str], attacks: list[str],
              fractions: list[float], alphas: list[float], rounds: int, out_dir: Path,
              *, progress: bool = True, jobs: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The matrix once per seed: (every seed's records, the records to report).

    One seed runs into `out_dir` and reports its own records; several run into
    `out_dir/seed<k>/` and report `mean_over_seeds`, whose tables and verdicts are also written
    to `out_dir/robustness_mean.md`.
    """
    check_matrix(aggregators, attacks, fractions, alphas, rounds)
    out_dir = Path(out_dir)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        per_seed += run_matrix(base_config.with_overrides({"seed": seed}), aggregators, attacks,
                               fractions, alphas, rounds,
                               out_dir if len(seeds) == 1 else out_dir / f"seed{seed}",
                               progress=progress, jobs=jobs)
    if len(seeds) == 1:
        return per_seed, per_seed
    results = mean_over_seeds(per_seed)
    atomic_write_text(out_dir / "robustness_mean.md",
                      markdown(results) + "\n" + goal_report(results, per_seed) + "\n")
    return per_seed, results


GOALS = {0.2: 3.0, 0.4: 10.0}
"""Byzantine fraction -> accuracy points the best configuration may lose against the best
attack-free run (the strict reading: the reference is the best clean accuracy of any row)."""


def _one_rule(rows: list[dict[str, Any]], fraction: float) -> tuple[str, float] | None:
    """The rule with the best worst case over the attacks at `fraction`, and that worst case."""
    cells = [r for r in rows if r["fraction"] == fraction]
    by_rule: dict[str, list[float]] = {}
    for r in cells:
        by_rule.setdefault(r["aggregator"], []).append(r["accuracy"])
    complete = {k: min(v) for k, v in by_rule.items() if len(v) == len({r["attack"] for r in cells})}
    if not complete:
        return None
    rule = max(complete, key=complete.__getitem__)
    return rule, complete[rule]


def _reference(rows: list[dict[str, Any]]) -> tuple[str, float] | None:
    clean = {r["aggregator"]: r["accuracy"] for r in rows if r["attack"] == CLEAN}
    if not clean:
        return None
    best = max(clean, key=clean.__getitem__)
    return best, 100 * clean[best]


def _worst_seed(per_seed: list[dict[str, Any]], alpha: float, rule: str,
                fraction: float) -> tuple[Any, float, float] | None:
    """The seed on which `rule` does worst at `fraction` (its worst attack against that seed's
    own attack-free reference): (seed, gap in points, accuracy in %); None for one seed."""
    seeds = sorted({r["seed"] for r in per_seed if r["alpha"] == alpha}, key=str)
    if len(seeds) < 2:
        return None
    gaps = {}
    for seed in seeds:
        mine = [r for r in per_seed if r["alpha"] == alpha and r["seed"] == seed and r["status"] == "ok"]
        ref = _reference(mine)
        attacked = [r["accuracy"] for r in mine if r["aggregator"] == rule and r["fraction"] == fraction]
        if ref is not None and attacked:
            gaps[seed] = (ref[1] - 100 * min(attacked), 100 * min(attacked))
    if not gaps:
        return None
    seed = max(gaps, key=lambda s: gaps[s][0])
    return seed, *gaps[seed]


def goal_report(results: list[dict[str, Any]], per_seed: list[dict[str, Any]] | None = None,
                goals: dict[float, float] | None = None) -> str:
    """Verdicts on `results` (one seed, or `mean_over_seeds` records) against `goals` (default
    `GOALS`): per alpha and goal fraction, the best rule under each attack, and the one rule with
    the best worst case over all attacks. With `per_seed` (the raw records of several seeds),
    that line also gives the rule's worst single seed."""
    lines = []
    for alpha in dict.fromkeys(r["alpha"] for r in results):
        rows = [r for r in results if r["alpha"] == alpha and r["status"] == "ok"]
        found = _reference(rows)
        if found is None:
            continue
        best_clean, reference = found
        lines.append(f"alpha = {alpha}: attack-free reference {reference:.1f} % ({best_clean})")
        clean = {r["aggregator"]: r["accuracy"] for r in rows if r["attack"] == CLEAN}
        for fraction, allowed in (goals or GOALS).items():
            cells = [r for r in rows if r["fraction"] == fraction]
            if not cells:
                continue
            for attack in dict.fromkeys(r["attack"] for r in cells):
                best = max((r for r in cells if r["attack"] == attack), key=lambda r: r["accuracy"])
                gap = reference - 100 * best["accuracy"]
                verdict = "met" if gap <= allowed else "NOT met"
                own = clean.get(best["aggregator"])
                own_gap = f", {100 * own - 100 * best['accuracy']:4.1f} below its own clean" if own else ""
                lines.append(f"  f = {fraction:.0%} {attack:10s} best {best['aggregator']:22s} "
                             f"{100 * best['accuracy']:5.1f} %  gap {gap:5.1f} pts{own_gap} "
                             f"(goal <= {allowed:g}): {verdict}")
            # One configuration must face every attack: the rule with the best worst case.
            one = _one_rule(rows, fraction)
            if one is None:
                continue
            rule, worst = one
            gap = reference - 100 * worst
            verdict = "met" if gap <= allowed else "NOT met"
            line = (f"  f = {fraction:.0%} one rule for all attacks: {rule}, worst "
                    f"{100 * worst:.1f} %, gap {gap:.1f} pts: {verdict}")
            worst_seed = _worst_seed(per_seed or [], alpha, rule, fraction)
            if worst_seed is not None:
                seed, seed_gap, seed_worst = worst_seed
                line += (f"; worst single seed {seed}: {seed_worst:.1f} %, gap {seed_gap:.1f} pts "
                         f"({'met' if seed_gap <= allowed else 'NOT met'})")
            lines.append(line)
    return "\n".join(lines)
