"""A run with a [ledger]: it verifies; any changed byte, reordered entry, forged signature or
rewritten score fails `koinon verify` at that entry; receipts prove inclusion and prefixes."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from koinon.cli import main
from koinon.config import Config
from koinon.errors import ConfigError, KoinonError
from koinon.experiment import run_experiment
from koinon.ledger import merkle
from koinon.ledger.roundlog import (
    TreeHead,
    canonical,
    head_message,
    load_server_key,
    public_hex,
    read_log,
    simulated_key,
    verify_prefix,
    verify_receipt,
)
from koinon.ledger.verify import verify_run

BASE = {
    "seed": 0,
    "data": {"name": "digits", "partition": "iid", "num_clients": 8},
    "model": {"name": "mlp", "hidden": [16]},
    "client": {"epochs": 1, "batch_size": 32, "lr": 0.1},
    "server": {"rounds": 3, "clients_per_round": 6},
}
LEDGER = {"contribution": "gtg", "payout_cents": 10_000, "max_permutations": 20}


def config(**ledger) -> Config:
    return Config.from_dict({**BASE, "ledger": {**LEDGER, **ledger}})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger") / "run"
    run_experiment(config(), out, progress=False)
    return out


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def lines(folder):
    return (folder / "ledger" / "log.jsonl").read_bytes().split(b"\n")[:-1]


def entries(folder):
    return [json.loads(x) for x in lines(folder)]


def rewrite(folder, new_entries, key=None):
    """A dishonest server rewrites its whole log and signs fresh heads (it holds its key)."""
    key = key or load_server_key(folder / "ledger")
    data = [canonical(e) for e in new_entries]
    leaves = [merkle.leaf_hash(d) for d in data]
    heads = []
    for i in range(len(data)):
        root = merkle.root(leaves[: i + 1]).hex()
        sig = key.sign(head_message(i + 1, root)).hex()
        heads.append(canonical({"root": root, "signature": sig, "size": i + 1}))
    (folder / "ledger" / "log.jsonl").write_bytes(b"".join(d + b"\n" for d in data))
    (folder / "ledger" / "heads.jsonl").write_bytes(b"".join(h + b"\n" for h in heads))


def first_of(folder, kind):
    return next(i for i, e in enumerate(entries(folder)) if e["type"] == kind)


def test_the_run_verifies_and_pays_out_the_whole_budget(run, capsys):
    report = verify_run(run)
    assert report.ok, report.failure
    assert report.verified == report.entries == len(lines(run))
    kinds = [e["type"] for e in entries(run)]
    assert kinds[0] == "open" and kinds[-1] == "payout"
    assert kinds.count("round") == kinds.count("aggregate") == kinds.count("scores") == 3
    assert kinds.count("receipt") == 18
    payout = entries(run)[-1]
    assert sum(payout["paid"].values()) + payout["refund"] == 10_000
    rows = (run / "payouts.csv").read_text().splitlines()
    assert rows[0] == "client,score,paid_cents,reason_unpaid" and len(rows) == 9
    assert (run / "payouts.png").stat().st_size > 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("ledger_s" in m and any(k.startswith("score_") for k in m) for m in metrics)
    assert main(["verify", str(run)]) == 0
    assert "verified: all" in capsys.readouterr().out


def test_the_ledger_does_not_change_the_model(run, tmp_path):
    plain = tmp_path / "plain"
    run_experiment(Config.from_dict(BASE), plain, progress=False)
    assert "ledger" not in (plain / "config.toml").read_text()
    model = json.loads((plain / "summary.json").read_text())["model_sha256"]
    assert json.loads((run / "summary.json").read_text())["model_sha256"] == model


@pytest.mark.parametrize("kind", ["open", "round", "receipt", "aggregate", "scores", "payout"])
def test_a_changed_byte_fails_at_that_entry(copy, kind, capsys):
    index = first_of(copy, kind)
    data = lines(copy)
    line = bytearray(data[index])
    at = line.index(b'"type"') - 3  # a byte inside the entry, before its type key
    line[at] = ord("7") if line[at] != ord("7") else ord("8")
    data[index] = bytes(line)
    (copy / "ledger" / "log.jsonl").write_bytes(b"".join(d + b"\n" for d in data))
    report = verify_run(copy)
    assert report.failed_entry == index, report.failure
    assert main(["verify", str(copy)]) == 1
    assert f"entry {index} does not verify" in capsys.readouterr().out


def test_reordered_entries_fail_at_the_first_moved(copy):
    index = first_of(copy, "receipt")
    es = entries(copy)
    es[index], es[index + 1] = es[index + 1], es[index]
    rewrite(copy, es)  # even with freshly signed heads
    report = verify_run(copy)
    assert report.failed_entry == index and "out of place" in report.failure


def test_a_forged_client_signature_fails_at_its_receipt(copy):
    es = entries(copy)
    index = first_of(copy, "receipt")
    forger = simulated_key(99, "client", es[index]["client"])
    body = {k: es[index][k] for k in ("round", "client", "model_sha256", "payload_sha256", "update_sha256", "weight")}
    es[index]["client_signature"] = forger.sign(canonical(body)).hex()
    rewrite(copy, es)
    report = verify_run(copy)
    assert report.failed_entry == index and "client's signature" in report.failure


def test_a_forged_head_signature_fails_at_that_entry(copy):
    heads = (copy / "ledger" / "heads.jsonl").read_bytes().splitlines()
    h = json.loads(heads[4])
    h["signature"] = simulated_key(1, "server").sign(head_message(h["size"], h["root"])).hex()
    heads[4] = canonical(h)
    (copy / "ledger" / "heads.jsonl").write_bytes(b"".join(x + b"\n" for x in heads))
    assert verify_run(copy).failed_entry == 4


def test_a_rewritten_score_or_payout_fails_even_with_signed_heads(copy):
    es = entries(copy)
    index = first_of(copy, "scores")
    client = next(iter(es[index]["scores"]))
    es[index]["scores"][client] += 1
    rewrite(copy, es)
    report = verify_run(copy)
    assert report.failed_entry == index and "recomputed scores differ" in report.failure
    es[index]["scores"][client] -= 1
    paid = es[-1]["paid"]
    richest = max(paid, key=paid.get)
    poorest = min(paid, key=paid.get)
    paid[richest], paid[poorest] = paid[richest] - 1, paid[poorest] + 1  # same sum, other split
    rewrite(copy, es)
    report = verify_run(copy)
    assert report.failed_entry == len(es) - 1 and "payouts" in report.failure


def test_a_changed_stored_update_fails_at_its_aggregate(copy):
    from safetensors.torch import load_file, save_file

    path = copy / "ledger" / "rounds" / "r0002.safetensors"
    t = load_file(str(path))
    t["updates"][0, 0] += 1e-3
    save_file(t, str(path))
    index = next(i for i, e in enumerate(entries(copy)) if e["type"] == "aggregate" and e["round"] == 2)
    report = verify_run(copy)
    assert report.failed_entry == index and "r0002" in report.failure


def test_a_client_proves_inclusion_and_that_its_log_is_a_prefix(run):
    data, heads = read_log(run / "ledger")
    server = entries(run)[0]["server_key"]
    leaves = [merkle.leaf_hash(x) for x in data]
    index = first_of(run, "receipt")
    seen = heads[index]  # the head the client was shown with its receipt
    proof = [h.hex() for h in merkle.inclusion_proof(index, leaves[: seen.size])]
    assert verify_receipt(data[index], index, seen, proof, server)
    assert not verify_receipt(data[index + 1], index, seen, proof, server)
    final = heads[-1]
    consistency = [h.hex() for h in merkle.consistency_proof(seen.size, leaves)]
    assert verify_prefix(seen, final, consistency, server)
    forked = TreeHead(final.size, merkle.root([*leaves[:-1], merkle.leaf_hash(b"other")]).hex(), final.signature)
    assert not verify_prefix(seen, forked, consistency, server)


def test_bad_ledger_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="ledger.contribution"):
        run_experiment(config(contribution="shapley"), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="unknown key ledger.tolerances"):
        run_experiment(config(tolerances=0.1), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="budget_s"):
        run_experiment(config(budget_s=-1.0), tmp_path / "c", progress=False)
    cfg = Config.from_dict({**BASE, "server": {**BASE["server"], "clients_per_round": 8},
                            "data": {**BASE["data"], "num_clients": 20}, "ledger": {"contribution": "exact"}})
    cfg.server.clients_per_round = 15
    with pytest.raises(ConfigError, match="at most 14"):
        run_experiment(cfg, tmp_path / "d", progress=False)
    gossip = Config.from_dict({**BASE, "topology": {"name": "gossip"}, "ledger": {"contribution": "loo"}})
    with pytest.raises(ConfigError, match="topology.name = 'federated'"):
        run_experiment(gossip, tmp_path / "e", progress=False)
    secure = Config.from_dict({**BASE, "ledger": {"contribution": "loo"}, "privacy": {"secagg": True}})
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        run_experiment(secure, tmp_path / "f", progress=False)
    central = Config.from_dict({**BASE, "ledger": {"contribution": "loo"},
                                "privacy": {"dp": "central", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="cannot replay it"):
        run_experiment(central, tmp_path / "g", progress=False)
    assert not any((tmp_path / name).exists() for name in "abcdefg")  # refused before any folder


def test_the_ledger_section_by_set_and_absent_by_default():
    assert "ledger" not in Config().to_dict()
    cfg = Config().with_overrides({"ledger.contribution": "tmc", "ledger.tolerance": 0.05,
                                   "ledger.payout_cents": 500})
    assert cfg.ledger.contribution == "tmc" and cfg.ledger.options == {"tolerance": 0.05}
    assert cfg.to_dict()["ledger"]["payout_cents"] == 500
    # Another method drops the old one's options and keeps the fixed keys.
    other = cfg.with_overrides({"ledger.contribution": "loo"})
    assert other.ledger.options == {} and other.ledger.payout_cents == 500


def test_a_deployment_with_a_ledger_and_no_log_refuses_to_continue_after_a_restart(tmp_path):
    from koinon.deploy.server import _ledger
    from koinon.experiment.runner import build_federation

    cfg = config()
    fed = build_federation(cfg)
    fed.round_index = 2  # what a restart restores, but the state folder has no round log
    with pytest.raises(KoinonError, match="no round log to continue"):
        _ledger(fed, cfg, tmp_path)
    fed.close()


def test_a_bad_ledger_leaves_no_folder(tmp_path):
    gossip = Config.from_dict({**BASE, "topology": {"name": "gossip"}, "ledger": {"contribution": "loo"}})
    with pytest.raises(ConfigError):
        run_experiment(gossip, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_verify_receipt_prints_a_clients_proofs(run, capsys):
    first = entries(run)[first_of(run, "receipt")]
    assert main(["verify", str(run), "--receipt", str(first["round"]), str(first["client"])]) == 0
    proof = json.loads(capsys.readouterr().out)
    assert proof["included"] and proof["prefix"] and proof["receipt"] == first
    assert proof["final_head"]["size"] == len(lines(run))
    assert main(["verify", str(run), "--receipt", "1", "999"]) == 2  # no such receipt: one-line error


def test_the_server_key_is_random_private_and_pinned(copy, tmp_path, capsys):
    import os
    import stat

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    real = entries(copy)[0]["server_key"]
    path = copy / "ledger" / "server_key.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert real == public_hex(load_server_key(copy / "ledger"))
    assert real != public_hex(simulated_key(0, "server"))  # not derivable from the seed
    assert b"PRIVATE" not in (copy / "ledger" / "log.jsonl").read_bytes()
    assert all(e["client_key"] == "simulated" for e in entries(copy) if e["type"] in ("open", "receipt"))
    assert main(["verify", str(copy), "--server-key", real]) == 0
    out = capsys.readouterr().out
    assert "verified: all" in out and "unpinned" not in out
    assert main(["verify", str(copy)]) == 0
    assert f"server key {real} trusted as the log names it (unpinned" in capsys.readouterr().out
    # Someone who knows the seed but not the key re-signs the log under a key of their own: it
    # verifies only unpinned; pinned to the owner's key it fails at the open entry.
    es = entries(copy)
    impostor = Ed25519PrivateKey.generate()
    es[0]["server_key"] = public_hex(impostor)
    for e in es:
        if e["type"] == "receipt":
            body = {k: v for k, v in e.items() if k not in ("seq", "type", "server_signature")}
            e["server_signature"] = impostor.sign(canonical(body)).hex()
    rewrite(copy, es, impostor)
    assert verify_run(copy).ok
    report = verify_run(copy, server_key=real)
    assert report.failed_entry == 0 and "not the expected" in report.failure
    assert main(["verify", str(copy), "--server-key", real]) == 1


def resequenced(es):
    return [{**e, "seq": i} for i, e in enumerate(es)]


def test_a_duplicated_or_missing_or_misplaced_entry_fails_where_it_is(copy):
    es = entries(copy)
    scores = [i for i, e in enumerate(es) if e["type"] == "scores"]
    # A scores entry repeated (re-signed by the server that holds its key) is a second one.
    rewrite(copy, resequenced([*es[: scores[0] + 1], es[scores[0]], *es[scores[0] + 1:]]))
    report = verify_run(copy)
    assert report.failed_entry == scores[0] + 1 and "does not call for" in report.failure
    # A missing scores entry is named at the next round's entry.
    rewrite(copy, resequenced([*es[: scores[0]], *es[scores[0] + 1:]]))
    report = verify_run(copy)
    assert report.failed_entry == scores[0] and "round 1's scores entry is missing" in report.failure
    # A scores entry naming another round.
    moved = [dict(e) for e in es]
    moved[scores[1]]["round"] = 1
    rewrite(copy, moved)
    report = verify_run(copy)
    assert report.failed_entry == scores[1] and "current round is 2" in report.failure
    # A second aggregate for a round.
    aggregate = first_of(copy, "aggregate")
    rewrite(copy, resequenced([*es[: aggregate + 1], es[aggregate], *es[aggregate + 1:]]))
    report = verify_run(copy)
    assert report.failed_entry == aggregate + 1 and "a second aggregate for round 1" in report.failure
    # The last round's scores and the payout dropped: named after the last entry.
    rewrite(copy, es[:-2])
    report = verify_run(copy)
    assert report.failed_entry == len(es) - 2 and "round 3's scores entry is missing" in report.failure
    rewrite(copy, es[:-1])
    report = verify_run(copy)
    assert report.failed_entry == len(es) - 1 and "no payout entry" in report.failure
    # An entry after the payout.
    rewrite(copy, resequenced([*es, es[-1]]))
    report = verify_run(copy)
    assert report.failed_entry == len(es) and "after the payout" in report.failure


def test_without_config_toml_the_run_is_only_partially_verified(copy, capsys):
    (copy / "config.toml").unlink()
    report = verify_run(copy)
    assert report.ok and "no config.toml" in report.partial
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "partially verified" in out and "verified: all" not in out


def test_a_tampered_payouts_csv_fails_at_the_payout(copy, capsys):
    path = copy / "payouts.csv"
    rows = path.read_text().splitlines()
    cells = rows[1].split(",")
    cells[2] = str(int(cells[2]) + 1)
    rows[1] = ",".join(cells)
    path.write_text("\r\n".join(rows) + "\r\n")
    report = verify_run(copy)
    assert report.failed_entry == len(lines(copy)) - 1 and "payouts.csv differs" in report.failure
    assert main(["verify", str(copy)]) == 1
    path.unlink()
    assert "no payouts.csv" in verify_run(copy).failure


@pytest.mark.parametrize("algorithm, hook", [
    ("feddyn", "server_delta"), ("frl", "start"), ("perfedavg", "starts"), ("fedper", "shared_mask"),
    ("fedrep", "shared_mask"), ("fedbn", "shared_mask"), ("ifca", "start"),
    ("clustered_meta", "starts"), ("fedcac", "starts"), ("spsa", "decode_update")])
def test_algorithms_whose_model_verify_cannot_rebuild_are_refused(algorithm, hook, tmp_path):
    from koinon.ledger import checked_settings

    cfg = config()
    cfg.client.algorithm = algorithm
    with pytest.raises(ConfigError, match=rf"client.algorithm = '{algorithm}'.*\({hook}\)"):
        checked_settings(cfg)


def test_fedprox_is_not_refused():
    from koinon.ledger import checked_settings

    cfg = config()
    cfg.client.algorithm = "fedprox"
    checked_settings(cfg)


@pytest.mark.parametrize("optimizer", ["fedavgm", "nesterov", "fedadam", "fedyogi", "fedadagrad"])
def test_a_stateful_server_optimizer_is_replayed_by_verify(tmp_path, optimizer):
    out = tmp_path / "run"
    run_experiment(Config.from_dict({**BASE, "server": {**BASE["server"], "optimizer": optimizer},
                                     "ledger": {**LEDGER, "max_permutations": 6}}), out, progress=False)
    report = verify_run(out)
    assert report.ok, report.failure
    assert any("state replayed from the aggregates" in n for n in report.notes)
    assert not any("checked by hash only" in n for n in report.notes)
    # Every aggregate was recomputed: a changed optimizer state in a stored round is caught there,
    # and so is a model the optimizer's step would not give (the stored state is re-hashed).
    from safetensors.torch import load_file, save_file

    log = entries(out)
    at = next(i for i, e in enumerate(log) if e["type"] == "aggregate" and e["round"] == 2)
    path = out / "ledger" / log[at]["round_file"]
    t = load_file(str(path))
    first = sorted(k for k in t if k.startswith("optimizer/"))[0]
    t[first] = t[first] + 1e-3
    save_file(t, str(path))
    log[at]["round_file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    rewrite(out, log)
    bad = verify_run(out)
    assert bad.failed_entry == at and "server optimizer state" in bad.failure, bad.failure


def test_scores_step_coalitions_with_the_server_optimizer():
    """With server momentum, a coalition's model is the optimizer's step from the round's state
    with the coalition's mean update: the empty coalition moves by the momentum alone."""
    from koinon.ledger import RoundUpdates
    from koinon.server.optimizers import FedAdam, FedAvgM

    updates = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    weights = torch.tensor([1.0, 3.0, 0.0])
    previous = torch.tensor([0.5, -0.5])
    m = FedAvgM(lr=0.5, momentum=0.9)
    state = {"velocity": torch.tensor([1.0, -1.0])}
    data = RoundUpdates(0, [0, 1, 2], previous, updates, weights, 0.5, m, state)
    masks = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=bool)
    got = data.coalition_params(masks)
    v = 0.9 * torch.tensor([1.0, -1.0], dtype=torch.float64)
    mean01 = torch.tensor([0.25, 1.5], dtype=torch.float64)  # (1 x [1, 0] + 3 x [0, 2]) / 4
    want = torch.stack([previous.double() + 0.5 * v, previous.double() + 0.5 * (v + updates[0].double()),
                        previous.double() + 0.5 * (v + mean01)])
    assert torch.allclose(got, want)
    assert torch.equal(state["velocity"], torch.tensor([1.0, -1.0]))  # the round's state is not touched
    adam = FedAdam(lr=0.1)
    s = adam.init(previous)
    data = RoundUpdates(0, [0, 1, 2], previous, updates, weights, 0.1, adam, s)
    full = data.coalition_params(np.ones((1, 3), dtype=bool))[0]
    expected = adam.step(previous.double(), (updates[:2].double() * weights[:2, None].double()).sum(0) / 4,
                         {k: v.double().clone() for k, v in s.items()})
    assert torch.allclose(full, expected)


