"""`runtime.device` and `runtime.precision`: parsing, placement, bf16 training.

No GPU is needed: placement is checked on PyTorch's `meta` device, whose tensors carry no data
and refuse to mix with CPU tensors in arithmetic, as CUDA tensors do. A run on `meta` therefore
fails at the first tensor the trainer or an algorithm left on the host. The tests that need a
real GPU are marked `gpu` and skipped without one.
"""

import pytest
import torch
from torch import nn

from koinon.clients import CLIENT_ALGORITHMS, LocalTraining
from koinon.data import Dataset, partition_dataset
from koinon.errors import ConfigError
from koinon.local import CohortTrainer
from koinon.local.device import resolve_device
from koinon.params import Layout
from koinon.runtime import RUNTIMES

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _data(shape=(5,), num_clients=6, n=90):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    flat = x.flatten(1)
    y = (flat[:, 0] + 0.5 * flat[:, 1] > 0).long() + (flat[:, 2] > 1).long()
    ds = Dataset.from_tensors(x, y, x[:20], y[:20])
    return partition_dataset(ds, "quantity", num_clients, seed=0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def test_resolve_device_values():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "CPU", "", "cuda:-1"):
        with pytest.raises(ConfigError, match="allowed: cpu, cuda, cuda:N, auto"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_a_one_line_error():
    with pytest.raises(ConfigError, match="no CUDA device") as info:
        RUNTIMES.build("vectorized", {"device": "cuda"}, "runtime")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="allowed: fp32, bf16"):
        RUNTIMES.build("inprocess", {"precision": "fp16"}, "runtime")


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold", "worker_momentum"])
@pytest.mark.parametrize("model,shape", [(_mlp, (5,)), (_cnn, (1, 6, 6))])
@pytest.mark.parametrize("clients", [[3], [0, 2, 4, 5]])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_keeps_every_tensor_on_the_device(algorithm, model, shape, clients, optimizer):
    data = _data(shape)
    module = model()
    layout = Layout.from_module(module)
    local = LocalTraining(epochs=2, batch_size=4, lr=0.1, momentum=0.9, optimizer=optimizer)
    alg = CLIENT_ALGORITHMS.get(algorithm)()
    trainer = CohortTrainer(module, layout, data, alg, local)
    trainer.place(torch.device("meta"))
    assert trainer.x_train.device.type == "meta" and trainer.y_train.device.type == "meta"
    meta = torch.device("meta")
    params = layout.flatten(module).to(meta)
    server = {k: v.to(meta) for k, v in alg.init_server_state(layout.numel).items()}
    idx, steps = trainer.schedule(clients, 1, 0)
    with trainer._on_device():
        result = trainer.run_steps(clients, params, server, [{} for _ in clients], idx, steps)
    tensors = [result.deltas, result.train_loss, result.num_steps, result.num_samples,
               *result.uploads.values(), *(v for st in result.client_states for v in st.values())]
    assert all(t.device.type == "meta" for t in tensors)
    assert result.deltas.shape == (len(clients), layout.numel)


def test_bf16_autocast_trains_close_to_fp32():
    from koinon import Federation
    from koinon.data.datasets import digits

    data = partition_dataset(digits(0, 0.2, 10), "iid", 10, seed=0)
    accuracy = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        fed = Federation(module, data, local=LocalTraining(epochs=2, batch_size=16, lr=0.1),
                         runtime={"name": "vectorized", "precision": precision}, clients_per_round=5)
        fed.fit(8)
        accuracy[precision] = fed.evaluate()[0]
        if precision == "bf16":
            assert fed.runtime.trainer._manual is None  # autocast needs autograd's path
    assert accuracy["fp32"] > 0.85
    assert abs(accuracy["bf16"] - accuracy["fp32"]) < 0.03, accuracy


@gpu
@pytest.mark.parametrize("runtime", ["inprocess", "vectorized"])
def test_cuda_equals_cpu(runtime):
    data = _data((1, 6, 6))
    out = {}
    for device in ("cpu", "cuda"):
        module = _cnn()
        layout = Layout.from_module(module)
        trainer = CohortTrainer(module, layout, data, CLIENT_ALGORITHMS.get("scaffold")(),
                                LocalTraining(epochs=2, batch_size=4, lr=0.1, momentum=0.9))
        rt = RUNTIMES.build(runtime, {"device": device}, "runtime")
        rt.setup(trainer)
        out[device] = rt.train([0, 2, 4], layout.flatten(module), {}, [{}, {}, {}], 1, 0)
    assert out["cuda"].deltas.device.type == "cpu"
    torch.testing.assert_close(out["cuda"].deltas, out["cpu"].deltas, atol=1e-4, rtol=1e-3)


def test_ray_device_options_are_checked_before_ray_starts():
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match="needs runtime.gpus > 0"):
        RUNTIMES.build("ray", {"device": "cuda"}, "runtime")
    with pytest.raises(ConfigError, match="allowed: cpu, cuda, cuda:N, auto"):
        RUNTIMES.build("ray", {"device": "tpu"}, "runtime")
    rt = RUNTIMES.build("ray", {"device": "cuda:0", "gpus": 0.5}, "runtime")
    assert (rt.device, rt.gpus) == ("cuda:0", 0.5)  # resolved in each actor, among its own GPUs
