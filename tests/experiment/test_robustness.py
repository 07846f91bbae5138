"""The robustness matrix: one run per cell, f = 0 once per rule, refusals recorded, files written."""

import json

from koinon.cli import main
from koinon.experiment.robustness import default_config, markdown, run_matrix


def tiny_config():
    return default_config().with_overrides({
        "data.num_clients": 12, "server.clients_per_round": 10, "client.epochs": 1,
    })


def test_matrix_records_every_cell_and_refusals(tmp_path):
    results = run_matrix(tiny_config(), ["mean", "bulyan"], ["sign_flip", "ipm"], [0.0, 0.1, 0.4],
                         [0.5], rounds=2, out_dir=tmp_path, progress=False)
    # Per rule: one clean run plus 2 attacks x 2 non-zero fractions.
    assert len(results) == 2 * (1 + 2 * 2)
    assert [r["attack"] for r in results if r["fraction"] == 0] == ["none", "none"]
    by_key = {(r["aggregator"], r["attack"], r["fraction"]): r for r in results}
    refused = by_key[("bulyan", "sign_flip", 0.4)]  # f = 4 of n = 10: Bulyan needs n >= 4f + 3
    assert refused["status"] == "refused" and "n >= 4f + 3" in refused["reason"]
    ok = by_key[("bulyan", "sign_flip", 0.1)]  # f = 1: allowed
    assert ok["status"] == "ok" and 0.0 <= ok["accuracy"] <= 1.0
    assert all(r["status"] == "ok" for r in results if r["aggregator"] == "mean")

    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["results"] == results and saved["rounds"] == 2
    table = (tmp_path / "robustness.md").read_text()
    assert table == markdown(results)
    header = next(line for line in table.splitlines() if line.startswith("| aggregator"))
    assert header == "| aggregator | clean | sign_flip 10% | sign_flip 40% | ipm 10% | ipm 40% |"
    bulyan_row = next(line for line in table.splitlines() if line.startswith("| bulyan"))
    assert bulyan_row.count("refused") == 2
    assert "n >= 4f + 3" in table  # the reason is spelled out under the table
    assert (tmp_path / "robustness_alpha0.5.png").stat().st_size > 0


def test_main_runs_from_a_toml_and_rejects_unknown_names(tmp_path, capsys):
    config = tmp_path / "base.toml"
    config.write_text(tiny_config().to_toml())
    out = tmp_path / "out"
    assert main(["robustness", str(config), "--aggregators", "median", "--attacks", "label_flip",
                 "--fractions", "0,0.2", "--alphas", "1.0", "--rounds", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert "| median |" in capsys.readouterr().out
    assert len(json.loads((out / "robustness.json").read_text())["results"]) == 2
    assert main(["robustness", str(config), "--attacks", "no_such_attack", "--out", str(out)]) == 2
    assert "no_such_attack" in capsys.readouterr().err
