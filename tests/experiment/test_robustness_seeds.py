"""Several seeds: records carry their seed, cells are averaged, verdicts judge the means."""

import argparse
import importlib.util
from pathlib import Path

import pytest

from koinon.experiment.robustness import default_config, markdown, mean_over_seeds, run_matrix

_spec = importlib.util.spec_from_file_location(
    "robustness_benchmark", Path(__file__).parents[2] / "benchmarks" / "robustness.py")
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _record(seed, aggregator, attack, fraction, accuracy, alpha=0.1):
    return {"alpha": alpha, "aggregator": aggregator, "attack": attack, "fraction": fraction,
            "seed": seed, "status": "ok", "accuracy": accuracy, "test_loss": 1.0 - accuracy}


def test_seeds_parse_and_refuse_bad_lists():
    assert bench.parse_seeds("0") == [0]
    assert bench.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,", "a", "0,1.5", "-1", "1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_seeds(bad)


def test_mean_over_seeds_and_the_verdicts_on_the_means():
    per_seed = []
    # Seed 0: rule "a" loses 4 points under ipm (a single-seed NOT met); seeds 1, 2: 1 point.
    for seed, ipm in ((0, 0.90), (1, 0.93), (2, 0.93)):
        per_seed += [_record(seed, "a", "none", 0.0, 0.94), _record(seed, "a", "ipm", 0.2, ipm),
                     _record(seed, "a", "alie", 0.2, 0.94)]
    per_seed.append({**_record(0, "b", "none", 0.0, 0.0), "status": "refused", "reason": "f too large"})
    per_seed += [_record(s, "b", "none", 0.0, 0.5) for s in (1, 2)]
    means = mean_over_seeds(per_seed)
    by_key = {(r["aggregator"], r["attack"]): r for r in means}
    ipm = by_key[("a", "ipm")]
    assert ipm["seeds"] == [0, 1, 2] and ipm["accuracy"] == pytest.approx(0.92)
    assert ipm["accuracy_std"] == pytest.approx((2 * 0.01**2 + 0.02**2) ** 0.5 / 3**0.5)
    assert by_key[("b", "none")]["status"] == "refused"  # refused on one seed: refused
    assert "| a | 94.0 ± 0.0 | 92.0 ± 1.4 | 94.0 ± 0.0 |" in markdown(means)

    report = bench.goal_report(means, per_seed)
    line = next(line for line in report.splitlines() if "one rule" in line)
    assert "a, worst 92.0 %, gap 2.0 pts: met" in line  # on the means
    assert "worst single seed 0: 90.0 %, gap 4.0 pts (NOT met)" in line
    assert "worst single seed" not in bench.goal_report(means)  # no per-seed records given


def test_each_seed_redraws_the_run_and_is_recorded(tmp_path):
    base = default_config().with_overrides({"data.num_clients": 12, "server.clients_per_round": 10})
    results = []
    for seed in (0, 1):
        results += run_matrix(base.with_overrides({"seed": seed}), ["mean"], ["sign_flip"], [0.0, 0.2],
                              [0.5], rounds=2, out_dir=tmp_path / f"seed{seed}", progress=False)
    assert [r["seed"] for r in results] == [0, 0, 1, 1]
    assert (tmp_path / "seed0" / "robustness.json").is_file()
    assert (tmp_path / "seed1" / "robustness.json").is_file()
    assert results[0]["accuracy"] != results[2]["accuracy"] or results[0]["test_loss"] != results[2]["test_loss"]
    assert len(mean_over_seeds(results)) == 2
