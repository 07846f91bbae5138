"""The shared local-training engine against PyTorch's own SGD, and the runtimes against each other."""

import pytest
import torch
from torch import nn

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.data import Dataset, partition_dataset
from koinon.local import CohortTrainer
from koinon.params import Layout
from koinon.runtime import RUNTIMES


def _data(num_clients=6, n=90, seed=0, partition="quantity"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    ds = Dataset.from_tensors(x, y, x[:20], y[:20])
    return partition_dataset(ds, partition, num_clients, seed=seed)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-2), (0.9, True, 1e-3)])
def test_single_client_matches_torch_optim_sgd(momentum, nesterov, wd):
    data = _data()
    model = _model()
    layout = Layout.from_module(model)
    local = LocalTraining(epochs=3, batch_size=4, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    trainer = CohortTrainer(model, layout, data, CLIENT_ALGORITHMS.get("fedavg")(), local)
    start = layout.flatten(model)
    result = trainer.train([2], start, {}, [{}], seed=5, round_index=3)

    # Reference: the same batches through a plain module and torch.optim.SGD.
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for row in trainer.client_batches(2, seed=5, round_index=3):
        ix = row[row >= 0]
        opt.zero_grad()
        nn.functional.cross_entropy(ref(data.dataset.x_train[ix]), data.dataset.y_train[ix]).backward()
        opt.step()
    expected = layout.flatten(ref) - start
    assert torch.allclose(result.deltas[0], expected, atol=1e-6)
    assert result.num_steps.item() == 3 * -(-len(data.client_indices[2]) // 4)


# Tolerance: vmap batches the same per-client matmuls, so results differ from the sequential
# runtime only by float32 summation order (~1e-7 relative per step); 1e-5 absolute after
# several rounds leaves room for that and nothing else.
ATOL = 1e-5


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold"])
@pytest.mark.parametrize("local", [
    LocalTraining(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-3),
    LocalTraining(steps=7, batch_size=5, lr=0.05, nesterov=True, momentum=0.5),
])
def test_vectorized_equals_inprocess(algorithm, local):
    from koinon.topology import Federation

    data = _data(num_clients=8, n=120)  # quantity skew: clients of very different sizes
    assert len(set(data.sizes.tolist())) > 3
    finals = {}
    for runtime in ("inprocess", "vectorized"):
        alg = CLIENT_ALGORITHMS.build(algorithm, {}, "client.algorithm", mu=0.1)
        fed = Federation(_model(), data, local=local, algorithm=alg, runtime=runtime,
                         clients_per_round=5, seed=11)
        for _ in range(4):
            fed.run_round(evaluate=False)
        finals[runtime] = (fed.params.clone(), {k: dict(v) for k, v in fed.client_states.items()})
    assert torch.allclose(finals["inprocess"][0], finals["vectorized"][0], atol=ATOL)
    for c, st in finals["inprocess"][1].items():
        assert torch.allclose(st["control"], finals["vectorized"][1][c]["control"], atol=1e-4)


def test_vectorized_chunks_equal_one_chunk():
    from koinon.topology import Federation

    data = _data(num_clients=10, n=150)
    params = []
    for chunk in (0, 3):
        rt = RUNTIMES.get("vectorized")(max_chunk=chunk)
        fed = Federation(_model(), data, local=LocalTraining(lr=0.1), runtime=rt, clients_per_round=10, seed=1)
        fed.run_round(evaluate=False)
        params.append(fed.params)
    assert torch.allclose(params[0], params[1], atol=1e-6)


def test_vectorized_falls_back_for_batchnorm(capsys):
    from koinon.topology import Federation

    data = _data(partition="iid")  # 15 samples each: no batch of one, which BatchNorm refuses
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fed = Federation(model, data, local=LocalTraining(batch_size=8), runtime="vectorized",
                     clients_per_round=3, seed=0)
    assert "falls back to 'inprocess'" in capsys.readouterr().err
    before = fed.params.clone()
    fed.run_round(evaluate=True)
    bn = Layout.from_module(model)
    buffers = slice(bn.num_trainable, bn.numel)
    assert not torch.equal(before[buffers], fed.params[buffers])  # running stats were trained and averaged


@pytest.mark.parametrize("local", [LocalTraining(epochs=3, batch_size=4), LocalTraining(steps=10, batch_size=7)])
def test_schedule_visits_each_sample_once_per_epoch_and_ignores_the_cohort(local):
    data = _data(num_clients=6, n=90)
    trainer = CohortTrainer(_model(), Layout.from_module(_model()), data, CLIENT_ALGORITHMS.get("fedavg")(), local)
    together, steps = trainer.schedule([0, 3, 5], seed=1, round_index=2)
    for row, c in enumerate([0, 3, 5]):
        alone = trainer.client_batches(c, seed=1, round_index=2)
        assert torch.equal(together[row, : steps[row]], alone)  # independent of the cohort
        assert (together[row, steps[row]:] == -1).all()
        mine = sorted(data.client_indices[c].tolist())
        n = len(mine)
        per_epoch = -(-n // local.batch_size)
        if local.steps == 0:
            assert steps[row] == per_epoch * local.epochs
            for e in range(local.epochs):
                epoch = alone[e * per_epoch : (e + 1) * per_epoch].flatten()
                assert sorted(epoch[epoch >= 0].tolist()) == mine  # a permutation per epoch
        else:
            assert steps[row] == local.steps
    again, _ = trainer.schedule([0, 3, 5], seed=1, round_index=2)
    other, _ = trainer.schedule([0, 3, 5], seed=1, round_index=3)
    assert torch.equal(together, again) and not torch.equal(together, other)


def test_clients_can_start_from_their_own_models():
    data = _data(num_clients=4, n=60)
    model = _model()
    layout = Layout.from_module(model)
    trainer = CohortTrainer(model, layout, data, CLIENT_ALGORITHMS.get("fedprox")(mu=0.1),
                            LocalTraining(epochs=2, batch_size=5, lr=0.1))
    starts = layout.flatten(model) + 0.1 * torch.randn(3, layout.numel, generator=torch.Generator().manual_seed(0))
    together = trainer.train([0, 1, 3], starts, {}, [{}] * 3, seed=1, round_index=0)
    for row, c in enumerate([0, 1, 3]):
        alone = trainer.train([c], starts[row], {}, [{}], seed=1, round_index=0)
        assert torch.allclose(together.deltas[row], alone.deltas[0], atol=1e-6)


@pytest.mark.parametrize("runtime", ["inprocess", "vectorized"])
def test_runtimes_accept_one_starting_model_per_client(runtime):
    data = _data(num_clients=6, n=90)
    model = _model()
    layout = Layout.from_module(model)
    rt = RUNTIMES.build(runtime, {"max_chunk": 2} if runtime == "vectorized" else {}, "runtime")
    rt.setup(CohortTrainer(model, layout, data, CLIENT_ALGORITHMS.get("fedavg")(), LocalTraining(lr=0.1)))
    starts = layout.flatten(model) + torch.randn(5, layout.numel, generator=torch.Generator().manual_seed(3))
    ids = [0, 1, 2, 4, 5]
    result = rt.train(ids, starts, {}, [{}] * 5, seed=0, round_index=0)
    alone = rt.train([4], starts[3], {}, [{}], seed=0, round_index=0)
    assert torch.allclose(result.deltas[3], alone.deltas[0], atol=1e-6)


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_hand_written_backward_equals_autograd_path(algorithm):
    """The trainer's hand-written MLP gradient and its autograd path train the same cohort alike
    (clients of unequal sizes, so the step-count prefixes shrink along the way)."""
    data = _data(num_clients=8, n=120)
    model = _model()
    layout = Layout.from_module(model)
    local = LocalTraining(epochs=2, batch_size=6, lr=0.1, momentum=0.9)
    alg = CLIENT_ALGORITHMS.build(algorithm, {}, "client.algorithm")
    server_state = alg.init_server_state(layout.numel)
    if "control" in server_state:
        server_state["control"] = 0.01 * torch.randn(layout.numel, generator=torch.Generator().manual_seed(3))
    results = []
    for manual in (True, False):
        trainer = CohortTrainer(model, layout, data, alg, local)
        assert trainer._manual is not None
        if not manual:
            trainer._manual = None
        results.append(trainer.train(list(range(8)), layout.flatten(model), server_state,
                                     [{} for _ in range(8)], seed=1, round_index=2))
    assert len(set(results[0].num_steps.tolist())) > 1
    assert torch.allclose(results[0].deltas, results[1].deltas, atol=1e-6)
    assert torch.allclose(results[0].train_loss, results[1].train_loss, atol=1e-6)
    assert results[0].deltas.abs().sum() > 0


def test_vectorized_seed_mixing_equals_the_scalar_one():
    from koinon.seeding import mix_seed, mix_seeds

    clients = torch.tensor([0, 1, 7, 99_999, -1, 2**40])
    for seed, r in [(0, 0), (7, 3), (123_456_789, 10**6), (-5, 2)]:
        assert mix_seeds(seed, r, clients).tolist() == [mix_seed(seed, r, int(c)) for c in clients]


def test_numpy_hashing_equals_torch_hashing():
    """The batch schedule hashes in NumPy; its values must be the torch functions' exactly."""
    import numpy as np

    from koinon.seeding import hash64, hash64_array, mix_seeds, mix_seeds_array

    z = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64)
    z[:4] = [0, -1, 2**63 - 1, -(2**63)]
    assert (hash64_array(z) == hash64(torch.from_numpy(z)).numpy()).all()
    clients = np.array([0, 1, 7, 99_999, -1, 2**40])
    for seed, r in [(0, 0), (7, 3), (123_456_789, 10**6), (-5, 2)]:
        assert (mix_seeds_array(seed, r, clients) == mix_seeds(seed, r, torch.from_numpy(clients)).numpy()).all()


def test_frozen_feature_layers_train_vectorized_without_fallback(capsys):
    """Frozen parameters (a pretrained feature extractor) are constants, not buffers: the
    vectorized runtime keeps them fixed and equals the sequential runtime."""
    from koinon.topology import Federation

    def frozen_model():
        model = _model()
        for p in model[0].parameters():
            p.requires_grad_(False)
        return model

    data = _data(num_clients=8, n=120)
    finals = {}
    for runtime in ("inprocess", "vectorized"):
        fed = Federation(frozen_model(), data, local=LocalTraining(epochs=2, batch_size=8, lr=0.1, momentum=0.9),
                         runtime=runtime, clients_per_round=5, seed=3)
        start = fed.params.clone()
        for _ in range(3):
            fed.run_round(evaluate=False)
        finals[runtime] = fed.params.clone()
        layout = fed.layout
    assert "falls back" not in capsys.readouterr().err
    assert torch.allclose(finals["inprocess"], finals["vectorized"], atol=ATOL)
    frozen = layout.num_trainable  # frozen entries follow the trainable ones
    assert torch.equal(finals["vectorized"][frozen:], start[frozen:])
    assert not torch.equal(finals["vectorized"][:frozen], start[:frozen])


def test_layers_on_multi_dim_inputs_use_autograd():
    """A Linear applied per position before a Flatten is not a plain MLP on feature vectors."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 4, 3, generator=g), torch.randint(0, 2, (60,), generator=g)
    data = partition_dataset(Dataset.from_tensors(x, y, x[:10], y[:10]), "iid", 4, seed=0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Flatten(), nn.Linear(20, 2))
    layout = Layout.from_module(model)
    trainer = CohortTrainer(model, layout, data, CLIENT_ALGORITHMS.get("fedavg")(), LocalTraining(lr=0.1))
    assert trainer._manual is None
    result = trainer.train([0, 1, 2], layout.flatten(model), {}, [{}] * 3, seed=0, round_index=0)
    assert torch.isfinite(result.deltas).all() and result.deltas.abs().sum() > 0


def test_vectorized_fallback_for_dropout_says_dropout(capsys):
    from koinon.topology import Federation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
    Federation(model, _data(), runtime="vectorized", clients_per_round=3, seed=0)
    err = capsys.readouterr().err
    assert "falls back to 'inprocess'" in err and "dropout (2)" in err and "vmap" in err
    assert "randomness" not in err  # not vmap's raw error
