"""Matrix rows with aggregator options (`fltrust:root_steps=20`): parsed, applied, labelled."""

import pytest

from koinon.errors import ConfigError
from koinon.experiment.robustness import default_config, parse_row, run_matrix


def test_parse_row_reads_toml_values_and_refuses_malformed_settings():
    assert parse_row("mean") == ("mean", {})
    assert parse_row("nnm+fltrust:root_steps=20:root_samples=50") == (
        "nnm+fltrust", {"root_steps": 20, "root_samples": 50})
    for bad in ("fltrust:root_steps", "fltrust:=3", "fltrust:a.b=3"):
        with pytest.raises(ConfigError, match="expected name:key=value"):
            parse_row(bad)


def test_rows_with_options_run_and_keep_their_label(tmp_path):
    base = default_config().with_overrides({"data.num_clients": 12, "server.clients_per_round": 10})
    rows = ["fltrust", "fltrust:root_steps=3:root_samples=40", "mean:root_steps=3"]
    results = run_matrix(base, rows, ["sign_flip"], [0.0, 0.2], [0.5], rounds=2, out_dir=tmp_path,
                         progress=False)
    by_key = {(r["aggregator"], r["attack"]): r for r in results}
    assert by_key[("fltrust:root_steps=3:root_samples=40", "sign_flip")]["status"] == "ok"
    refused = by_key[("mean:root_steps=3", "none")]
    assert refused["status"] == "refused" and "only fltrust" in refused["reason"]
    assert "| fltrust:root_steps=3:root_samples=40 |" in (tmp_path / "robustness.md").read_text()
