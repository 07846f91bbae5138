"""The Python API as a user with their own module and tensors meets it: the trained model comes
back, components by name / dict / object are checked before round 1, data and model are
checked, `fit` calls back, writes a run folder and resumes it."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import koinon as kn
from koinon.errors import ConfigError, KoinonError


class TwoLayer(nn.Module):
    """A user's own module (not an nn.Sequential, so no koinon fast path knows it)."""

    def __init__(self, d_in: int = 6, d_out: int = 3) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, 16)
        self.head = nn.Linear(16, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def _tensors(n: int = 240, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes
    return x, y


def _data(num_clients: int = 8):
    x, y = _tensors()
    ds = kn.Dataset.from_tensors(x[:200], y[:200], x[200:], y[200:])
    return kn.partition_dataset(ds, "iid", num_clients, seed=0)


def _fed(model=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("clients_per_round", 4)
    kw.setdefault("local", kn.LocalTraining(lr=0.1, steps=5))
    return kn.Federation(model or TwoLayer(), _data(), **kw)


def test_after_fit_the_users_module_holds_the_trained_weights_and_save_loads(tmp_path):
    model = TwoLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fed = _fed(model)
    fed.fit(4, eval_every=4)
    x_test, y_test = fed.data.dataset.x_test, fed.data.dataset.y_test
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy == pytest.approx(fed.evaluate()[0])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = fed.save(tmp_path / "m.safetensors")
    fresh = TwoLayer()
    fresh.load_state_dict(load_file(str(path)))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_components_by_name_dict_or_object_give_the_same_model():
    by_name = _fed(codec="fp16", aggregator="median")
    by_dict = _fed(codec={"name": "fp16"}, aggregator={"name": "median"})
    by_object = _fed(codec=by_name.codec, aggregator=by_name.aggregator)
    for fed in (by_name, by_dict, by_object):
        fed.fit(2, eval_every=2)
    assert torch.equal(by_name.params, by_dict.params)
    assert torch.equal(by_name.params, by_object.params)


def test_a_dict_components_options_are_used_and_checked():
    fed = _fed(codec={"name": "topk", "ratio": 0.5})
    assert fed.codec.max_count == 82  # ceil(0.5 * 163 parameters)
    with pytest.raises(ConfigError, match=r"codec.rate: not an option of codec 'topk'; allowed: .*ratio"):
        _fed(codec={"name": "topk", "rate": 0.1})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        _fed(codec={"ratio": 0.1})
    with pytest.raises(ConfigError, match="codec: expected a registered name.*has no encode"):
        _fed(codec=0.1)


def test_robust_rules_get_f_from_the_attack_settings():
    fed = _fed(aggregator="krum", attack="sign_flip", byzantine_fraction=0.25, clients_per_round=8)
    assert fed.aggregator.num_byzantine == 2  # round(0.25 * 8 clients a round)
    assert _fed(aggregator={"name": "krum", "num_byzantine": 0}, attack="sign_flip",
                byzantine_fraction=0.25).aggregator.num_byzantine == 0
    with pytest.raises(ConfigError, match="clients_per_round = 8: bulyan needs"):
        _fed(aggregator="bulyan", attack="sign_flip", byzantine_fraction=0.25, clients_per_round=8)
    with pytest.raises(ValueError, match="needs an attack"):
        _fed(byzantine_fraction=0.25)


def test_data_and_model_are_checked_before_round_one():
    x, y = _tensors()
    with pytest.raises(ValueError, match="x_train has 200 samples but y_train has 199"):
        kn.Dataset.from_tensors(x[:200], y[:199], x[200:], y[200:])
    with pytest.raises(ValueError, match="y_train has dtype torch.float32 with fractional values"):
        kn.Dataset.from_tensors(x[:200], y[:200].float() + 0.5, x[200:], y[200:])
    whole = kn.Dataset.from_tensors(x[:200], y[:200].float(), x[200:], y[200:])  # whole floats: classes
    assert whole.y_train.dtype == torch.long
    with pytest.raises(ValueError, match=r"cannot take the data's inputs \(samples of shape \[6\]"):
        _fed(TwoLayer(d_in=5))
    with pytest.raises(ValueError, match="the model has 2 outputs per sample but the data has 3 classes"):
        _fed(TwoLayer(d_out=2))


def test_unknown_partition_options_are_refused():
    x, y = _tensors()
    ds = kn.Dataset.from_tensors(x[:200], y[:200], x[200:], y[200:])
    with pytest.raises(ValueError, match="'alfa' is not an option of partition 'dirichlet'; allowed: alpha"):
        kn.partition_dataset(ds, "dirichlet", 4, seed=0, options={"alfa": 0.5})
    with pytest.raises(ValueError, match="not an option of partition 'iid'"):
        kn.partition_dataset(ds, "iid", 4, seed=0, options={"alpha": 0.5})


def test_fit_calls_back_each_round_and_shows_progress(capsys):
    seen = []
    results = _fed().fit(3, eval_every=2, callbacks=[seen.append], progress=True)
    assert seen == results and [r.round for r in seen] == [1, 2, 3]
    assert [r.test_accuracy is not None for r in seen] == [False, True, True]
    assert "3/3" in capsys.readouterr().err


def test_fit_into_a_folder_writes_what_koinon_run_writes_and_resumes_bit_for_bit(tmp_path):
    straight = _fed()
    summary_dir = tmp_path / "straight"
    straight.fit(4, eval_every=2, out=summary_dir)
    for name in ("federation.json", "metrics.jsonl", "checkpoint.json", "model.safetensors",
                 "accuracy.png", "summary.json"):
        assert (summary_dir / name).is_file(), name
    lines = [json.loads(ln) for ln in (summary_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3, 4] and all("wall_s" in m for m in lines)
    summary = json.loads((summary_dir / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["model_sha256"] == kn.records.model_sha256(straight.params)

    part = tmp_path / "part"
    interrupted = _fed()
    interrupted.fit(2, eval_every=2, out=part)  # as if the script stopped after round 2 of 4
    (part / "summary.json").unlink()
    with pytest.raises(ConfigError, match="not empty"):
        _fed().fit(4, eval_every=2, out=part)
    resumed = _fed()
    results = resumed.fit(4, eval_every=2, out=part, resume=True)
    assert [r.round for r in results] == [3, 4]
    assert torch.equal(resumed.params, straight.params)
    assert json.loads((part / "summary.json").read_text())["model_sha256"] == summary["model_sha256"]
    with pytest.raises(KoinonError, match="different federation"):
        _fed(codec="fp16").fit(4, out=part, resume=True)


def test_client_side_evaluation_on_held_out_splits_and_a_server_evaluate_fn():
    calls = []

    def evaluate_fn(model, round_index):
        calls.append(round_index)
        return {"server_probe": float(model.head.bias.detach().sum())}

    fed = _fed(evaluation=kn.Evaluation(holdout=0.25, evaluate_fn=evaluate_fn))
    assert [len(ix) for ix in fed.holdout] == [6] * 8  # a quarter of each client's 25 samples, rounded
    assert all(set(h.tolist()).isdisjoint(t.tolist()) for h, t in zip(fed.holdout, fed.data.client_indices))
    last = fed.fit(2, eval_every=2)[-1]
    x = fed.params
    assert calls == [2] and last.extra["server_probe"] == pytest.approx(float(fed.layout.views(x)["head.bias"].sum()))
    m = last.extra
    assert m["client_eval_clients"] == 8
    assert m["client_accuracy_worst"] <= m["client_accuracy_p10"] <= m["client_accuracy_mean"] <= 1
    # Equal held-out sizes: the weighted mean is the plain mean.
    assert m["client_accuracy_weighted"] == pytest.approx(m["client_accuracy_mean"])
    sampled = _fed(evaluation=kn.Evaluation(holdout=0.25, clients=3)).fit(1)[-1]
    assert sampled.extra["client_eval_clients"] == 3
    assert "client_accuracy_mean" not in _fed().fit(1)[-1].extra  # off unless asked for


def _python_block(path: str, index: int) -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / path).read_text()
    return text.split("```python\n")[index].split("```")[0]


@pytest.mark.parametrize("path,index,rounds", [("README.md", 1, "fit(50"), ("docs/from-flower.md", 2, "fit(30")])
def test_the_documented_python_blocks_run_as_written(path, index, rounds, tmp_path, monkeypatch):
    code = _python_block(path, index)
    assert rounds in code and "import koinon as kn" in code
    monkeypatch.chdir(tmp_path)  # the blocks write runs/... where they are run
    exec(compile(code.replace(rounds, "fit(2"), path, "exec"), {})
    assert list((tmp_path / "runs").glob("*/summary.json"))
