"""Validation rules of the server state machine that the deployment relies on (fault 8 and the
round record): a non-finite new model is refused, an optional update norm bound, and a client
refused first and accepted later is not listed as rejected."""

import pytest
import torch

from koinon.config import Config
from koinon.experiment.runner import build_federation
from koinon.wire import Rejected


@pytest.fixture
def fed():
    cfg = Config.from_dict({"data": {"name": "digits", "num_clients": 3}, "model": {"name": "mlp", "hidden": [8]},
                            "runtime": {"name": "inprocess"}, "server": {"clients_per_round": 2}})
    return build_federation(cfg)


def payload(fed, value: float) -> list[bytes]:
    data, _ = fed.codec.encode(torch.full((fed.layout.numel,), value), {}, torch.Generator())
    return [data]


def run_round(fed, uploads: dict[int, float]):
    server = fed.server
    server.open_round(server.round_index, sorted(uploads))
    for client, value in uploads.items():
        rows = server.decode(client, payload(fed, value))
        server.accept(client, server.open.index, rows, 10, 0.5, payload(fed, value))
    return server.close_round()


def test_a_finite_but_huge_aggregate_is_refused_and_the_model_kept(fed):
    start = fed.server.params.clone()
    # 1e20 passes the finite check of an update, but the model it makes overflows every forward pass.
    result = run_round(fed, {0: 1e20, 1: 1e-3})
    assert torch.equal(fed.server.params, start)
    assert not result.applied and "non-finite" in result.refused
    assert "update_refused" in result.as_dict() and result.num_clients == 0
    result = run_round(fed, {0: 1e-3, 1: 1e-3})  # training goes on from the unchanged model
    assert result.applied and "update_refused" not in result.as_dict()
    assert torch.allclose(fed.server.params, start + 1e-3)


def test_an_update_norm_bound_refuses_with_the_key_named(fed):
    server = fed.server
    server.bound_update_norm(10.0)
    server.open_round(0, [0, 1])
    numel = fed.layout.numel
    with pytest.raises(Rejected, match="deploy.max_update_norm"):
        server.decode(0, payload(fed, 1.0))  # norm sqrt(numel) > 10
    assert numel > 100
    server.decode(1, payload(fed, 1e-3))  # norm < 10
    with pytest.raises(ValueError):
        server.bound_update_norm(-1.0)


def test_a_client_refused_then_accepted_is_not_listed_as_rejected(fed):
    server = fed.server
    server.open_round(0, [0, 1])
    server.reject(0, "undecodable delta")
    for client in (0, 1):
        server.accept(client, 0, server.decode(client, payload(fed, 1e-3)), 10, 0.5, payload(fed, 1e-3))
    result = server.close_round()
    assert result.rejected == [] and result.included == [0, 1] and result.num_clients == 2
    assert result.reasons == {0: "undecodable delta"}  # the refusal stays on record
