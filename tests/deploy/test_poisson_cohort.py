"""A Poisson cohort (central DP's) has no fixed size: a deployed round waits for all of it, as
the simulation keeps every member, instead of closing at k updates and refusing the rest as late."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from koinon.config import Config
from koinon.deploy.asynchronous import build_for_deployment
from koinon.deploy.server import FederationServer, Member, check_deployable
from koinon.deploy.store import Store


def _server(tmp_path, **deploy) -> tuple[FederationServer, object]:
    cfg = Config.from_dict({"seed": 0, "data": {"name": "digits", "num_clients": 6},
                            "model": {"name": "mlp", "hidden": [8]}, "runtime": {"name": "inprocess"},
                            "client": {"steps": 1}, "server": {"clients_per_round": 2, "rounds": 3},
                            "privacy": {"dp": "central", "noise_multiplier": 1.0, "clip": 1.0},
                            "deploy": {"round_timeout_s": 30, **deploy}})
    topology, _ = build_for_deployment(cfg)
    fed = check_deployable(topology, cfg)
    srv = FederationServer(cfg, fed, Store(tmp_path), tmp_path)
    for i in range(6):
        srv.members[f"c{i}"] = Member(f"c{i}", i, len(fed.data.client_indices[i]), f"partition:{i}")
        srv.members[f"c{i}"].last_seen = time.monotonic()
    return srv, fed


def _large_cohort(fed) -> tuple[int, list[int]]:
    """A round whose Poisson cohort has more than k = 2 members."""
    population = np.arange(6)
    sizes = np.array([len(fed.data.client_indices[i]) for i in range(6)])
    for r in range(50):
        cohort = fed.server.sample(r, population, sizes)
        if len(cohort) > 2:
            return r, cohort
    raise AssertionError("no cohort above k in 50 rounds")


def test_a_deployed_round_waits_for_its_whole_poisson_cohort(tmp_path):
    srv, fed = _server(tmp_path)
    assert srv.whole_cohort
    r, cohort = _large_cohort(fed)
    fed.server.round_index = r
    srv._open(r, cohort)
    zero = {"model": torch.zeros(fed.layout.numel)}
    for i in cohort[:2]:
        fed.server.accept(i, r, zero, 10, 0.1, [b"x"])
    waiter = threading.Thread(target=srv._wait)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "the round closed at k updates with cohort members still training"
    for i in cohort[2:]:
        srv._admit_round(r, srv.members[f"c{i}"])  # not late
        fed.server.accept(i, r, zero, 10, 0.1, [b"x"])
    with srv.lock:
        srv.changed.notify_all()
    waiter.join(10)
    assert not waiter.is_alive() and len(fed.server.open.rows) == len(cohort)


def test_deploy_min_clients_still_closes_a_round_early(tmp_path):
    srv, _ = _server(tmp_path / "a", min_clients=2)
    assert not srv.whole_cohort
