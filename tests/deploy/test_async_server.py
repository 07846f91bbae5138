"""The asynchronous server's rules in one process (no sockets): configuration refusals, task
admission (unknown, late, duplicate, resent), the durable buffer across a restart, staleness."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from koinon.config import Config
from koinon.deploy.asynchronous import (
    AsyncServer,
    AsyncStore,
    build_client_federation,
    build_for_deployment,
)
from koinon.deploy.server import Member, restore
from koinon.deploy.wire import pb, upload_messages
from koinon.errors import ConfigError
from koinon.schedule import staleness_fn
from koinon.topology.server import Buffered

BASE = {"seed": 0, "data": {"name": "digits", "num_clients": 3}, "model": {"name": "mlp", "hidden": [8]},
        "runtime": {"name": "inprocess"}, "client": {"steps": 2}, "server": {"clients_per_round": 2, "rounds": 4}}


def _cfg(**sections: dict) -> Config:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return Config.from_dict(d)


def _server(folder: Path, cfg: Config) -> AsyncServer:
    fed, schedule = build_for_deployment(cfg)
    store = AsyncStore(folder)
    restore(fed, store)
    server = AsyncServer(cfg, fed, store, folder, schedule)
    for i in range(3):
        name = f"c{i}"
        n = len(fed.data.client_indices[i])
        if name not in server.members:
            server.members[name] = Member(name, i, n, f"partition:{i}")
            server.store.save_client(name, i, n, f"partition:{i}")
        server.members[name].last_seen = time.monotonic()
    return server


def _upload(server: AsyncServer, name: str, task: int, value: float = 1e-3, index: int | None = None,
            personal: tuple[int, int] = (0, 0)) -> object:
    member = server.members[name]
    numel = server.fed.layout.numel
    data, _ = server.fed.codec.encode(torch.full((numel,), value), {}, torch.Generator())
    header = pb.UploadHeader(round=task, layout_hash=server.layout_hash, codec=server.fed.codec.name,
                             streams=list(server.streams), sizes=[len(data)], num_samples=member.num_samples,
                             num_steps=2, train_loss=0.5, client_index=member.idx if index is None else index,
                             personal_correct=personal[0], personal_total=personal[1])
    uploading: list[bool] = []
    try:
        return server._receive(upload_messages(header, [data]), member, [], uploading)
    finally:
        if uploading:
            member.uploading = False


def _dispatch(server: AsyncServer) -> dict[str, int]:
    with server.lock:
        server._dispatch()
    return {name: t.task for name, t in server.tasks.items()}


def test_deployment_refuses_a_clock_and_schedules_it_cannot_run_in_one_line():
    with pytest.raises(ConfigError, match=r"\[clock\] simulates clients' speeds"):
        build_for_deployment(_cfg(clock={"speed": "lognormal"}, schedule={"name": "fedbuff"}))
    with pytest.raises(ConfigError, match="fedcompass.*runs 'sync', 'fedbuff' or 'fedasync'"):
        build_for_deployment(_cfg(schedule={"name": "fedcompass"}))
    with pytest.raises(ConfigError, match="deploy.round_timeout_s"):
        build_for_deployment(_cfg(schedule={"name": "sync", "deadline_s": 5.0}))
    with pytest.raises(ConfigError, match="schedule.buffer = 3 is above the 2 clients"):
        build_for_deployment(_cfg(schedule={"name": "fedbuff", "buffer": 3}))
    # The simulation's own refusals: privacy, ledger, server-side hooks.
    with pytest.raises(ConfigError, match="privacy.dp"):
        build_for_deployment(_cfg(schedule={"name": "fedasync"}, privacy={"dp": "central", "noise_multiplier": 1.0}))
    with pytest.raises(ConfigError, match="ledger.contribution"):
        build_for_deployment(_cfg(schedule={"name": "fedbuff", "buffer": 2}, ledger={"contribution": "loo"}))
    with pytest.raises(ConfigError, match="server's round hooks"):
        build_for_deployment(_cfg(schedule={"name": "fedbuff", "buffer": 2}, client={"algorithm": "feddyn"}))
    # Not deployed asynchronously: secure buffers, and cohorts of varying size for fixed slots.
    with pytest.raises(ConfigError, match="privacy.secagg = true with schedule.name = 'fedbuff'"):
        build_for_deployment(_cfg(schedule={"name": "fedbuff", "buffer": 2}, privacy={"secagg": True}))
    with pytest.raises(ConfigError, match="server.sampler = 'poisson'"):
        build_for_deployment(_cfg(schedule={"name": "fedasync"}, server={"sampler": "poisson"}))
    fed, schedule = build_for_deployment(_cfg())
    assert schedule is None  # no [schedule]: rounds, as always
    fed, schedule = build_for_deployment(_cfg(schedule={"name": "fedbuff", "buffer": 2}))
    assert schedule.name == "fedbuff" and schedule.buffer == 2
    client = build_client_federation(_cfg(schedule={"name": "fedasync"}))
    assert client.layout.hash() == fed.layout.hash()


def test_uploads_are_refused_for_unknown_tasks_wrong_clients_bad_bytes_and_answered_once_when_resent(tmp_path):
    server = _server(tmp_path, _cfg(schedule={"name": "fedbuff", "buffer": 2}))
    tasks = _dispatch(server)
    assert sorted(tasks.values()) == [0, 0] and len(tasks) == 2
    name, other = sorted(tasks)
    idle = ({"c0", "c1", "c2"} - set(tasks)).pop()
    reply = _upload(server, idle, 0)
    assert not reply.accepted and reply.reason.startswith("unknown task 0: not handed to client")
    reply = _upload(server, name, 7)
    assert not reply.accepted and "unknown task 7" in reply.reason and "its task is 0" in reply.reason
    reply = _upload(server, name, 0, index=2 if server.members[name].idx != 2 else 0)
    assert not reply.accepted and "is not this client's" in reply.reason
    reply = _upload(server, name, 0, value=float("nan"))
    assert not reply.accepted and "NaN" in reply.reason
    assert server.tasks[name].task == 0  # still its task: it may send a good update
    assert _upload(server, name, 0).accepted
    assert [e.client for e in server.buffer] == [name]
    again = _upload(server, name, 0)  # its answer was lost and it sends again
    assert again.accepted and "already accepted; counted once" in again.reason
    assert len(server.buffer) == 1 and server.store.counts()["accepted"] == 1
    # A task past its deadline frees its slot; its upload is late.
    server.tasks[other].issued -= server.cfg.deploy.round_timeout_s + 1
    with server.lock:
        server._expire()
    reply = _upload(server, other, 0)
    assert not reply.accepted and reply.reason.startswith("late: task 0 was expired")
    server.store.close()


def test_an_accepted_update_survives_a_restart_and_is_applied_exactly_once(tmp_path):
    cfg = _cfg(schedule={"name": "fedbuff", "buffer": 2})
    server = _server(tmp_path, cfg)
    first, second = sorted(_dispatch(server))
    assert _upload(server, first, 0).accepted
    server.store.close()  # as if killed: nothing else was written
    server = _server(tmp_path, cfg)  # restart
    assert [e.client for e in server.buffer] == [first] and set(server.tasks) == {second}
    assert server._take() is None  # one of two
    assert _upload(server, second, 0).accepted
    taken = server._take()
    assert taken is not None and len(taken) == 2
    before = server.server.params.clone()
    server._step(taken, time.perf_counter())
    assert server.server.round_index == 1 and not server.buffer
    assert not torch.equal(server.server.params, before)
    assert [(c, s) for _, c, s in server.astore.applied()] == [(first, 1), (second, 1)]
    server.store.close()
    server = _server(tmp_path, cfg)  # a restart after the step finds nothing to apply again
    assert server.server.round_index == 1 and not server.buffer and not server.tasks
    assert len(server.astore.applied()) == 2
    server.store.close()


def test_a_stale_update_is_weighted_by_the_schedules_staleness_function(tmp_path):
    # FedBuff with a buffer of one: the first upload makes version 1; the second client's update,
    # trained from version 0, then counts with weight s(1) = (1 + 1) ** -0.5, as the simulation's.
    cfg = _cfg(schedule={"name": "fedbuff", "buffer": 1, "concurrency": 2})
    server = _server(tmp_path, cfg)
    first, second = sorted(_dispatch(server))
    assert _upload(server, first, 0, value=1e-3).accepted
    server._step(server._take(), time.perf_counter())
    _dispatch(server)  # the freed slot: dispatch 1, from version 1
    assert sorted((t.task, t.version) for t in server.tasks.values()) == [(0, 0), (1, 1)]
    assert _upload(server, second, 0, value=2e-3).accepted
    (entry,) = server._take()
    assert server.server.round_index - entry.version == 1
    # The same step on a copy of the server, through the simulation's code, by hand.
    replay = _server(tmp_path / "replay", cfg).server
    replay.load_state_dict(server.server.state_dict())
    weight = staleness_fn("polynomial", 0.5)(1)
    assert weight == pytest.approx(2 ** -0.5)
    replay.apply_buffered([Buffered(entry.idx, entry.payloads, entry.num_samples, entry.train_loss, weight, 2)])
    server._step([entry], time.perf_counter())
    assert torch.equal(server.server.params, replay.params)
    record = server.store.records()[-1]
    assert record["staleness_max"] == 1.0
    server.store.close()


def test_the_server_writes_no_personal_figures_of_its_own(tmp_path):
    """It holds no client state, so it would score Ditto's personal models as empty ones."""
    cfg = _cfg(schedule={"name": "fedbuff", "buffer": 2}, data={"client_test_fraction": 0.3},
               server={"eval_every": 1}, client={"algorithm": "ditto"})
    server = _server(tmp_path, cfg)
    for name, task in _dispatch(server).items():
        assert _upload(server, name, task).accepted
    taken = server._take()
    assert taken is not None
    server._step(taken, time.perf_counter())
    record = server.store.records()[-1]
    assert "test_accuracy" in record and not any(k.startswith("personal_accuracy") for k in record)


