"""Several seeds: records carry their seed, cells are averaged, verdicts judge the means."""

import pytest

from koinon.errors import ConfigError, KoinonError
from koinon.experiment.robustness import (
    default_config,
    goal_report,
    markdown,
    mean_over_seeds,
    parse_seeds,
    run_seeds,
)


def _record(seed, aggregator, attack, fraction, accuracy, alpha=0.1):
    return {"alpha": alpha, "aggregator": aggregator, "attack": attack, "fraction": fraction,
            "seed": seed, "status": "ok", "accuracy": accuracy, "test_loss": 1.0 - accuracy}


def test_seeds_parse_and_refuse_bad_lists():
    assert parse_seeds("0") == [0]
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,", "a", "0,1.5", "-1", "1,1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


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

    report = goal_report(means, per_seed)
    line = next(line for line in report.splitlines() if "one rule" in line)
    assert "a, worst 92.0 %, gap 2.0 pts: met" in line  # on the means
    assert "worst single seed 0: 90.0 %, gap 4.0 pts (NOT met)" in line
    assert "worst single seed" not in goal_report(means)  # no per-seed records given


def test_each_seed_redraws_the_run_into_its_own_folder_and_the_means_are_reported(tmp_path):
    base = default_config().with_overrides({"data.num_clients": 12, "server.clients_per_round": 10})
    per_seed, results = run_seeds(base, [0, 1], ["mean"], ["sign_flip"], [0.0, 0.2], [0.5],
                                  rounds=2, out_dir=tmp_path, progress=False)
    assert [r["seed"] for r in per_seed] == [0, 0, 1, 1]
    assert (tmp_path / "seed0" / "robustness.json").is_file()
    assert (tmp_path / "seed1" / "robustness.json").is_file()
    assert per_seed[0]["accuracy"] != per_seed[2]["accuracy"] or per_seed[0]["test_loss"] != per_seed[2]["test_loss"]
    assert results == mean_over_seeds(per_seed) and [r["seeds"] for r in results] == [[0, 1], [0, 1]]
    assert (tmp_path / "robustness_mean.md").read_text().startswith(markdown(results))


def test_one_seed_runs_into_the_folder_itself(tmp_path):
    base = default_config().with_overrides({"data.num_clients": 12, "server.clients_per_round": 10})
    per_seed, results = run_seeds(base, [3], ["mean"], ["sign_flip"], [0.0], [0.5], rounds=1,
                                  out_dir=tmp_path, progress=False)
    assert per_seed == results and results[0]["seed"] == 3
    assert (tmp_path / "robustness.json").is_file() and not (tmp_path / "robustness_mean.md").exists()


def test_a_matrix_that_cannot_run_is_refused_before_any_cell(tmp_path):
    base = default_config()
    for args, needle in [((["mean"], ["nope"], [0.0], [0.5], 1), "nope"),
                         ((["nope"], ["alie"], [0.0], [0.5], 1), "nope"),
                         ((["mean"], ["alie"], [1.0], [0.5], 1), "fractions"),
                         ((["mean"], ["alie"], [0.0], [0.5], 0), "--rounds")]:
        with pytest.raises(ConfigError if needle == "nope" else KoinonError, match=needle):
            run_seeds(base, [0], *args, out_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
