"""`koinon server` with a [ledger]: real processes on 127.0.0.1; the state folder's round log
verifies and holds the same rounds, receipts, aggregates, scores and payouts as `koinon run`'s."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from koinon.cli import main
from koinon.deploy.certs import create_certs
from koinon.experiment import load_config, run_experiment
from koinon.ledger.verify import verify_run

_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

pytestmark = pytest.mark.slow


def test_a_deployment_keeps_the_simulations_ledger(tmp_path, capsys):
    certs = tmp_path / "certs"
    create_certs(certs, 3, ["127.0.0.1", "localhost"])
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3},
                            ledger={"contribution": "gtg", "payout_cents": 900, "max_permutations": 20})
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    report = verify_run(state)
    assert report.ok, report.failure
    run_experiment(load_config(config), tmp_path / "sim", progress=False)

    def entries(folder):
        return [json.loads(x) for x in (folder / "ledger" / "log.jsonl").read_text().splitlines()]

    def unsigned(e):  # the server keys are random and only the simulation signs client receipts
        return {k: v for k, v in e.items()
                if k not in ("server_signature", "client_signature", "client_key", "client_keys", "server_key")}

    deployed, simulated = entries(state), entries(tmp_path / "sim")
    assert deployed[0]["server_key"] != simulated[0]["server_key"]
    assert deployed[0]["client_key"] == "server-attested" and "client_keys" not in deployed[0]
    assert all(e["client_key"] == "server-attested" and "client_signature" not in e
               for e in deployed if e["type"] == "receipt")
    # The open entries differ only in keys and the config's hash (the server writes its own TOML).
    assert {**unsigned(deployed[0]), "config_sha256": ""} == {**unsigned(simulated[0]), "config_sha256": ""}
    # Same updates byte for byte (payload digests in the receipts), same models, same scores and
    # payouts: every entry equal but for the signatures and keys.
    assert [unsigned(e) for e in deployed[1:]] == [unsigned(e) for e in simulated[1:]]
    assert main(["verify", str(state), "--server-key", deployed[0]["server_key"]]) == 0
    assert "server-attested only" in capsys.readouterr().out
    assert (state / "payouts.csv").read_text() == (tmp_path / "sim" / "payouts.csv").read_text()