def test_an_update_beyond_the_steps_left_is_late_not_left_unapplied(tmp_path):
    # FedAsync, one step left, two clients out: the first update fills that step; the second
    # could never be applied, so it is late (it used to be accepted and stay in the buffer).
    cfg = _cfg(schedule={"name": "fedasync", "concurrency": 2}, server={"clients_per_round": 2, "rounds": 1})
    server = _server(tmp_path, cfg)
    first, second = sorted(_dispatch(server))
    assert _upload(server, first, 0).accepted
    reply = _upload(server, second, 0)
    assert not reply.accepted and reply.reason.startswith("late: the updates waiting fill the steps left")
    server._step(server._take(), time.perf_counter())
    assert server.server.round_index == 1 and not server.buffer
    server.store.close()


def test_counts_reported_with_updates_go_into_their_model_versions_record(tmp_path):
    cfg = _cfg(schedule={"name": "fedbuff", "buffer": 2}, data={"client_test_fraction": 0.3},
               server={"eval_every": 1, "rounds": 4})
    server = _server(tmp_path, cfg)
    for name, task in _dispatch(server).items():
        assert _upload(server, name, task).accepted
    server._step(server._take(), time.perf_counter())  # version 1
    tasks = _dispatch(server)
    assert {t.version for t in server.tasks.values()} == {1}
    held = {name: len(server.fed.personal.held[server.members[name].idx]) for name in tasks}
    for k, (name, task) in enumerate(sorted(tasks.items())):
        assert _upload(server, name, task, personal=(held[name] * k, held[name])).accepted  # 0 and 1
    server._step(server._take(), time.perf_counter())  # version 2: version 1's figures join record 1
    first = server.store.records()[0]
    assert first["round"] == 1 and first["personal_accuracy_mean"] == 0.5 and first["personal_accuracy_min"] == 0.0
    assert not any(k.startswith("personal_accuracy") for k in server.store.records()[1])
    server.store.close()


