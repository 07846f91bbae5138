"""FedConv's learnt kernels: the server's public data, the compression and dilation kernels'
learning steps against hand-written cases, the server-side dilation, both local runtimes, one
client, and bad input refused in one line."""

import pytest
import torch
from torch import nn

import koinon as kn
from koinon.data import FederatedData
from koinon.local import LocalTraining
from koinon.params import Layout
from koinon.personal import FedConv
from koinon.personal.fedconv import (
    compress,
    dilate,
    fixed_kernels,
    learn_compression,
    learn_dilation,
    plan,
    sub_forward,
    widths_of,
)
from koinon.topology.evaluation import Evaluation


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _digits(num_clients=8, partition="dirichlet"):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    return kn.partition_dataset(ds, partition, num_clients, seed=0)


def _norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 10))


def test_fixed_kernels_as_tensors_are_the_fixed_compression_and_dilation():
    model = kn.build_model("cnn", {"channels": 4}, (1, 8, 8), 10, seed=0)
    layout = Layout.from_module(model)
    spec = plan(model, layout)
    views = layout.views(layout.flatten(model))
    k = fixed_kernels(spec, 2)
    sub, sub_k = compress(views, spec, 2), compress(views, spec, 2, k)
    assert all(torch.allclose(sub[n], sub_k[n], atol=1e-6) for n in sub)
    back, back_k = dilate(sub, spec, 2), dilate(sub, spec, 2, k)
    assert all(torch.allclose(back[n], back_k[n], atol=1e-6) for n in back)


def test_learnt_kernels_convolve_each_group_by_hand():
    model = _mlp()
    layout = Layout.from_module(model)
    spec = plan(model, layout)
    w1, b1 = torch.arange(12.0).view(4, 3), torch.tensor([1.0, 3.0, 5.0, 9.0])
    w2, b2 = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, -1.0]]), torch.tensor([0.5, -0.5])
    full = {"0.weight": w1, "0.bias": b1, "2.weight": w2, "2.bias": b2}
    a, b = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    sub = compress(full, spec, 2, {"a": [a], "b": [b]})
    # unit g = 2 * unit(2g) - unit(2g + 1); column g = 0.5 * column(2g) + 3 * column(2g + 1)
    assert torch.equal(sub["0.weight"], torch.tensor([[-3.0, -2.0, -1.0], [3.0, 4.0, 5.0]]))
    assert torch.equal(sub["0.bias"], torch.tensor([-1.0, 1.0]))
    assert torch.equal(sub["2.weight"], torch.tensor([[6.5, 13.5], [3.0, -3.0]]))
    assert torch.equal(sub["2.bias"], b2)
    c, d = torch.tensor([1.0, 2.0]), torch.tensor([0.25, 0.75])
    back = dilate(sub, spec, 2, {"c": [c], "d": [d]})
    # unit 2g + j = c_j * sub-unit g; column 2g + j = d_j * sub-column g
    assert torch.equal(back["0.bias"], torch.tensor([-1.0, -2.0, 1.0, 2.0]))
    assert torch.equal(back["0.weight"][1], torch.tensor([-6.0, -4.0, -2.0]))
    assert torch.equal(back["2.weight"], torch.tensor([[1.625, 4.875, 3.375, 10.125], [0.75, 2.25, -0.75, -2.25]]))
    # one value per unit (kernel_shape = 'unit'): unit g = a_{2g} unit(2g) + a_{2g+1} unit(2g + 1)
    au, bu = torch.tensor([2.0, -1.0, 1.0, 0.0]), torch.tensor([0.5, 3.0, 1.0, 1.0])
    sub_u = compress(full, spec, 2, {"a": [au], "b": [bu]})
    assert torch.equal(sub_u["0.weight"], torch.tensor([[-3.0, -2.0, -1.0], [6.0, 7.0, 8.0]]))
    assert torch.equal(sub_u["2.weight"], torch.tensor([[6.5, 7.0], [3.0, -1.0]]))
    back_u = dilate(sub_u, spec, 2, {"c": [torch.tensor([1.0, 2.0, 0.0, 1.0])], "d": [torch.ones(4)]})
    assert torch.equal(back_u["0.bias"], torch.tensor([-1.0, -2.0, 0.0, 5.0]))
    assert fixed_kernels(spec, 2, widths_of(spec, layout))["a"][0].shape == (4,)