def test_attach_refuses_an_unreplayable_federation(tmp_path):
    from koinon.experiment.runner import build_federation
    from koinon.ledger import LedgerSettings, attach

    cfg = Config.from_dict({**BASE, "client": {**BASE["client"], "algorithm": "feddyn"}})
    fed = build_federation(cfg)
    with pytest.raises(ConfigError, match="feddyn"):
        attach(fed, tmp_path / "x", LedgerSettings("loo", {}))
    assert not (tmp_path / "x").exists()
    fed.close()


def test_a_round_that_applies_nothing_is_logged_and_verifies(tmp_path):
    """A Poisson cohort may be empty: the round keeps the model, and the ledger stores it."""
    cfg = Config.from_dict({"seed": 0, "data": {"name": "digits", "num_clients": 4},
                            "model": {"name": "mlp", "hidden": [8]}, "runtime": {"name": "inprocess"},
                            "client": {"steps": 1},
                            "server": {"clients_per_round": 1, "rounds": 8, "sampler": "poisson"},
                            "ledger": {"contribution": "loo"}})
    run_experiment(cfg, tmp_path / "run", progress=False)
    cohorts = [json.loads(line).get("cohort") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [] in cohorts  # seed 0 draws an empty cohort within these rounds
    assert verify_run(tmp_path / "run").ok