def test_a_restart_keeps_the_personal_counts_of_accepted_updates(tmp_path):
    """Counts are stored with the acceptance: a version's record sums those reported before a
    restart and after it (0 of n before, n of n after: mean 0.5, not 1.0)."""
    cfg = _cfg(schedule={"name": "fedbuff", "buffer": 2}, data={"client_test_fraction": 0.3},
               server={"eval_every": 1, "rounds": 4})
    server = _server(tmp_path, cfg)
    for name, task in _dispatch(server).items():
        assert _upload(server, name, task).accepted
    server._step(server._take(), time.perf_counter())  # version 1
    tasks = sorted(_dispatch(server).items())[:2]
    held = {name: len(server.fed.personal.held[server.members[name].idx]) for name, _ in tasks}
    (a, ta), (b, tb) = tasks
    assert _upload(server, a, ta, personal=(0, held[a])).accepted
    server.store.close()
    server = _server(tmp_path, cfg)  # restarted with one update of version 1 waiting
    assert server.tasks[b].version == 1
    assert _upload(server, b, tb, personal=(held[b], held[b])).accepted
    server._step(server._take(), time.perf_counter())  # version 2: version 1's figures join record 1
    first = server.store.records()[0]
    assert first["personal_accuracy_mean"] == 0.5 and first["personal_accuracy_min"] == 0.0
    server.store.close()


def test_a_restart_with_too_few_rounds_for_the_accepted_updates_is_refused(tmp_path):
    """Every update told "accepted" is applied: a restart that would end the run first is refused."""
    cfg = _cfg(schedule={"name": "fedasync", "concurrency": 2}, server={"clients_per_round": 2, "rounds": 3})
    server = _server(tmp_path, cfg)
    assert all(_upload(server, n, t).accepted for n, t in _dispatch(server).items())
    server.store.close()
    fewer = _cfg(schedule={"name": "fedasync", "concurrency": 2}, server={"clients_per_round": 2, "rounds": 1})
    with pytest.raises(ConfigError, match=r"server.rounds = 1: the 2 accepted updates .* use server.rounds >= 2"):
        _server(tmp_path, fewer)
    enough = _cfg(schedule={"name": "fedasync", "concurrency": 2}, server={"clients_per_round": 2, "rounds": 2})
    server = _server(tmp_path, enough)
    while server.server.round_index < 2:
        server._step(server._take(), time.perf_counter())
    assert not server.buffer  # both applied
    server.store.close()
