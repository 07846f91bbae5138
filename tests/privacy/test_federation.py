"""[privacy] in a simulated federation: keys and combinations checked in one line, secure
aggregation gives the plain model up to fixed point, DP spends what the accountant says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from koinon.config import Config, load_config
from koinon.errors import ConfigError
from koinon.experiment.runner import build_federation, run_experiment
from koinon.privacy import PrivacyBudgetExceeded, build_privacy
from koinon.privacy.accounting import epsilon_for


def small(**overrides) -> Config:
    cfg = Config()
    cfg = cfg.with_overrides({"data.num_clients": 20, "server.clients_per_round": 8, "server.rounds": 3,
                              "client.epochs": 1, "model.hidden": [16], **overrides})
    return cfg


def test_default_is_off() -> None:
    cfg = small()
    assert build_privacy(cfg, 20) is None
    assert build_federation(small()).server.privacy is None


@pytest.mark.parametrize("overrides, message", [
    ({"privacy.dp": "gauss"}, "allowed: none, central, local"),
    ({"privacy.dp": "central"}, "needs privacy.noise_multiplier > 0 or privacy.target_epsilon"),
    ({"privacy.noise_multiplier": 1.0}, "no effect with privacy.dp = 'none'"),
    ({"privacy.dp": "central", "privacy.noise_multiplier": 1.0, "privacy.delta": 2.0}, "privacy.delta"),
    ({"privacy.dp": "local", "privacy.noise_multiplier": 1.0, "privacy.target_quantile": 0.5}, "needs privacy.dp = 'central'"),
    ({"privacy.dp": "central", "privacy.noise_multiplier": 1.0, "privacy.target_quantile": 0.5,
      "privacy.clip_count_stddev": 0.1}, "clip_count_stddev"),
    ({"privacy.dp": "central", "privacy.noise_multiplier": 0.3, "privacy.target_epsilon": 1.0},
     "spends epsilon"),
    ({"privacy.secagg": True, "codec.name": "ef21", "codec.inner": "int8"}, "cannot be masked"),
    ({"privacy.secagg": True, "codec.name": "zstd", "codec.inner": {"name": "econtrol", "inner": "topk"}},
     "cannot be masked"),
    ({"privacy.secagg": True, "aggregator.name": "median"}, "needs individual updates"),
    ({"privacy.secagg": True, "client.algorithm": "scaffold"}, "uploads more than one"),
    ({"privacy.secagg": True, "attack.name": "sign_flip", "attack.fraction": 0.2}, "secure aggregation hides"),
    ({"privacy.secagg": True, "privacy.secagg_modulus_bits": 12}, "too small"),
    ({"privacy.secagg": True, "privacy.secagg_threshold": 0.3}, "secagg_threshold"),
    ({"privacy.secagg": True, "topology.name": "gossip"}, "needs topology.name = 'federated'"),
    ({"privacy.dp": "central", "privacy.noise_multiplier": 1.0, "aggregator.name": "krum"}, "replaces the mean"),
])
def test_bad_settings_are_one_line_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_federation(small(**overrides))
    assert "\n" not in str(info.value)


def test_unknown_privacy_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key privacy.epsilon"):
        small(**{"privacy.epsilon": 3.0})


def test_secure_aggregation_gives_the_plain_model_up_to_fixed_point() -> None:
    plain = build_federation(small())
    secure = build_federation(small(**{"privacy.secagg": True}))
    for _ in range(2):
        a, b = plain.run_round(evaluate=False), secure.run_round(evaluate=False)
    assert a.cohort == b.cohort and b.num_clients == 8 and b.extra["secagg_survivors"] == 8
    step = 1 / secure.server.privacy.secure.fp.scale
    assert 0 < float((plain.params - secure.params).abs().max()) < 4 * step
    # Bytes: the protocol's own messages, a little over the plain upload of float32 updates.
    assert a.uplink_bytes < b.uplink_bytes < 1.5 * a.uplink_bytes
    assert b.downlink_bytes > a.downlink_bytes


def test_quantized_codecs_are_summed_in_the_field() -> None:
    # Each client masks its int8 codec's quantized update; a 16-bit field sends 2 bytes per
    # coordinate where 32 bits send 4 (the other messages are the same), and sums the same.
    over = {"privacy.secagg": True, "privacy.secagg_max_weight": 1, "privacy.secagg_clip_range": 1.0}
    unquantized = build_federation(small(**over))
    wide = build_federation(small(**{"codec.name": "int8", **over}))
    narrow = build_federation(small(**{"codec.name": "int8", "privacy.secagg_modulus_bits": 16, **over}))
    a, b, c = (f.run_round(evaluate=False) for f in (unquantized, wide, narrow))
    assert b.applied and c.applied and c.extra["secagg_survivors"] == 8 and a.cohort == c.cohort
    assert b.uplink_bytes - c.uplink_bytes == 8 * 2 * (wide.layout.numel + 2)
    fine, coarse = (1 / f.server.privacy.secure.fp.scale for f in (wide, narrow))
    assert coarse > 100 * fine
    assert 0 < float((wide.params - narrow.params).abs().max()) < coarse + fine
    # What was summed is the int8 codec's output: it differs from the unquantized sum by more
    # than the field's rounding.
    assert float((wide.params - unquantized.params).abs().max()) > 10 * fine


def test_fedbuff_sums_each_buffer_securely() -> None:
    # Each full buffer is one SecAgg+ session of its clients, their updates scaled by staleness:
    # the server steps with the sum, FedBuff's plain step up to fixed point.
    over = {"clock.speed": "lognormal", "schedule.name": "fedbuff", "schedule.buffer": 4,
            "schedule.concurrency": 6}
    plain = build_federation(small(**over))
    secure = build_federation(small(**over, **{"privacy.secagg": True}))
    for _ in range(3):
        a, b = plain.run_round(evaluate=False), secure.run_round(evaluate=False)
        assert sorted(a.accepted) == sorted(b.accepted) and b.extra["secagg_survivors"] == 4
        assert a.uplink_bytes < b.uplink_bytes < 1.5 * a.uplink_bytes
    step = 1 / secure.federation.server.privacy.secure.fp.scale
    assert 0 < float((plain.params - secure.params).abs().max()) < 100 * step


def test_secure_aggregation_survives_dropouts() -> None:
    fed = build_federation(small(**{"privacy.secagg": True, "privacy.secagg_dropout": 0.25}))
    r = fed.run_round(evaluate=False)
    assert r.applied and r.extra["secagg_dropped"] == 2 and r.num_clients == 6
    assert len(r.missing) == 2 and set(r.included) | set(r.missing) == set(r.cohort)


def test_central_dp_spends_what_the_accountant_says(tmp_path) -> None:
    cfg = small(**{"privacy.dp": "central", "privacy.target_epsilon": 4.0, "privacy.noise_seed": 1})
    run_experiment(cfg, tmp_path / "run", progress=False)
    z = cfg.privacy.noise_multiplier  # calibrated and recorded in the config
    assert z > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["dp_epsilon"] == pytest.approx(epsilon_for(z, 8 / 20, r["round"], 1e-5))
    assert rows[-1]["dp_epsilon"] <= 4.0
    # The recorded noise rebuilds within budget (a resumed run), and more rounds are refused.
    recorded = load_config(tmp_path / "run" / "config.toml")
    assert recorded.privacy.noise_multiplier == z
    build_federation(recorded)
    with pytest.raises(ConfigError, match="spends epsilon"):
        build_federation(load_config(tmp_path / "run" / "config.toml", ["server.rounds=6"]))


def test_the_run_stops_at_the_budget() -> None:
    cfg = small(**{"privacy.dp": "central", "privacy.target_epsilon": 4.0})
    fed = build_federation(cfg)
    fed.fit(3)
    with pytest.raises(PrivacyBudgetExceeded, match="budget exhausted"):
        fed.run_round()
    assert fed.round_index == 3


def test_dp_with_secure_aggregation_and_adaptive_clipping() -> None:
    cfg = small(**{"privacy.dp": "central", "privacy.noise_multiplier": 0.8, "privacy.target_quantile": 0.5,
                   "privacy.secagg": True, "privacy.noise_seed": 0, "privacy.clip_count_stddev": 1.0})
    fed = build_federation(cfg)
    r = fed.run_round(evaluate=False)
    assert r.applied and r.extra["dp_clip"] == 1.0 and fed.server.privacy.client_clip() != 1.0
    assert 0 <= r.extra["dp_unclipped"] <= 1.5


def test_local_dp_noises_what_clients_send() -> None:
    plain = build_federation(small())
    local = build_federation(small(**{"privacy.dp": "local", "privacy.noise_multiplier": 1.0,
                                      "privacy.clip": 0.5, "privacy.noise_seed": 0}))
    plain.run_round(evaluate=False)
    r = local.run_round(evaluate=False)
    # Eight clients' noise of std 0.5 averaged: the model moved by about 0.5 / sqrt(8) per weight.
    moved = (local.params - plain.params).std()
    assert 0.1 < float(moved) < 0.3
    assert r.extra["dp_epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 1, 1e-5))


def test_privacy_state_is_checkpointed() -> None:
    cfg = small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0, "privacy.target_quantile": 0.5, "privacy.clip_count_stddev": 1.0})
    fed = build_federation(cfg)
    fed.run_round(evaluate=False)
    state = fed.state_dict()
    again = build_federation(small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0,
                                      "privacy.target_quantile": 0.5, "privacy.clip_count_stddev": 1.0}))
    again.load_state_dict(state)
    assert again.server.privacy.central.accountant.noise == [1.0]
    assert again.server.privacy.client_clip() == fed.server.privacy.client_clip()
    assert torch.equal(again.params, fed.params)


@pytest.mark.parametrize("dp", ["central", "local"])
@pytest.mark.parametrize("algorithm, why", [
    ("scaffold", "uploads control"), ("mime_lite", "uploads grad"), ("spsa", "own wire format"),
    ("ifca", "per-client rows"), ("clustered_meta", "per-client rows"), ("fedcac", "per-client rows"),
])
def test_dp_refuses_algorithms_that_release_more_than_the_delta(dp: str, algorithm: str, why: str) -> None:
    cfg = small(**{"privacy.dp": dp, "privacy.noise_multiplier": 1.0, "client.algorithm": algorithm})
    with pytest.raises(ConfigError, match=f"client.algorithm = '{algorithm}' .*{why}.*privacy.dp = '{dp}'") as info:
        build_federation(cfg)
    assert "\n" not in str(info.value)


def test_dp_keeps_feddyn_whose_server_correction_is_post_processing() -> None:
    fed = build_federation(small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0,
                                    "client.algorithm": "feddyn"}))
    assert fed.server.privacy is not None and fed.server.privacy.central is not None


@pytest.mark.parametrize("algorithm, message", [("frl", "check each update"), ("feddyn", "server_delta")])
def test_secure_aggregation_refuses_per_update_checks_and_server_corrections(algorithm: str, message: str) -> None:
    model = {"model.peft": {"name": "supermask"}} if algorithm == "frl" else {}  # FRL trains supermasks only
    with pytest.raises(ConfigError, match=message) as info:
        build_federation(small(**{"privacy.secagg": True, "client.algorithm": algorithm, **model}))
    assert "\n" not in str(info.value)


def test_accounting_uses_the_training_clients_after_holdout_splits() -> None:
    held = {"data.holdout_clients": 4, "data.client_test_fraction": 0.25}
    fed = build_federation(small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0, **held}))
    assert fed.data.num_clients == 16
    assert fed.server.privacy.central.accountant.sample_rate == pytest.approx(8 / 16)
    sample = build_federation(small(**{"privacy.dp": "sample", "privacy.noise_multiplier": 1.0, **held}))
    dpsgd = sample.server.privacy.sample
    assert torch.equal(dpsgd.sizes, sample.data.sizes)  # each client's training samples only


def test_central_dp_refuses_a_non_uniform_sampler() -> None:
    cfg = small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0, "server.sampler": "power_of_choice"})
    with pytest.raises(ConfigError, match="server.sampler = 'power_of_choice'.*'uniform'") as info:
        build_federation(cfg)
    assert "\n" not in str(info.value)


def test_central_dp_samples_every_client_independently_as_the_accountant_assumes() -> None:
    """The accountant composes Poisson-sampled Gaussians: the server draws each training client
    with probability q = clients_per_round / clients, so cohorts vary in size around 8 of 20."""
    fed = build_federation(small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0}))
    q = fed.server.privacy.central.accountant.sample_rate
    assert q == pytest.approx(8 / 20) and fed.server.sampler.rate == q
    cohorts = [fed.server.sample(r) for r in range(2000)]
    sizes = np.array([len(c) for c in cohorts])
    assert len(set(sizes.tolist())) > 5  # not a fixed size
    assert sizes.mean() == pytest.approx(8, abs=0.2) and sizes.var() == pytest.approx(20 * q * (1 - q), rel=0.15)
    hits = np.bincount(np.concatenate([np.array(c, dtype=int) for c in cohorts]), minlength=20) / len(cohorts)
    assert np.all(np.abs(hits - q) < 0.05)  # every client with the same probability
    plain = build_federation(small())
    assert {len(plain.server.sample(r)) for r in range(20)} == {8}  # without DP: as before


def test_an_empty_poisson_cohort_still_releases_the_noise_and_spends_a_round() -> None:
    fed = build_federation(small(**{"privacy.dp": "central", "privacy.noise_multiplier": 1.0,
                                    "privacy.noise_seed": 0, "server.clients_per_round": 1}))
    empty = next(r for r in range(200) if not fed.server.sample(r))  # q = 1/20: about 36% of rounds
    central = fed.server.privacy.central
    for _ in range(empty):
        fed.run_round(evaluate=False)
    before = fed.params.clone()
    out = fed.run_round(evaluate=False)
    assert out.cohort == [] and out.num_clients == 0
    assert len(central.accountant.noise) == empty + 1  # every round counted, the empty one too
    change = fed.params - before  # FedAvg at server lr 1: the noise over the expected cohort of 1
    assert torch.isfinite(change).all()
    assert float(change.std()) == pytest.approx(central.metrics["dp_noise_std"], rel=0.1)


def test_secure_aggregation_sizes_its_field_for_a_poisson_cohort_without_dp() -> None:
    """server.sampler = 'poisson' draws cohorts above k; the fixed point must hold their sum."""
    fed = build_federation(small(**{"privacy.secagg": True, "server.sampler": "poisson",
                                    "server.clients_per_round": 3, "data.num_clients": 10}))
    assert fed.server.privacy.secure.fp.max_clients == 10
    sizes = [len(fed.run_round(evaluate=False).cohort) for _ in range(8)]
    assert max(sizes) > 3  # seed 0 draws a cohort above k within these rounds: summed, not refused
