"""Schedules over simulated time: staleness functions, the buffered server step, FedBuff equal to
FedAvg, sync rounds with a clock, deadlines and dropouts, FedCompass's step assignment, FedAMD."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import koinon as kn
from koinon.clients import CLIENT_ALGORITHMS
from koinon.config import ClockConfig, Config
from koinon.errors import ConfigError
from koinon.schedule import (
    Clock,
    FedAMD,
    FedAsync,
    FedBuff,
    FedCompass,
    Scheduled,
    Sync,
    assign_steps,
    build_clock,
    load_trace,
    scheduled,
    staleness_fn,
)
from koinon.topology.server import Buffered


def _federation(num_clients=12, per_round=4, steps=3, runtime="vectorized", **kw):
    ds = kn.DATASETS.get("digits")(seed=0, test_fraction=0.2, num_clients=num_clients)
    data = kn.partition_dataset(ds, "dirichlet", num_clients, seed=0, options={"alpha": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    return kn.Federation(model, data, local=kn.LocalTraining(lr=0.05, steps=steps, batch_size=8),
                         clients_per_round=per_round, seed=1, runtime=runtime, **kw)


def _clock(n, speed=None, leaves=None, windows=None):
    speed = np.ones(n) if speed is None else np.asarray(speed, dtype=float)
    return Clock(speed, np.full(n, 1e6), 0.001, windows, None if leaves is None else np.asarray(leaves, float))


# ------------------------------------------------------------------ staleness


def test_staleness_functions_on_hand_computed_values():
    const, poly, hinge = staleness_fn("constant"), staleness_fn("polynomial", a=0.5), staleness_fn("hinge", a=1.0, b=2.0)
    assert [const(t) for t in (0, 5)] == [1.0, 1.0]
    assert [poly(t) for t in (0, 3, 8)] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert [hinge(t) for t in (0, 2, 3, 4)] == [1.0, 1.0, 0.5, pytest.approx(1 / 3)]
    with pytest.raises(ConfigError, match="allowed: constant, polynomial, hinge"):
        staleness_fn("linear")


# ------------------------------------------------------------- buffered step


def test_buffered_step_scales_each_update_and_takes_the_sample_weighted_mean():
    fed = _federation()
    server = fed.server
    before = server.params.clone()
    p = before.numel()
    a, b = torch.full((p,), 0.01), torch.linspace(-0.02, 0.02, p)

    def enc(t):
        return [fed.codec.encode(t, {}, torch.Generator())[0]]

    out = server.apply_buffered([Buffered(1, enc(a), 1, 0.5, weight=1.0), Buffered(2, enc(b), 3, 0.7, weight=0.5)],
                                downlink_bytes=7)
    expected = before + (1 * a + 3 * 0.5 * b) / 4  # FedAvg server, lr 1
    assert torch.allclose(server.params, expected, atol=1e-7)
    assert out.round == 1 and server.round_index == 1 and out.included == [1, 2]
    assert out.train_loss == pytest.approx((0.5 * 1 + 0.7 * 3) / 4)
    assert out.uplink_bytes == 2 * len(enc(a)[0]) and out.downlink_bytes == 7
    # A bad update in the buffer is refused and left out; the rest still steps.
    nan = enc(torch.full((p,), float("nan")))
    after = server.params.clone()
    out = server.apply_buffered([Buffered(3, nan, 5, 0.1), Buffered(4, enc(a), 2, 0.1)])
    assert out.rejected == [3] and "NaN" in out.reasons[3] and out.included == [4]
    assert torch.allclose(server.params, after + a)


def test_fedbuff_with_equal_speeds_and_a_full_cohort_buffer_is_fedavg_bit_for_bit():
    # Equal speeds and equal step counts: the whole cohort arrives at one moment (ties broken by
    # client id, the cohort's own order), staleness 0 gives weight s(0) = 1.0 exactly, and the
    # next cohort is sampled from the same idle population with the same seeded generator. So
    # the buffer holds exactly the round's rows in the round's order and the aggregate is the
    # same floating-point computation: equal bits, not only close.
    plain = _federation()
    plain.fit(4)
    fed = _federation()
    run = Scheduled(fed, _clock(12), FedBuff(buffer=4, concurrency=4))
    records = run.fit(4)
    assert torch.equal(run.params, plain.params)
    times = [r.extra["sim_time_s"] for r in records]
    assert all(b > a for a, b in zip(times, times[1:]))


def test_sync_with_a_clock_equals_the_run_without_one_and_reports_simulated_time():
    plain = _federation()
    plain_records = plain.fit(3)
    fed = _federation()
    speed = np.linspace(0.5, 2.0, 12)
    run = Scheduled(fed, _clock(12, speed), Sync())
    records = run.fit(3)
    assert torch.equal(run.params, plain.params)
    assert [r.cohort for r in records] == [r.cohort for r in plain_records]
    # The round lasts as long as its slowest client: down + compute + up.
    first = records[0]
    nbytes = first.downlink_bytes // len(first.cohort)
    slowest = max(fed.local.steps * 8 * 0.001 / speed[c] + 2 * nbytes / 1e6 for c in first.cohort)
    assert first.extra["sim_time_s"] == pytest.approx(slowest, abs=1e-6)  # recorded to the microsecond


def test_sync_with_a_clock_sends_fedcac_its_personal_models_as_the_run_without_one():
    # FedCAC's customized model (downlink_for) reaches each client and its bytes are counted:
    # the same models, records and downlink bytes as the run without a clock, bit for bit.
    plain = _federation(algorithm="fedcac")
    plain_records = plain.fit(3)
    fed = _federation(algorithm="fedcac")
    run = Scheduled(fed, _clock(12, np.linspace(0.5, 2.0, 12)), Sync())
    records = run.fit(3)
    assert torch.equal(run.params, plain.params)
    assert [r.downlink_bytes for r in records] == [r.downlink_bytes for r in plain_records]
    assert records[-1].downlink_bytes > 4 * len(records[-1].cohort) * fed.layout.numel  # + personal models
    for c in plain.client_states:
        assert all(torch.equal(v, fed.client_states[c][k]) for k, v in plain.client_states[c].items())


def test_sync_deadline_drops_stragglers_and_dropouts_lose_updates():
    fed = _federation(per_round=12)
    speed = np.ones(12)
    speed[3] = 0.01  # 100x slower
    leaves = np.full(12, math.inf)
    leaves[5] = 0.001  # leaves before anything arrives
    run = Scheduled(fed, _clock(12, speed, leaves), Sync(deadline_s=0.5))
    out = run.run_round()
    assert 3 in out.missing and 3 not in out.included  # straggler past the deadline
    assert 5 in out.cohort and 5 in out.missing  # online at t = 0, gone at 1 ms
    assert sorted(out.included) == [c for c in range(12) if c not in (3, 5)]
    assert out.extra["sim_time_s"] == pytest.approx(0.5)
    out = run.run_round()
    assert 5 not in out.cohort  # gone for good: never sampled again


def test_a_client_leaving_during_its_task_is_missing():
    fed = _federation(per_round=12)
    leaves = np.full(12, math.inf)
    leaves[7] = 0.01  # online at t = 0, gone before its update arrives
    run = Scheduled(fed, _clock(12, leaves=leaves), Sync())
    out = run.run_round()
    assert 7 in out.cohort and 7 in out.missing and 7 not in out.included


def test_fedasync_mixes_the_model_with_staleness_weight():
    # Each arrival: x <- (1 - w) x + w x_client, w = mixing * (1 + tau)^-a (polynomial, a = 0.5),
    # x_client = the model the client started from plus its decoded update; computed here by hand.
    seen = []

    class Watched(FedAsync):
        def arrive(self, driver, task):
            server = driver.federation.server
            x, tau = server.params.clone(), server.round_index - task.version
            out = super().arrive(driver, task)
            seen.append((x, tau, task, server.params.clone()))
            return out

    fed = _federation()
    run = Scheduled(fed, _clock(12, np.linspace(0.3, 3.0, 12)), Watched(concurrency=4, mixing=0.5))
    records = run.fit(8)
    assert all(r.num_clients == 1 for r in records)
    assert records[-1].test_accuracy is not None and np.isfinite(records[-1].test_loss)
    stale = [s for s in seen if s[1] >= 1]
    assert stale and len(seen) == 8
    for x, tau, task, new in seen:
        w = 0.5 * (1 + tau) ** -0.5
        x_client = task.received + fed.codec.decode(task.payloads[0])
        assert torch.allclose(new, (1 - w) * x + w * x_client, atol=1e-6), tau
        if tau:
            assert not torch.allclose(new, x + w * (x_client - task.received), atol=1e-6)  # not a plain delta


@pytest.mark.parametrize("make", [lambda: FedAsync(concurrency=4, mixing=0.5), lambda: FedBuff(buffer=2, concurrency=4)],
                         ids=["fedasync", "fedbuff"])
def test_increment_codecs_keep_the_clients_estimate_under_asynchronous_schedules(make):
    # EF21 sends increments; the server sums them per client. The staleness weight and FedAsync's
    # mixing offset scale what is aggregated, never the client's running sum: the server's stored
    # estimate must equal the client's own h, or every later update from it decodes wrong.
    fed = _federation(codec={"name": "ef21", "inner": {"name": "topk", "ratio": 0.1}})
    run = Scheduled(fed, _clock(12, np.linspace(0.3, 3.0, 12)), make())
    run.fit(8)
    sums = fed.server.receiver.sums
    assert len(sums) >= 4
    for (client, stream), h in sums.items():
        assert torch.equal(h, fed.sender.states[client][stream]["h"]), client


def test_a_schedules_own_trainer_runs_on_the_runtimes_device_and_precision():
    # FedCompass trains with per-client step counts on the schedule's own trainer: it must be
    # placed as the runtime's trainer is (bf16 autocast here), or those clients train in fp32.
    fed = _federation(runtime={"name": "inprocess", "precision": "bf16"})
    run = Scheduled(fed, _clock(12), FedCompass(min_steps=1, max_steps=3, concurrency=4))
    assert run.trainer().precision == "bf16" and run.trainer(steps=2).precision == "bf16"
    run.fit(2)
    assert all(t.precision == "bf16" for t in run._trainers.values())
    assert torch.isfinite(run.params).all()


# ------------------------------------------------------------------ FedCompass


def test_fedcompass_step_assignment_makes_a_group_arrive_together():
    # A group expected at t = 10 s; four clients start at t = 0 with these seconds per step and
    # communication seconds (a hand-made speed table):
    table = {0: (0.5, 0.0), 1: (1.0, 0.0), 2: (0.4, 2.0), 3: (4.0, 0.0)}
    groups = {7: 10.0}
    arrivals = {}
    for c, (step_s, comm_s) in table.items():
        gid, q = assign_steps(0.0, step_s, comm_s, groups, min_steps=5, max_steps=20)
        arrivals[c] = (gid, q, comm_s + q * step_s)
    assert arrivals[0] == (7, 20, 10.0)
    assert arrivals[1] == (7, 10, 10.0)
    assert arrivals[2] == (7, 20, pytest.approx(10.0))
    assert arrivals[3] == (None, 20, 80.0)  # 2 steps would be below min_steps: a new group


def test_fedcompass_groups_arrive_together_once_speeds_are_known():
    fed = _federation(num_clients=12, per_round=6, steps=10)
    speed = np.array([1.0, 2.0, 0.5, 1.5, 3.0, 0.8, 1.2, 2.5, 0.6, 1.1, 0.9, 1.7])
    run = Scheduled(fed, _clock(12, speed), FedCompass(min_steps=2, max_steps=10, concurrency=6))
    records = run.fit(25, eval_every=25)
    step_s = 8 * 0.001 / speed  # batch 8, 1 ms a sample at speed 1
    # After the first group (speeds unknown: everyone trains max_steps), a group's members
    # arrive within one local step of each other (step counts are whole numbers).
    groups = [r for r in records[2:] if r.num_clients > 1]
    assert len(groups) >= 8
    for r in groups:
        assert r.extra["group_spread_s"] <= step_s[r.cohort].max() + 1e-9
    assert records[1].extra["group_spread_s"] > step_s.max()  # the unknown-speed first group did not


# ---------------------------------------------------------------------- FedAMD


def test_fedamd_keeps_anchor_gradients_and_trains_miners():
    fed = _federation(per_round=6, steps=4)
    schedule = FedAMD(anchor_probability=0.4)
    run = Scheduled(fed, _clock(12), schedule)
    records = run.fit(5)
    assert sum(r.extra["anchors"] for r in records) > 0 and schedule.bullseyes
    # Anchors are not in the aggregate (the round's cohort is its miners); their bytes count.
    size = records[0].downlink_bytes // 6
    for r in records:
        assert r.num_clients == len(r.cohort) == 6 - r.extra["anchors"]
        assert r.uplink_bytes == 6 * size
    assert np.isfinite(records[-1].test_loss)
    # No anchors: the correction is zero and the miners are the sync round's clients, bit for bit.
    alone = Scheduled(_federation(per_round=6, steps=4), _clock(12), FedAMD(anchor_probability=0.0))
    sync = Scheduled(_federation(per_round=6, steps=4), _clock(12), Sync())
    alone.fit(3)
    sync.fit(3)
    assert torch.equal(alone.params, sync.params)
    state = run.state_dict()
    assert any(k.startswith("schedule/state/bullseye/") for k in state)


# ------------------------------------------------------------ clock and config


def test_trace_files_json_and_csv(tmp_path):
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"clients": [{"speed": 2.0, "bandwidth_mbps": 8, "available": [[0, 5], [10, 20]]},
                                          {"speed": 0.5}]}))
    speeds, mbps, windows = load_trace(js)
    assert speeds.tolist() == [2.0, 0.5] and mbps.tolist() == [8.0, 10.0]
    assert windows[0] == [(0.0, 5.0), (10.0, 20.0)] and windows[1] == [(0.0, math.inf)]
    cs = tmp_path / "t.csv"
    cs.write_text("client,speed,bandwidth_mbps,start,end\n0,2.0,8,0,5\n0,2.0,8,10,20\n1,0.5,,,\n")
    assert [x.tolist() if hasattr(x, "tolist") else x for x in load_trace(cs)] == \
        [[2.0, 0.5], [8.0, 10.0], windows]
    clock = build_clock(ClockConfig(trace=str(js)), 2, 0)
    assert clock is not None and clock.available(0, 3) and not clock.available(0, 7)
    assert clock.offline_at(0, 12) == 20.0 and clock.next_online(6.0) == 6.0  # client 1 always on
    assert clock.bandwidth[0] == 1e6  # 8 Mbit/s in bytes per second
    with pytest.raises(ConfigError, match="lists 2 clients"):
        build_clock(ClockConfig(trace=str(js)), 3, 0)
    bad = tmp_path / "b.json"
    bad.write_text('{"clients": [{"speed": "fast"}]}')
    with pytest.raises(ConfigError, match="not a valid trace"):
        load_trace(bad)


def test_clock_distributions_and_dropouts_are_seeded():
    cfg = ClockConfig(speed="lognormal", sigma=1.0, dropout=0.3, dropout_within_s=50.0)
    a, b = build_clock(cfg, 100, 3), build_clock(cfg, 100, 3)
    assert a is not None and b is not None
    assert np.array_equal(a.speed, b.speed) and np.array_equal(a.leaves, b.leaves)
    assert np.isfinite(a.leaves).sum() == 30 and a.leaves[np.isfinite(a.leaves)].max() <= 50.0
    assert 0.5 < float(np.median(a.speed)) < 2.0 and a.speed.max() / a.speed.min() > 10
    assert build_clock(ClockConfig(), 10, 0) is None
    with pytest.raises(ConfigError, match="allowed: constant, lognormal, uniform"):
        build_clock(ClockConfig(speed="pareto"), 10, 0)
    with pytest.raises(ConfigError, match="clock.dropout needs a clock"):
        build_clock(ClockConfig(dropout=0.2), 10, 0)


def test_config_keys_overrides_and_errors():
    cfg = Config().with_overrides({"clock.speed": "lognormal", "clock.sigma": 1.0, "schedule.name": "fedbuff",
                                   "schedule.buffer": 5})
    assert cfg.clock.speed == "lognormal" and cfg.schedule.options == {"buffer": 5}
    assert "[clock]" in cfg.to_toml() and "[clock]" not in Config().to_toml()
    fed = _federation()
    with pytest.raises(ConfigError, match="set clock.speed"):
        scheduled(Config().with_overrides({"schedule.name": "fedasync"}), fed)
    with pytest.raises(ConfigError, match="schedule.buffr: not an option"):
        scheduled(Config().with_overrides({"clock.speed": "constant", "schedule.name": "fedbuff",
                                           "schedule.buffr": 3, "data.num_clients": 12}), fed)
    with pytest.raises(ConfigError, match="unknown schedule"):
        scheduled(Config().with_overrides({"clock.speed": "constant", "schedule.name": "fedwhat",
                                           "data.num_clients": 12}), fed)
    with pytest.raises(ConfigError, match="scores rounds; schedule.name = 'fedbuff'"):
        scheduled(Config().with_overrides({"clock.speed": "constant", "schedule.name": "fedbuff",
                                           "ledger.contribution": "loo", "data.num_clients": 12}), fed)
    for dp in ("central", "local", "sample"):  # privacy.open/close (the accounting) run only in rounds
        with pytest.raises(ConfigError, match=f"privacy.dp = '{dp}' accounts whole rounds"):
            scheduled(Config().with_overrides({"clock.speed": "constant", "schedule.name": "fedasync",
                                               "data.num_clients": 12, "privacy.dp": dp,
                                               "privacy.noise_multiplier": 1.0}), fed)
    assert scheduled(Config(), fed) is fed  # no clock: the federation as it was


@pytest.mark.parametrize("algorithm", ["feddyn", "frl", "ifca", "clustered_meta", "fedcac"])
def test_asynchronous_schedules_refuse_algorithms_with_server_round_hooks(algorithm):
    # server_delta / check_update / server_update_rows / downlink_for run in close_round only;
    # the buffered step would skip them (IFCA used to fail mid-run after the model moved).
    # FRL by name needs a supermask model; the refusal only looks at the algorithm's hooks.
    fed = _federation(algorithm=CLIENT_ALGORITHMS.build("frl", {}, "client") if algorithm == "frl" else algorithm)
    cfg = {"clock.speed": "constant", "data.num_clients": 12}
    for name in ("fedasync", "fedbuff", "fedcompass"):
        with pytest.raises(ConfigError, match=f"client.algorithm = '{algorithm}' needs the server's round hooks"):
            scheduled(Config().with_overrides({**cfg, "schedule.name": name}), fed)
    assert isinstance(scheduled(Config().with_overrides({**cfg, "schedule.name": "sync"}), fed), Scheduled)


@pytest.mark.parametrize("name", ["sync", "fedasync", "fedcompass", "fedamd", "fedbuff"])
def test_secure_aggregation_is_refused_under_schedules_without_a_buffer(name):
    # These schedules hand the server one client's rows at a time (accept / apply_buffered), never
    # a secure sum: a run that says secagg would aggregate in the clear. FedBuff sums its buffer
    # securely (koinon.schedule.secure), but a buffer of one is one update.
    options = {"schedule.buffer": 1} if name == "fedbuff" else {}
    match = "schedule.buffer = 1" if name == "fedbuff" else "only schedule.name = 'fedbuff'"
    with pytest.raises(ConfigError, match=match):
        scheduled(Config().with_overrides({"clock.speed": "constant", "schedule.name": name, **options,
                                           "data.num_clients": 12, "privacy.secagg": True}), _federation())


@pytest.mark.parametrize("make", [lambda: FedBuff(buffer=3, concurrency=5), lambda: FedAsync(concurrency=4),
                                  lambda: FedCompass(min_steps=1, max_steps=3, concurrency=5), lambda: Sync(deadline_s=0.03)],
                         ids=["fedbuff", "fedasync", "fedcompass", "sync"])
def test_a_resumed_schedule_goes_on_as_an_uninterrupted_one(make):
    # Updates in flight, a half-full buffer, FedCompass's groups and speed estimates are all in
    # the checkpoint: stopping after 5 steps and resuming gives the same model and times.
    speed = np.array([1.0, 2.0, 0.5, 1.5, 3.0, 0.8, 1.2, 2.5, 0.6, 1.1, 0.9, 1.7])
    leaves = np.full(12, math.inf)
    leaves[4] = 0.05
    whole = Scheduled(_federation(), _clock(12, speed, leaves), make())
    straight = whole.fit(10, eval_every=10)
    first = Scheduled(_federation(), _clock(12, speed, leaves), make())
    first.fit(5, eval_every=5)
    state = first.state_dict()
    assert any(k.startswith("schedule/flight/") for k in state) or isinstance(first.schedule, Sync)
    again = Scheduled(_federation(), _clock(12, speed, leaves), make())
    again.load_state_dict(state)
    rest = again.fit(5, eval_every=5)
    assert torch.equal(again.params, whole.params)
    assert [r.extra["sim_time_s"] for r in rest] == [r.extra["sim_time_s"] for r in straight[5:]]
    assert again.uplink_total == whole.uplink_total and again.downlink_total == whole.downlink_total


def test_availability_aware_selection_loses_fewer_updates_on_a_trace():
    # Even clients are online for 0.02 s of every 1 s (too short for a task), odd ones always.
    windows = [[(t + 0.0, t + 0.02) for t in range(0, 50)] if c % 2 == 0 else [(0.0, math.inf)]
               for c in range(12)]
    missing = {}
    for sampler in ("uniform", "availability"):
        fed = _federation(per_round=4, sampler=sampler)
        run = Scheduled(fed, _clock(12, windows=windows), Sync())
        records = run.fit(12, eval_every=12)
        missing[sampler] = sum(len(r.missing) for r in records)
    assert missing["uniform"] > 0 and missing["availability"] < missing["uniform"]


@pytest.mark.parametrize("schedule", [{"schedule.deadline_s": 0.05},
                                      {"schedule.name": "fedbuff", "schedule.buffer": 3},
                                      {"schedule.name": "fedcompass", "schedule.max_steps": 3}],
                         ids=["sync", "fedbuff", "fedcompass"])
def test_a_run_over_simulated_time_resumes_to_the_same_model_and_time(tmp_path, schedule):
    from koinon.experiment.runner import resume_experiment, run_experiment

    over = {"data.num_clients": 12, "server.clients_per_round": 4, "client.steps": 3, "clock.speed": "lognormal",
            "clock.dropout": 0.25, "clock.dropout_within_s": 0.2, **schedule}
    whole = run_experiment(Config().with_overrides({**over, "server.rounds": 4}), tmp_path / "a", progress=False)
    run_experiment(Config().with_overrides({**over, "server.rounds": 2}), tmp_path / "b", progress=False)
    resumed = resume_experiment(tmp_path / "b", ["server.rounds=4"], progress=False)
    assert resumed["model_sha256"] == whole["model_sha256"]
    times = [[json.loads(line)["sim_time_s"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("a", "b")]
    assert times[0] == times[1] and times[0] == sorted(times[0])


def test_the_deployment_refuses_simulated_time():
    from koinon.deploy.server import check_deployable

    cfg = Config().with_overrides({"clock.speed": "constant"})
    with pytest.raises(ConfigError, match="simulate time"):
        check_deployable(Scheduled(_federation(), _clock(12), Sync()), cfg)


def test_fit_writes_a_run_folder_with_simulated_time(tmp_path):
    run = Scheduled(_federation(), _clock(12, np.linspace(0.5, 2.0, 12)), FedBuff(buffer=2))
    run.fit(4, out=tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3, 4] and all("sim_time_s" in m for m in lines)
    described = json.loads((tmp_path / "run" / "federation.json").read_text())
    assert described["schedule"] == "fedbuff"
    assert (tmp_path / "run" / "accuracy.png").is_file() and (tmp_path / "run" / "summary.json").is_file()
