"""Pretrained starts: `model.init` reloads saved weights bit for bit, and refuses a file that
does not fit the model in one line; `koinon pretrain` writes a file a run starts from."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from koinon.cli import main
from koinon.config import Config
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.models import build_model
from koinon.models.pretrained import load_weights, save_weights
from koinon.params import Layout


def _mlp(seed: int, **options):
    return build_model("mlp", {"hidden": [16], **options}, (64,), 10, seed)


def test_saved_weights_reload_bit_for_bit(tmp_path):
    source = _mlp(0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 1e-3)
    path = save_weights(source, tmp_path / "w.safetensors")
    loaded = _mlp(1, init=str(path))  # another seed: different initial weights, then the file's
    a, b = Layout.from_module(source), Layout.from_module(loaded)
    assert torch.equal(a.flatten(source), b.flatten(loaded))
    assert not torch.equal(Layout.from_module(_mlp(1)).flatten(_mlp(1)), b.flatten(loaded))


def test_a_run_starts_from_the_file(tmp_path):
    path = save_weights(_mlp(7), tmp_path / "w.safetensors")
    cfg = Config().with_overrides({"model.hidden": [16], "model.init": str(path), "data.num_clients": 5,
                                   "server.clients_per_round": 2})
    fed = build_federation(cfg)
    file = load_file(str(path))
    assert torch.equal(fed.params, torch.cat([file[e.name].reshape(-1) for e in fed.layout.entries]))


@pytest.mark.parametrize("tensors, message", [
    ({"1.weight": torch.zeros(16, 64)}, "the file lacks"),
    ({"1.weight": torch.zeros(16, 64), "1.bias": torch.zeros(16), "3.weight": torch.zeros(10, 16),
      "3.bias": torch.zeros(10), "extra": torch.zeros(1)}, "which the model does not have"),
    ({"1.weight": torch.zeros(32, 64), "1.bias": torch.zeros(16), "3.weight": torch.zeros(10, 16),
      "3.bias": torch.zeros(10)}, r"1.weight has shape \[32, 64\] in the file, the model needs \[16, 64\]"),
])
def test_a_file_that_does_not_fit_is_refused_in_one_line(tmp_path, tensors, message):
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    model = _mlp(0)
    before = Layout.from_module(model).flatten(model)
    with pytest.raises(ConfigError, match=message) as info:
        load_weights(model, path)
    assert "\n" not in str(info.value)
    assert torch.equal(Layout.from_module(model).flatten(model), before)  # left as it was


def test_missing_or_garbled_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        _mlp(0, init=str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="not a safetensors file"):
        _mlp(0, init=str(bad))


def test_pretrain_command_writes_the_start_of_a_run(tmp_path, capsys):
    config = tmp_path / "pre.toml"
    config.write_text('[data]\nnum_clients = 4\n[model]\nname = "mlp"\nhidden = [8]\n'
                      '[client]\nsteps = 5\n[server]\nrounds = 2\n')
    out = tmp_path / "pre.safetensors"
    assert main(["pretrain", str(config), "--out", str(out)]) == 0
    assert "validation loss" in capsys.readouterr().out
    fresh = build_model("mlp", {"hidden": [8]}, (64,), 10, 0)
    trained = build_model("mlp", {"hidden": [8], "init": str(out)}, (64,), 10, 0)
    assert not torch.equal(Layout.from_module(fresh).flatten(fresh), Layout.from_module(trained).flatten(trained))
    assert main(["pretrain", str(config), "--out", str(tmp_path / "x.bin")]) == 2
    assert "expected a path ending in .safetensors" in capsys.readouterr().err


@pytest.mark.slow
def test_the_fine_tuning_examples_run_end_to_end(tmp_path, capsys):
    """examples/finetune: pretrain on the first plays, then LoRA on the others (a few steps)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "examples" / "finetune"
    base = tmp_path / "charlm.safetensors"
    short = ["--set", "server.rounds=1", "--set", "client.steps=2", "--set", "model.dim=16", "--set", "model.heads=2"]
    assert main(["pretrain", str(folder / "pretrain_shakespeare.toml"), "--out", str(base), *short]) == 0
    assert main(["run", str(folder / "lora.toml"), "--out", str(tmp_path / "run"), "--quiet", *short,
                 "--set", f"model.init={base}"]) == 0
    assert "uplink" in capsys.readouterr().out
