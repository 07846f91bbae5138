"""Hidden labels and FedLGD in a real deployment (`koinon.deploy.labels`): `koinon server` and
three `koinon client` processes on 127.0.0.1 hide the simulation's labels, train FedoSSL, KAFAL
and FedLGD, and end with the simulation's global model bit for bit; a client's own data marks
its unlabeled samples with -100."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import koinon as kn
from koinon.deploy.labels import check_trained, held_samples, own_data, own_labels, trained_samples
from koinon.errors import ConfigError, KoinonError
from koinon.personal.labels import UNLABELED, LabelSetting, PartlyLabeled
from koinon.update import CohortResult

_spec = importlib.util.spec_from_file_location(
    "deploy_helpers", Path(__file__).parents[1] / "deploy" / "helpers.py")
assert _spec and _spec.loader
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

HIDDEN = {"unlabeled_clients": 1, "label_fraction": 0.5, "unseen_classes": [9], "client_test_fraction": 0.25}


def _own(y):
    x = torch.arange(len(y) * 2, dtype=torch.float32).view(len(y), 2)
    return kn.Dataset.from_tensors(x, torch.tensor(y), torch.zeros(3, 2), torch.tensor([0, 1, 2]), num_classes=3,
                                   unlabeled=True)


def test_own_data_marks_unlabeled_samples_with_minus_100():
    ds = _own([0, UNLABELED, 2, UNLABELED, 1])
    assert ds.num_classes == 3 and ds.y_train.tolist() == [0, -100, 2, -100, 1]
    data = own_data(ds, 2)  # installed as client 2
    assert isinstance(data, PartlyLabeled)
    assert [ix.tolist() for ix in data.client_indices] == [[], [], [0, 2, 4]]
    assert [ix.tolist() for ix in data.unlabeled] == [[], [], [1, 3]]
    assert held_samples(data, 2) == 5 and held_samples(data, 0) == 0
    probe = own_labels(ds, "m:f", None)  # the model checks see class 0 in their place
    assert probe.y_train.tolist() == [0, 0, 2, 0, 1] and ds.y_train[1] == UNLABELED
    plain = own_data(_own([0, 1, 2]), 0)
    assert not isinstance(plain, PartlyLabeled) and plain.client_indices[0].tolist() == [0, 1, 2]


def test_own_data_refusals_are_one_line():
    with pytest.raises(ValueError, match="labels must be 0..2"):  # -100 without unlabeled=True
        kn.Dataset.from_tensors(torch.zeros(2, 2), torch.tensor([0, -100]), torch.zeros(1, 2), torch.tensor([2]))
    bad = kn.Dataset("own", torch.zeros(2, 2), torch.tensor([0, -1]), torch.zeros(1, 2), torch.tensor([1]), 3)
    with pytest.raises(KoinonError, match="or -100 for a sample without a label"):
        own_labels(bad, "m:f", None)
    kafal = kn.CLIENT_ALGORITHMS.get("kafal")()
    with pytest.raises(KoinonError, match="annotator"):
        own_labels(_own([0, UNLABELED]), "m:f", kafal)
    assert own_labels(_own([0, 1]), "m:f", kafal).y_train.tolist() == [0, 1]  # all labeled: nothing to buy
    with pytest.raises(KoinonError, match="privacy.secagg does not take"):  # weighs the declared count
        own_labels(_own([0, UNLABELED]), "m:f", None, "privacy.secagg")
    assert own_labels(_own([0, 1]), "m:f", None, "privacy.secagg").y_train.tolist() == [0, 1]


def test_an_upload_counts_the_samples_it_trained_on():
    data = LabelSetting(label_fraction=0.5).apply(
        kn.partition_dataset(kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=2), "iid", 2, seed=0), 0)
    n = len(data.client_indices[0]) + len(data.unlabeled[0])
    assert held_samples(data, 0) == n == len(data.dataset.y_train) // 2
    result = CohortResult([0], torch.zeros(1, 3), {}, torch.tensor([7]), torch.tensor([1]), torch.zeros(1), [{}])
    assert trained_samples(data, n, result) == 7  # hidden labels: this round's count
    assert trained_samples(kn.FederatedData(data.dataset, data.client_indices), n, result) == n
    assert check_trained(n, n) is None and check_trained(0, n, (0, n)) is None
    assert "differs" in check_trained(7, n)
    assert "more than" in check_trained(n + 1, n, (0, n)) and "more than" in check_trained(-1, n, (0, n))
    assert "trains on 3..5" in check_trained(6, n, (3, 5)) and check_trained(5, n, (3, 5)) is None


def _hidden_server(tmp_path, algorithm: str, **client):
    """A `koinon server` (not listening) over a hidden-label federation, its 4 partitions joined
    with the counts `koinon client` declares."""
    import time

    from koinon.deploy.asynchronous import build_for_deployment
    from koinon.deploy.server import FederationServer, Member, check_deployable
    from koinon.deploy.store import Store

    cfg = kn.Config.from_dict({"seed": 2, "data": {"name": "digits", "num_clients": 4, "unlabeled_clients": 1,
                                                    "label_fraction": 0.5, "unseen_classes": [9]},
                               "model": {"name": "mlp", "hidden": [8]}, "runtime": {"name": "inprocess"},
                               "client": {"algorithm": algorithm, "steps": 2, **client},
                               "server": {"clients_per_round": 4, "rounds": 2}})
    fed = check_deployable(build_for_deployment(cfg)[0], cfg)
    srv = FederationServer(cfg, fed, Store(tmp_path), tmp_path)
    for i in range(4):
        srv.members[f"c{i}"] = Member(f"c{i}", i, held_samples(fed.data, i), f"partition:{i}",
                                      last_seen=time.monotonic())
    return srv


def _header(srv, idx: int, num_samples: int):
    from types import SimpleNamespace

    return SimpleNamespace(layout_hash=srv.layout_hash, codec=srv.fed.codec.name, client_index=idx,
                           num_samples=num_samples)


def _simulated_counts(cfg_srv, rounds: int = 2) -> list[dict[int, int]]:
    """Each round's `CohortResult.num_samples` (the simulation's weights) of the same config."""
    from koinon.topology.build import build_federated

    fed = build_federated(cfg_srv.cfg)
    seen: list[dict[int, int]] = []
    accept = fed.server.accept_cohort

    def spy(result):
        seen.append(dict(zip(result.client_ids, result.num_samples.tolist())))
        return accept(result)

    fed.server.accept_cohort = spy
    for _ in range(rounds):
        fed.run_round(evaluate=False)
    return seen


def test_the_server_refuses_a_fedavg_count_above_the_labeled_one(tmp_path):
    from koinon.wire import Rejected

    srv = _hidden_server(tmp_path, "fedavg")
    sizes = srv.fed.data.sizes
    assert [c for c in range(4) if int(sizes[c]) == 0 < held_samples(srv.fed.data, c)]  # the unlabeled client
    for counts in _simulated_counts(srv):  # the simulation's weights: each partition's labeled count
        for c, n in counts.items():
            assert n == int(sizes[c])
            srv._check_header(_header(srv, c, n), srv.members[f"c{c}"])
    for c in range(4):  # everything held (the unlabeled client claiming its 0 labels' worth), or one less
        held = held_samples(srv.fed.data, c)
        for n in (held, int(sizes[c]) + 1) + ((int(sizes[c]) - 1,) if sizes[c] else ()):
            with pytest.raises(Rejected, match=f"trains on {int(sizes[c])}..{int(sizes[c])} samples"):
                srv._check_header(_header(srv, c, n), srv.members[f"c{c}"])


@pytest.mark.parametrize("algorithm,client", [("kafal", {"label_budget": 6, "query_per_round": 3}),
                                              ("fedossl", {"threshold": 0.0})])
def test_the_server_takes_the_counts_kafal_and_fedossl_train_on(tmp_path, algorithm, client):
    from koinon.wire import Rejected

    srv = _hidden_server(tmp_path, algorithm, **client)
    sizes, grew = srv.fed.data.sizes, False
    for counts in _simulated_counts(srv):
        for c, n in counts.items():
            grew |= n > int(sizes[c])  # bought labels, a compensation draw or pseudo-labels count
            srv._check_header(_header(srv, c, n), srv.members[f"c{c}"])
    assert grew
    member = srv.members["c1"]
    low, high = (int(sizes[1]), min(member.num_samples, 2 * (int(sizes[1]) + 6))) if algorithm == "kafal" else (
        int(sizes[1]), member.num_samples)
    for n in (low, high):
        srv._check_header(_header(srv, 1, n), member)
    for n in (low - 1, high + 1):
        with pytest.raises(Rejected):
            srv._check_header(_header(srv, 1, n), member)


def test_koinon_server_takes_hidden_labels_in_synchronous_rounds_only():
    from koinon.deploy.asynchronous import build_for_deployment
    from koinon.deploy.server import check_deployable

    cfg = kn.Config()
    cfg.data.num_clients, cfg.data.label_fraction = 8, 0.5
    cfg.server.clients_per_round = 4
    cfg.client.algorithm = "fedossl"
    fed = check_deployable(build_for_deployment(cfg)[0], cfg)
    assert isinstance(fed.data, PartlyLabeled)
    cfg.schedule.name, cfg.schedule.options = "fedbuff", {"buffer": 2}
    with pytest.raises(ConfigError, match="synchronous rounds"):
        check_deployable(build_for_deployment(cfg)[0], cfg)


@pytest.mark.slow
def test_deployed_fedossl_hides_the_simulations_labels_and_ends_with_its_model(tmp_path, certs):
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3}, data=HIDDEN,
                            client={"algorithm": "fedossl", "threshold": 0.3, "momentum": 0.0})
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    sim = h.simulate(tmp_path, config, state)  # the model, bit for bit
    deployed = h.metrics(state)
    assert len(deployed) == len(sim) == 3
    for r in range(3):
        assert deployed[r]["num_clients"] == 3
        for name in ("seen_accuracy", "novel_accuracy", "personal_accuracy_mean", "personal_accuracy_min"):
            assert not math.isnan(sim[r][name])
            assert deployed[r][name] == sim[r][name], (r, name)


@pytest.mark.slow
def test_deployed_kafal_keeps_its_bought_labels_across_a_client_restart(tmp_path, certs):
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 4, "clients_per_round": 3},
                            data={"label_fraction": 0.2},
                            client={"algorithm": "kafal", "label_budget": 6, "query_per_round": 2, "momentum": 0.0})
    state = tmp_path / "state"
    server, address = h.start_server(tmp_path, config, certs, state)
    # client-0 dies after the server accepted its round-2 upload, before it heard so: the labels
    # it bought in rounds 1 and 2 are in its staged --state, and the server's word makes them current.
    first = h.start_client(tmp_path, address, certs, "client-0", "partition:0", env={"KOINON_CRASH_AT": "client.accepted@1"})
    others = [h.start_client(tmp_path, address, certs, f"client-{i}", f"partition:{i}") for i in (1, 2)]
    assert first.wait(90) == 86, first.text()[-3000:]
    again = h.start_client(tmp_path, address, certs, "client-0", "partition:0")
    assert server.wait(120) == 0, server.text()[-3000:]
    for c in (again, *others):
        assert c.wait(30) == 0, c.text()[-3000:]
    assert "state of round 2" in again.text() or "round 2 was sent" in again.text()
    h.simulate(tmp_path, config, state)  # the model, bit for bit
    for i in range(3):
        files = list((tmp_path / "client-state" / f"client-{i}").rglob("state.safetensors"))
        queried = load_file(str(files[0]))["algorithm/queried"]
        assert len(queried) == 6  # 2 a round up to its budget of 6, the last round's within it


@pytest.mark.slow
def test_deployed_fedlgd_distils_the_global_virtual_data_at_the_server(tmp_path, certs):
    config = h.write_config(tmp_path / "fed.toml", server={"rounds": 3, "clients_per_round": 3},
                            client={"algorithm": "fedlgd", "ipc": 2, "dm_steps": 2, "match_steps": 2, "momentum": 0.0})
    state = h.run_deployment(tmp_path, config, certs, server_s=120)
    sim = h.simulate(tmp_path, config, state)  # the model, bit for bit: the global virtual data matched
    deployed = h.metrics(state)
    for r in range(3):  # the virtual data download is counted as in simulation
        assert deployed[r]["downlink_bytes"] == sim[r]["downlink_bytes"]
        assert deployed[r]["uplink_bytes"] == sim[r]["uplink_bytes"]


def _half_labeled():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g)
    y = torch.where(torch.arange(40) % 2 == 0, torch.arange(40) % 10, torch.full((40,), UNLABELED))
    return kn.Dataset.from_tensors(x, y, x[:10], torch.arange(10), num_classes=10, unlabeled=True)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedossl"])
def test_a_client_with_its_own_half_labeled_data_trains_and_counts_what_it_trained_on(monkeypatch, algorithm):
    import sys
    import types

    from koinon.deploy.client import ClientState, DataSpec, Worker

    module = types.ModuleType("deploy_half_labeled")
    module.load = _half_labeled  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "deploy_half_labeled", module)
    def config(**client):
        return kn.Config.from_dict({"data": {"name": "digits", "num_clients": 3}, "model": {"name": "mlp", "hidden": [8]},
                                    "runtime": {"name": "inprocess"}, "server": {"clients_per_round": 1},
                                    "client": client})

    worker = Worker(config(algorithm=algorithm, **({"threshold": 0.0} if algorithm == "fedossl" else {})),
                    DataSpec.parse("deploy_half_labeled:load"))
    assert worker.num_samples == 40  # it declares every sample it holds
    worker.bind(7)
    payload, _ = worker.fed.downlink.encode(worker.fed.params, {}, torch.Generator())
    state = ClientState.__new__(ClientState)
    state.codec, state.algorithm = {}, {}
    uploads, _, result = worker.train(7, 0, [payload], ["delta"], state)
    trained = trained_samples(worker.data, worker.num_samples, result)
    if algorithm == "fedavg":  # the 20 labeled samples only
        assert trained == 20
    else:  # and the pseudo-labeled ones (weight > 0 after rounding)
        assert 20 < trained <= 40
    assert worker.fed.codec.decode(uploads[0]).abs().sum() > 0
    with pytest.raises(KoinonError, match="annotator"):
        Worker(config(algorithm="kafal"), DataSpec.parse("deploy_half_labeled:load"))
    # SecAgg+ and FedBuff/FedAsync weigh the count declared when joining: refused in one line.
    secure = config(algorithm="fedavg")
    secure.privacy.secagg = True
    with pytest.raises(KoinonError, match="privacy.secagg does not take"):
        Worker(secure, DataSpec.parse("deploy_half_labeled:load"))
    buffered = config(algorithm="fedavg")
    buffered.schedule.name, buffered.schedule.options = "fedbuff", {"buffer": 2}
    with pytest.raises(KoinonError, match="schedule.name = 'fedbuff' does not take"):
        Worker(buffered, DataSpec.parse("deploy_half_labeled:load"))
