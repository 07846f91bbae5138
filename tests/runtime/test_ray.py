"""Runtime `ray` against `inprocess` on a local Ray instance, and its handling of failures.

Ray starts once for the module (about 5 s on two cores) and every test's actors pay for a
torch import (4-8 s on this machine), so each test sets up one `ray` runtime, no more.
"""

import sys

import pytest
import torch
from torch import nn

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.data import Dataset, partition_dataset
from koinon.errors import ConfigError, KoinonError
from koinon.local import CohortTrainer
from koinon.params import Layout
from koinon.runtime import RUNTIMES
from koinon.topology import Federation

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

# The actors run the same trainer code as inprocess; vectorized shares differ from sequential
# clients only by float32 summation order (see test_trainer.py), well under this after 3 rounds.
ATOL = 1e-5
LOCAL = LocalTraining(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _data(num_clients=8, n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return partition_dataset(
        Dataset.from_tensors(x, y, x[:20], y[:20]), "quantity", num_clients, seed=seed
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _federation(runtime, algorithm="fedavg", data=None):
    alg = CLIENT_ALGORITHMS.build(algorithm, {}, "client.algorithm")
    # 5 of 8 clients over 2 actors: uneven shares (3 + 2) of clients with unequal data.
    return Federation(
        _model(),
        data or _data(),
        local=LOCAL,
        algorithm=alg,
        runtime=runtime,
        clients_per_round=5,
        seed=11,
    )


def _reference(algorithm, rounds=3):
    fed = _federation("inprocess", algorithm)
    for _ in range(rounds):
        fed.run_round(evaluate=False)
    return fed


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_ray_equals_inprocess(algorithm):
    ref = _reference(algorithm)
    fed = _federation(RUNTIMES.build("ray", {}, "runtime"), algorithm)
    try:
        for _ in range(3):
            fed.run_round(evaluate=False)
        # One starting model per client (decentralized nodes): each share gets its own rows.
        ids = [0, 2, 3, 5, 7]
        starts = fed.params + 0.1 * torch.randn(5, fed.layout.numel, generator=torch.Generator().manual_seed(0))
        states = [{} for _ in ids]
        got = fed.runtime.train(ids, starts, ref.server.server_state, states, 11, 3)
        want = ref.runtime.train(ids, starts, ref.server.server_state, states, 11, 3)
        assert torch.allclose(got.deltas, want.deltas, atol=ATOL)
        # With the round's encoder the actors encode where they trained: only bytes come back.
        encoder = fed.sender.for_cohort(ids, 3)
        shipped = fed.runtime.train(ids, starts, ref.server.server_state, states, 11, 3, encoder)
        assert shipped.deltas is None and shipped.uploads == {}
        assert [len(p) for p in shipped.payloads] == [len(fed.server.streams)] * len(ids)
        decoded = torch.stack([fed.codec.decode(p[0]) for p in shipped.payloads])
        assert torch.allclose(decoded, want.deltas, atol=ATOL)
    finally:
        fed.close()
    assert ray.is_initialized()  # the runtime reused the fixture's Ray and left it running
    assert torch.allclose(fed.params, ref.params, atol=ATOL)
    assert fed.client_states.keys() == ref.client_states.keys()
    # SCAFFOLD's per-client control variates came back to the right clients.
    for c, state in ref.client_states.items():
        assert torch.allclose(fed.client_states[c]["control"], state["control"], atol=1e-4)


def test_dead_actor_is_replaced_and_its_clients_retried(capsys):
    ref = _reference("scaffold")
    # inner = "inprocess" here, so that both inner runtimes are checked against the reference.
    runtime = RUNTIMES.build("ray", {"max_retries": 1, "inner": "inprocess"}, "runtime")
    fed = _federation(runtime, "scaffold")
    try:
        fed.run_round(evaluate=False)
        killed = runtime._actors[0]
        ray.kill(killed)
        fed.run_round(evaluate=False)
        assert runtime._actors[0] is not killed
        assert "actor 0 died" in capsys.readouterr().err
        fed.run_round(evaluate=False)
        assert torch.allclose(fed.params, ref.params, atol=ATOL)

        # With no retries left, a lost actor is an error naming its clients, not a hang.
        runtime.max_retries = 0
        ray.kill(runtime._actors[1])
        cohort = fed.sample_cohort(fed.round_index)
        with pytest.raises(
            KoinonError, match=f"clients {', '.join(map(str, cohort[3:]))} lost their actor"
        ):
            fed.run_round(evaluate=False)
    finally:
        fed.close()


def test_client_error_names_the_clients_and_the_cause():
    data = _data()
    cohort = _federation("inprocess", data=data).sample_cohort(0)
    bad = cohort[4]  # in the second actor's share (clients 3 and 4 of the cohort)
    # A label out of range fails inside local training (cross_entropy raises). Federation refuses
    # such data before round 1, so the runtime gets a trainer built on it directly.
    data.dataset.y_train[data.client_indices[bad]] = 7
    model = _model()
    trainer = CohortTrainer(model, Layout.from_module(model), data,
                            CLIENT_ALGORITHMS.build("fedavg", {}, "client.algorithm"), LOCAL)
    runtime = RUNTIMES.build("ray", {}, "runtime")
    runtime.setup(trainer)
    try:
        with pytest.raises(KoinonError) as info:
            runtime.train(cohort, Layout.from_module(model).flatten(model), {}, [{}] * 5, 11, 0)
    finally:
        runtime.close()
    message = str(info.value)
    assert f"clients {cohort[3]}, {cohort[4]} failed" in message
    assert "out of bounds" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "option,value",
    [
        ("num_workers", 0),
        ("inner", "gpu"),
        ("memory_mb", 1),
        ("max_retries", -1),
        ("threads", 0),
        ("timeout_s", 0.0),
    ],
)
def test_bad_options_are_config_errors(option, value):
    with pytest.raises(ConfigError, match=f"runtime.{option}"):
        RUNTIMES.build("ray", {option: value}, "runtime")


def test_missing_ray_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'koinon\[ray\]'"):
        _federation(RUNTIMES.build("ray", {}, "runtime"))
