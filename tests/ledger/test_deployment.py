"""`koinon server` with a [ledger]: real processes on 127.0.0.1; the state folder's round log
verifies and holds the same rounds, receipts, aggregates, scores and payouts as `koinon run`'s."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from koinon.cli import main
from koinon.deploy.certs import create_certs
from koinon.experiment import load_config, run_experiment
from koinon.ledger import merkle
from koinon.ledger.roundlog import canonical, head_message, load_server_key
from koinon.ledger.verify import verify_run

_spec = importlib.util.spec_from_file_location("deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

pytestmark = pytest.mark.slow


def rewrite(folder, new_entries, key):
    """A dishonest server rewrites its log and signs fresh heads (it holds its key)."""
    data = [canonical(e) for e in new_entries]
    leaves = [merkle.leaf_hash(d) for d in data]
    heads = [canonical({"root": (root := merkle.root(leaves[: i + 1]).hex()),
                        "signature": key.sign(head_message(i + 1, root)).hex(), "size": i + 1})
             for i in range(len(data))]
    (folder / "ledger" / "log.jsonl").write_bytes(b"".join(d + b"\n" for d in data))
    (folder / "ledger" / "heads.jsonl").write_bytes(b"".join(h + b"\n" for h in heads))


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

    signed_fields = ("client_certificate", "client_certificate_sha256", "client_public_key", "signed_model_sha256",
                     "num_samples")

    def unsigned(e):  # keys are random; simulated clients sign with seed keys, deployed ones with certificates
        return {k: v for k, v in e.items()
                if k not in ("server_signature", "client_signature", "client_key", "client_keys", "server_key",
                             *signed_fields)}

    deployed, simulated = entries(state), entries(tmp_path / "sim")
    assert deployed[0]["server_key"] != simulated[0]["server_key"]
    assert deployed[0]["client_key"] == "certificate" and "client_keys" not in deployed[0]
    receipts = [e for e in deployed if e["type"] == "receipt"]
    assert len(receipts) == 9
    for e in receipts:  # signed by each client with its own certificate's key
        name = f"client-{e['client']}"  # the helpers start client-i with partition i
        cert = (certs / "clients" / f"{name}.crt").read_text()
        assert e["client_key"] == "certificate" and e["client_certificate"] == cert
        assert e["signed_model_sha256"] == e["model_sha256"]  # the lossless downlink's model
    assert len({e["client_public_key"] for e in receipts}) == 3
    # The open entries differ only in keys and the config's hash (the server writes its own TOML).
    assert {**unsigned(deployed[0]), "config_sha256": ""} == {**unsigned(simulated[0]), "config_sha256": ""}
    # Same updates byte for byte (payload digests in the receipts), same models, same scores and
    # payouts: every entry equal but for the signatures and keys.
    assert [unsigned(e) for e in deployed[1:]] == [unsigned(e) for e in simulated[1:]]
    assert main(["verify", str(state), "--server-key", deployed[0]["server_key"]]) == 0
    out = capsys.readouterr().out
    assert "signed by the clients with their TLS certificate keys" in out
    assert verify_run(state, ca=(certs / "ca.crt").read_bytes()).ok
    # Certificates from another CA are refused when the run's CA is given.
    other = tmp_path / "other"
    create_certs(other, 0, ["localhost"])
    bad = verify_run(state, ca=(other / "ca.crt").read_bytes())
    assert bad.failed_entry == 2 and "was not issued by the CA" in bad.failure, bad.failure
    assert main(["verify", str(state), "--ca", str(certs / "ca.crt")]) == 0
    assert main(["verify", str(state), "--ca", str(other / "ca.crt")]) == 1
    capsys.readouterr()
    # A client proves its receipt's inclusion.
    assert main(["verify", str(state), "--receipt", "2", "1"]) == 0
    assert '"client_key": "certificate"' in capsys.readouterr().out.replace('":"', '": "')
    assert (state / "payouts.csv").read_text() == (tmp_path / "sim" / "payouts.csv").read_text()
    # A server that forges a client's signature (and countersigns the forgery with its own key,
    # re-signing every head) is caught at that receipt.
    forged = tmp_path / "forged"
    shutil.copytree(state, forged)
    log = entries(forged)
    at = next(i for i, e in enumerate(log) if e["type"] == "receipt" and e["round"] == 2)
    sig = bytearray(bytes.fromhex(log[at]["client_signature"]))
    sig[-1] ^= 1
    log[at]["client_signature"] = sig.hex()
    key = load_server_key(forged / "ledger")
    body = {k: v for k, v in log[at].items() if k not in ("type", "seq", "server_signature")}
    log[at]["server_signature"] = key.sign(canonical(body)).hex()
    rewrite(forged, log, key)
    report = verify_run(forged)
    assert report.failed_entry == at, report.failure
    assert "client's signature does not verify with its certificate's public key" in report.failure


def test_a_deployment_killed_mid_round_continues_its_ledger(tmp_path, capsys):
    """Killed once after round 2 was logged but before it was committed (the crash point: as
    SIGKILL leaves it), and once with SIGKILL while a later round is open: each restart reopens
    the log, drops the uncommitted round's entries, redoes the round, and the finished log
    verifies and pays what the uninterrupted simulation pays, every entry logged once."""
    import signal

    certs = tmp_path / "certs"
    create_certs(certs, 3, ["127.0.0.1", "localhost"])
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 5, "clients_per_round": 3},
                            deploy={"min_connected": 3},
                            ledger={"contribution": "gtg", "payout_cents": 900, "max_permutations": 20})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state,
                                     env={"KOINON_CRASH_AT": "server.closed@2"})
    clients = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}", give_up=120)
               for i in range(3)]
    assert server.wait(120) == 86, server.text()[-3000:]
    logged = [json.loads(x) for x in (state / "ledger" / "log.jsonl").read_text().splitlines()]
    assert {"aggregate", "scores"} <= {e["type"] for e in logged if e.get("round") == 2}
    assert h.committed_rounds(state) == 1  # round 2 logged, not committed
    # A restart with more rounds is refused by the ledger (its log committed to the config) and
    # leaves the stored config as it was, so the next restart with the right one goes on.
    before = (state / "config.toml").read_bytes()
    more = h.write_config(tmp_path / "more.toml", server={"rounds": 6, "clients_per_round": 3},
                          deploy={"min_connected": 3},
                          ledger={"contribution": "gtg", "payout_cents": 900, "max_permutations": 20})
    assert main(["server", str(more), "--listen", "127.0.0.1:0", "--certs", str(certs),
                 "--state", str(state)]) != 0
    assert "continues only with the config it committed to" in capsys.readouterr().err
    assert (state / "config.toml").read_bytes() == before
    port = int(address.rsplit(":", 1)[1])
    server, _ = h.start_server(tmp_path, config, certs, state, "server-2", port=port)
    h.wait_for(lambda: h.committed_rounds(state) >= 3, 120, server, "three rounds")
    try:  # SIGKILL with an update of the open round accepted (or at worst at any moment)
        h.wait_for(lambda: any((state / "pending").glob("*.bin")), 10, server, "a pending update")
    except AssertionError:
        pass
    server.p.send_signal(signal.SIGKILL)
    server.p.wait(10)
    server, _ = h.start_server(tmp_path, config, certs, state, "server-3", port=port)
    assert server.wait(180) == 0, server.text()[-3000:]
    for c in clients:
        assert c.wait(60) == 0, c.text()[-3000:]
    assert "resuming" in server.text()
    report = verify_run(state, ca=(certs / "ca.crt").read_bytes())
    assert report.ok, report.failure
    run_experiment(load_config(config), tmp_path / "sim", progress=False)

    def entries(folder):
        return [json.loads(x) for x in (folder / "ledger" / "log.jsonl").read_text().splitlines()]

    deployed, simulated = entries(state), entries(tmp_path / "sim")
    assert [(e["type"], e.get("round"), e.get("client")) for e in deployed] == \
        [(e["type"], e.get("round"), e.get("client")) for e in simulated]  # nothing twice, nothing lost
    receipts = [e for e in deployed if e["type"] == "receipt"]
    assert len(receipts) == 15 and all(e["client_key"] == "certificate" and "client_signature" in e
                                       for e in receipts)
    for kind in ("aggregate", "scores", "payout"):
        assert [e for e in deployed if e["type"] == kind] == [e for e in simulated if e["type"] == kind]
    assert (state / "payouts.csv").read_text() == (tmp_path / "sim" / "payouts.csv").read_text()
    assert main(["verify", str(state), "--server-key", deployed[0]["server_key"]]) == 0