def _by_hand_sub_logits(w1, b1, w2, b2, a, b, x):
    """The compressed MLP's logits, written out for r = 2."""
    h1 = torch.stack([a[0] * w1[0] + a[1] * w1[1], a[0] * w1[2] + a[1] * w1[3]])
    hb = torch.stack([a[0] * b1[0] + a[1] * b1[1], a[0] * b1[2] + a[1] * b1[3]])
    o = torch.stack([b[0] * w2[:, 0] + b[1] * w2[:, 1], b[0] * w2[:, 2] + b[1] * w2[:, 3]], dim=1)
    return torch.relu(x @ h1.T + hb) @ o.T + b2


def test_compression_learning_step_is_adam_on_the_public_loss():
    """One step: Adam's first step moves each kernel value by its rate against its gradient's
    sign (m / sqrt(v) = sign(g)), the rate lr times the kernel's starting size (1/r for the
    averaging kernel a, 1 for the summing kernel b); the gradient is that of the hand-written
    compressed model's loss."""
    model = _mlp()
    layout = Layout.from_module(model)
    spec = plan(model, layout)
    views = layout.views(layout.flatten(model))
    torch.manual_seed(5)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    k = learn_compression(model, views, spec, 2, x, y, steps=1, lr=0.1)
    a = torch.full((2,), 0.5, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    w1, b1, w2, b2 = (views[n].detach() for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    loss = nn.functional.cross_entropy(_by_hand_sub_logits(w1, b1, w2, b2, a, b, x), y)
    ga, gb = torch.autograd.grad(loss, [a, b])
    assert torch.allclose(k["a"][0], 0.5 - 0.05 * ga.sign(), atol=1e-5)
    assert torch.allclose(k["b"][0], 1.0 - 0.1 * gb.sign(), atol=1e-5)
    # more steps: the compressed model fits the public data better than with the fixed kernels
    k20 = learn_compression(model, views, spec, 2, x, y, steps=20, lr=0.05)
    before = nn.functional.cross_entropy(sub_forward(model, compress(views, spec, 2), x), y)
    after = nn.functional.cross_entropy(sub_forward(model, compress(views, spec, 2, k20), x), y)
    assert after < before


def test_dilation_learning_step_is_adam_on_the_aggregated_models_public_loss():
    model = _mlp()
    layout = Layout.from_module(model)
    spec = plan(model, layout)
    base = layout.flatten(model).detach()
    torch.manual_seed(6)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    full_change = layout.views(0.3 * torch.randn(layout.numel))
    sub_change = {"0.weight": torch.randn(2, 3), "0.bias": torch.randn(2), "2.weight": torch.randn(2, 2),
                  "2.bias": torch.randn(2)}
    weights = torch.tensor([3.0, 1.0])
    k = learn_dilation(model, layout, base, [full_change, sub_change], [1, 2], weights, spec, x, y, steps=1, lr=0.1)
    c = torch.ones(2, requires_grad=True)
    d = torch.full((2,), 0.5, requires_grad=True)
    v = layout.views(base)
    s = sub_change  # unit 2g + j = c_j sub-unit g; column 2g + j = d_j sub-column g; weights 3/4 and 1/4
    w1 = v["0.weight"] + 0.75 * full_change["0.weight"] + 0.25 * torch.stack(
        [c[0] * s["0.weight"][0], c[1] * s["0.weight"][0], c[0] * s["0.weight"][1], c[1] * s["0.weight"][1]])
    b1 = v["0.bias"] + 0.75 * full_change["0.bias"] + 0.25 * torch.stack(
        [c[0] * s["0.bias"][0], c[1] * s["0.bias"][0], c[0] * s["0.bias"][1], c[1] * s["0.bias"][1]])
    w2 = v["2.weight"] + 0.75 * full_change["2.weight"] + 0.25 * torch.stack(
        [d[0] * s["2.weight"][:, 0], d[1] * s["2.weight"][:, 0], d[0] * s["2.weight"][:, 1],
         d[1] * s["2.weight"][:, 1]], dim=1)
    b2 = v["2.bias"] + 0.75 * full_change["2.bias"] + 0.25 * s["2.bias"]
    loss = nn.functional.cross_entropy(torch.relu(x @ w1.T + b1) @ w2.T + b2, y)
    gc, gd = torch.autograd.grad(loss, [c, d])
    assert set(k) == {2}
    assert torch.allclose(k[2]["c"][0], 1.0 - 0.1 * gc.sign(), atol=1e-5)
    assert torch.allclose(k[2]["d"][0], 0.5 - 0.05 * gd.sign(), atol=1e-5)


def _fed(algorithm, runtime="inprocess", data=None, clients_per_round=4, **kw):
    return kn.Federation(_norm_model(), data or _digits(), local=LocalTraining(lr=0.1, epochs=1),
                         clients_per_round=clients_per_round, seed=1, algorithm=algorithm, runtime=runtime, **kw)


def test_public_samples_are_held_by_no_client_and_the_server_dilates_with_learnt_kernels():
    data = _digits()
    alg = FedConv(budgets=[1.0, 0.5], kernels="learnt", kernel_steps=3)
    fed = _fed(alg, data=data, public_samples=40)
    module, layout, x, y = alg.public
    assert len(x) == 40 and sum(int(s) for s in fed.data.sizes) == sum(int(s) for s in data.sizes) - 40
    owned = torch.cat(fed.data.client_indices)
    ds = fed.data.dataset
    held = {tuple(r.tolist()) for r in ds.x_train[owned].flatten(1)}
    # every public sample is a training sample that no client holds (digits has no duplicate rows here)
    assert not any(tuple(r.tolist()) in held for r in x.flatten(1))
    # the server hook: a budget-1 update unchanged, a budget-1/2 update re-dilated by learnt kernels
    spec = plan(module, layout)
    torch.manual_seed(0)
    sub = {n: 0.1 * torch.randn_like(t) for n, t in compress(layout.views(fed.params), spec, 2).items()}
    row1 = 0.1 * torch.randn(layout.numel)
    row2 = torch.zeros(layout.numel)
    for n, v in layout.views(row2).items():
        v.copy_(dilate(sub, spec, 2)[n])
    out = alg.server_rows({}, fed.params, torch.stack([row1, row2]), torch.tensor([5.0, 7.0]), [0, 1])
    assert torch.equal(out[0], row1)
    k = learn_dilation(module, layout, fed.params, [layout.views(row1), sub], [1, 2], torch.tensor([5.0, 7.0]),
                       spec, x, y, 3, alg.kernel_lr)
    expected = dilate(sub, spec, 2, k[2])
    assert all(torch.allclose(layout.views(out[1])[n], expected[n], atol=1e-6) for n in expected)
    assert not torch.allclose(out[1], row2)
    # without public data there is no server hook: the FedAvg protocol as it was
    assert not hasattr(FedConv(budgets=[0.5]), "server_rows")


def test_both_local_runtimes_give_the_same_models_with_learnt_kernels():
    feds = []
    for runtime in ("inprocess", "vectorized"):
        fed = _fed(FedConv(budgets=[1.0, 0.5, 0.25], adapt_steps=3, kernels="learnt", kernel_steps=3), runtime,
                   public_samples=30, evaluation=Evaluation(holdout=0.2, new_clients=2))
        fed.fit(2, eval_every=2)
        feds.append(fed)
    a, b = feds
    assert torch.allclose(a.params, b.params, atol=1e-5)
    ids = list(range(a.data.num_clients))
    x = a.data.dataset.x_train[:50]
    pa, pb = (f.algorithm.personal_predictors(f.runtime.trainer, ids, f.params, f.server.server_state,
                                              [{} for _ in ids], 0, 2) for f in feds)
    for fa, fb in zip(pa, pb):
        assert torch.allclose(fa(x), fb(x), atol=1e-4)


def test_with_one_full_budget_client_and_public_data_the_model_is_local_training():
    full = _digits(6, "shards")
    data = FederatedData(full.dataset, [full.client_indices[0]])
    fed = kn.Federation(_norm_model(), data, local=LocalTraining(lr=0.1, batch_size=16, epochs=1),
                        clients_per_round=1, seed=0, algorithm=FedConv(budgets=[1.0], kernels="learnt"), public_samples=20,
                        runtime="inprocess")
    w = fed.params.clone()
    fed.fit(3)
    trainer = fed.runtime.trainer
    from koinon.clients import LocalSGD

    for r in range(3):
        idx, steps = trainer.schedule([0], 0, r)
        w = w + trainer.run_steps([0], w, {}, [{}], idx, steps, algorithm=LocalSGD()).deltas[0]
    assert torch.allclose(fed.params, w, atol=1e-5)


@pytest.mark.parametrize(("options", "match"), [
    ({"kernels": "learned"}, "client.kernels"), ({"kernels": None}, "client.kernels"),
    ({"kernel_steps": 0}, "kernel_steps"), ({"kernel_steps": 2.5}, "kernel_steps"),
    ({"kernel_lr": 0}, "kernel_lr"), ({"kernel_lr": "fast"}, "kernel_lr"), ({"kernel_shape": "big"}, "kernel_shape"),
])
def test_bad_options_are_refused_in_one_line(options, match):
    with pytest.raises(ValueError, match=match) as err:
        FedConv(budgets=[0.5], **options)
    assert "\n" not in str(err.value)


def test_bad_public_samples_are_refused_naming_the_key(tmp_path):
    for bad in (100_000, -1, "100", True):
        with pytest.raises(ValueError, match=r"data.public_samples = .*: must be between 0 and \d+"):
            _fed(FedConv(budgets=[0.5], kernels="learnt"), public_samples=bad)
    with pytest.raises(ValueError, match="client.kernels = 'learnt' needs the server's public data"):
        _fed(FedConv(budgets=[0.5], kernels="learnt"))
    cfg = kn.Config()
    cfg.data.name, cfg.data.num_clients = "digits", 6
    cfg.model.name, cfg.model.options = "mlp_norm", {"hidden": [16]}
    cfg.server.rounds, cfg.server.clients_per_round = 1, 3
    cfg.client.algorithm, cfg.client.options = "fedconv", {"budgets": [1.0, 0.5], "kernels": "learnt"}
    cfg.data.public_samples = 10_000
    with pytest.raises(kn.ConfigError, match="data.public_samples") as err:
        kn.run_experiment(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)
    cfg.data.public_samples = 0
    with pytest.raises(kn.ConfigError, match="data.public_samples > 0"):
        kn.run_experiment(cfg, tmp_path / "none", progress=False)
    cfg.data.public_samples = 30
    cfg.client.options = {"budgets": [1.0, 0.5], "kernels": "learnt", "kernel_steps": 2}
    assert kn.run_experiment(cfg, tmp_path / "ok", progress=False)["final_accuracy"] > 0.0


@pytest.mark.parametrize("keys", [{"privacy.secagg": True}, {"privacy.dp": "central", "privacy.noise_multiplier": 1.0},
                                  {"schedule.name": "fedbuff", "clock.speed": "constant"}, {"ledger.contribution": "loo"}])
def test_learnt_kernels_refuse_what_hides_or_skips_each_update(tmp_path, keys):
    cfg = kn.Config().with_overrides({
        "data.name": "digits", "data.num_clients": 6, "model.name": "mlp_norm", "model.hidden": [16],
        "server.rounds": 1, "server.clients_per_round": 3, "client.algorithm": "fedconv",
        "client.budgets": [1.0, 0.5], "client.kernels": "learnt", "data.public_samples": 20, **keys})
    with pytest.raises(kn.ConfigError, match="fedconv|public_samples|server_rows") as err:
        kn.run_experiment(cfg, tmp_path / "run", progress=False)
    assert "\n" not in str(err.value)


def test_koinon_server_refuses_learnt_kernels_in_one_line():
    from koinon.deploy.server import check_deployable
    from koinon.experiment.runner import build_federation

    base = {"data.name": "digits", "data.num_clients": 6, "model.name": "mlp_norm", "model.hidden": [16],
            "server.rounds": 1, "server.clients_per_round": 3, "client.algorithm": "fedconv",
            "client.budgets": [1.0, 0.5]}
    cfg = kn.Config().with_overrides({**base, "client.kernels": "learnt", "data.public_samples": 20})
    with pytest.raises(kn.ConfigError, match="kernels = 'fixed'|data.public_samples"):
        check_deployable(build_federation(cfg), cfg)
    public = kn.Config().with_overrides({**base, "data.public_samples": 20})
    with pytest.raises(kn.ConfigError, match="data.public_samples"):
        check_deployable(build_federation(public), public)
    fixed = kn.Config().with_overrides({**base, "client.kernels": "fixed"})
    assert check_deployable(build_federation(fixed), fixed) is not None


def test_submodel_uploads_send_only_the_sub_model_and_train_the_same_model():
    """`upload = 'submodel'`: a budget-1/r client sends its sub-model change (float32), counted;
    the server reads it back exactly, so the model is that of full-size uploads."""
    feds = {}
    for upload in ("full", "submodel"):
        fed = _fed(FedConv(budgets=[1.0, 0.5, 0.25], upload=upload), clients_per_round=8)
        fed.fit(2)
        feds[upload] = fed
    assert torch.allclose(feds["full"].params, feds["submodel"].params, atol=1e-6)
    fed = feds["submodel"]
    spec, layout = plan(fed.runtime.trainer.module, fed.layout), fed.layout
    sub_numel = {r: sum(t.numel() for t in compress(layout.views(fed.params), spec, r).values()) for r in (1, 2, 4)}
    per_round = sum(4 * sub_numel[[1, 2, 4][c % 3]] for c in range(8))
    assert fed.uplink_total == 2 * per_round < feds["full"].uplink_total == 2 * 8 * 4 * layout.numel
    # a payload of another size is refused in one line
    from koinon.errors import CodecError

    with pytest.raises(CodecError, match="budget-1/2 client sends") as err:
        fed.algorithm.decode_submodel(b"\0" * 12, 0, 0, 1, layout.numel, 0.1, 10)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="client.upload"):
        FedConv(upload="half")
    assert FedConv(kernels="learnt").upload == "submodel" and FedConv().upload == "full"


@pytest.mark.parametrize("topology", ["gossip", "diloco", "experts", "distillation"])
def test_public_data_needs_a_server(topology):
    from koinon.experiment.runner import build_federation

    cfg = kn.Config().with_overrides({"data.name": "digits", "data.num_clients": 6, "data.public_samples": 20,
                                      "server.clients_per_round": 3, "topology.name": topology})
    with pytest.raises(kn.ConfigError, match="data.public_samples .* needs topology.name = 'federated'"):
        build_federation(cfg)


def test_submodel_uploads_refuse_a_codec_in_one_line(tmp_path):
    """A sub-model upload is FedConv's own wire format: a codec would be named in the records but
    never applied, so it is refused; with full uploads the codec compresses the update."""
    base = {"data.name": "digits", "data.num_clients": 6, "model.name": "mlp_norm", "model.hidden": [16],
            "server.rounds": 1, "server.clients_per_round": 3, "client.algorithm": "fedconv",
            "client.budgets": [1.0, 0.5], "codec.name": "qsgd"}
    cfg = kn.Config().with_overrides({**base, "client.upload": "submodel"})
    with pytest.raises(kn.ConfigError, match="codec.name = 'qsgd'.*own wire format") as err:
        kn.run_experiment(cfg, tmp_path / "sub", progress=False)
    assert "\n" not in str(err.value)
    full = kn.Config().with_overrides({**base, "client.upload": "full"})
    assert kn.run_experiment(full, tmp_path / "full", progress=False)["final_accuracy"] > 0.0


def test_public_data_refuses_unseen_classes_in_one_line():
    from koinon.experiment.runner import build_federation

    cfg = kn.Config().with_overrides({"data.name": "digits", "data.num_clients": 6, "data.public_samples": 20,
                                      "data.unseen_classes": [8, 9], "server.clients_per_round": 3})
    with pytest.raises(kn.ConfigError, match="public_samples with data.unseen_classes") as err:
        build_federation(cfg)
    assert "\n" not in str(err.value)
