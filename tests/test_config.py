"""`Config`: the resolved config a run records, `--set` overrides, and one-line errors for
unknown keys and wrappers without an inner codec."""

import pytest
import tomli_w

from koinon.aggregate import AGGREGATORS, PRE_AGGREGATORS
from koinon.attacks import ATTACKS
from koinon.cli import main
from koinon.clients import CLIENT_ALGORITHMS
from koinon.compress import CODECS
from koinon.config import Config, tomllib
from koinon.data import DATASETS
from koinon.deploy.server import _changed_keys
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation
from koinon.models import MODELS
from koinon.runtime import RUNTIMES

SMALL = {"seed": 1, "data": {"num_clients": 10}, "server": {"rounds": 2, "clients_per_round": 5}}


def _cfg(**sections) -> Config:
    return Config.from_dict({**SMALL, **sections})


def _reloaded(cfg: Config) -> Config:
    return Config.from_dict(tomllib.loads(cfg.to_toml()))


def test_run_help_lists_diloco_keys_and_where_component_options_are(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for line in ("diloco.inner_steps = 50", "diloco.outer_lr = 0.7", "diloco.fragments = 1",
                 "client.lr = 0.05", "deploy.max_update_norm = 0.0", "koinon list"):
        assert line in text, line
    assert "(client.algorithm)" in text and "inner" in text


def test_list_shows_component_options_with_defaults(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for piece in ("ratio=0.01", "memory_mb=2048", "radius=100.0", "epsilon=0.001", "hidden=[64]"):
        assert piece in text, piece


def test_resolved_config_records_every_component_default():
    cfg = _cfg(codec={"name": "ef", "inner": {"name": "zstd", "inner": "topk"}},
               downlink={"name": "int8", "delta": True}, aggregator={"name": "nnm+centered_clipping"},
               attack={"name": "sign_flip", "fraction": 0.2}, client={"algorithm": "worker_momentum"})
    build_federation(cfg)
    raw = tomllib.loads(cfg.to_toml())
    assert raw["codec"] == {"name": "ef", "inner": {"name": "zstd", "level": 3, "inner": {
        "name": "topk", "ratio": 0.01, "values": "fp32", "sampled": False}}}
    assert raw["downlink"] == {"name": "int8", "delta": True, "block": 0, "stochastic": False}
    # num_byzantine is derived from attack.fraction (1 of 5), so it is not written as a default
    assert raw["aggregator"] == {"name": "nnm+centered_clipping", "radius": 100.0, "iterations": 1}
    assert raw["runtime"] == {"name": "vectorized", "memory_mb": 2048, "max_chunk": 0, "threads": 0,
                              "device": "cpu", "precision": "fp32"}
    assert raw["attack"] == {"name": "sign_flip", "fraction": 0.2, "scale": 1.0, "of": "own"}
    assert raw["client"]["beta"] == 0.9 and raw["model"] == {"name": "mlp", "hidden": [64]}
    assert "diloco" not in raw


def test_a_resolved_config_resolves_to_itself_and_a_restart_sees_no_change():
    cfg = _cfg(codec={"name": "ef21", "inner": "qsgd"}, aggregator={"name": "trimmed_mean"},
               attack={"name": "alie", "fraction": 0.2}, client={"algorithm": "ditto", "lam": 0.5})
    build_federation(cfg)
    again = _reloaded(cfg)
    build_federation(again)
    assert again.to_dict() == cfg.to_dict() and again.to_toml() == cfg.to_toml()
    assert _changed_keys(cfg.to_toml(), again) == []
    # an older stored config with an empty [diloco] table compares equal as well
    assert _changed_keys(cfg.to_toml() + "\n[diloco]\n", again) == []


@pytest.mark.parametrize("registry, context", [
    (CODECS, ("layout",)), (AGGREGATORS, ("num_byzantine",)), (PRE_AGGREGATORS, ("num_byzantine",)),
    (ATTACKS, ()), (RUNTIMES, ()), (MODELS, ("input_shape", "num_classes")), (CLIENT_ALGORITHMS, ("mu",)),
    (DATASETS, ("seed", "test_fraction", "num_clients")),
])
def test_every_components_defaults_are_toml_and_resolve_to_themselves(registry, context):
    for name in registry.names():
        resolved = registry.resolve(name, {}, context)
        assert not set(context) & set(resolved)
        assert tomllib.loads(tomli_w.dumps(resolved)) == resolved, name
        assert registry.resolve(name, resolved, context) == resolved, name


def test_user_options_win_over_defaults_and_lists_are_copies():
    resolved = MODELS.resolve("mlp", {}, ("input_shape", "num_classes"))
    resolved["hidden"].append(1)
    assert MODELS.resolve("mlp", {}, ("input_shape", "num_classes"))["hidden"] == [64]
    assert CODECS.resolve("topk", {"ratio": 0.1}, ("layout",)) == {"ratio": 0.1, "values": "fp32", "sampled": False}


def test_diloco_table_only_for_diloco_runs_and_set_still_reaches_it():
    assert "diloco" not in Config().to_dict()
    assert Config().with_overrides({"diloco.workers": 2}).diloco.options == {"workers": 2}
    diloco = Config().with_overrides({"topology.name": "diloco"})
    assert diloco.to_dict()["diloco"] == {}


def test_changing_a_component_drops_its_recorded_options_and_keeps_fixed_keys():
    cfg = _cfg(client={"algorithm": "ditto", "lam": 0.5, "lr": 0.1}, attack={"name": "ipm", "fraction": 0.2},
               codec={"name": "topk"})
    build_federation(cfg)
    other = _reloaded(cfg).with_overrides({"client.algorithm": "fedavg", "attack.name": "alie",
                                          "codec.name": "int8"})
    assert other.client.options == {} and other.client.lr == 0.1
    assert other.attack.options == {} and other.attack.fraction == 0.2
    assert other.codec.options == {}
    build_federation(other)  # no option of the old components is left to be refused


@pytest.mark.parametrize("name", ["ef", "ef21", "econtrol", "zstd"])
@pytest.mark.parametrize("section", ["codec", "downlink"])
def test_a_wrapper_without_inner_is_a_one_line_error(name, section):
    with pytest.raises(ConfigError) as err:
        build_federation(_cfg(**{section: {"name": name}}))
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{section} (codec {name!r}): inner is not set")
    assert "allowed: a codec name (" in text and "topk" in text


@pytest.mark.parametrize("section, key, needles", [
    ("client", "lrr", ["unknown key client.lrr", "algorithm, epochs, steps, batch_size, lr,", "mu"]),
    ("client", "epsilonn", ["unknown key client.epsilonn", "lr_warmup, mu"]),
    ("attack", "fractoin", ["unknown key attack.fractoin", "allowed: name, fraction"]),
    ("downlink", "delt", ["unknown key downlink.delt", "allowed: name, delta"]),
    ("data", "alfa", ["unknown key data.alfa", "allowed: name, partition, alpha"]),
])
def test_an_unknown_key_in_a_section_with_fixed_keys_lists_them(section, key, needles):
    with pytest.raises(ConfigError) as err:
        build_federation(_cfg(**{section: {key: 1}}))
    text = str(err.value)
    assert "(none)" not in text
    for needle in needles:
        assert needle in text, text


def test_the_client_typo_lists_the_algorithms_options_once():
    with pytest.raises(ConfigError) as err:
        build_federation(_cfg(client={"algorithm": "spsa", "epsilonn": 0.1}))
    assert str(err.value).endswith("lr_warmup, mu, epsilon, clip")


def test_an_unknown_key_in_a_section_without_options_lists_its_keys():
    with pytest.raises(ConfigError, match=r"unknown key server.round; allowed: optimizer, lr, .*rounds"):
        Config.from_dict({"server": {"round": 3}})
