"""Packed extra streams (FedoSSL's centroids, reconnaissance's prototypes, FedKA's moments) as a
`koinon server` receives them: the table's shape comes from the server's model, a malformed
stream is refused for its client alone in one line, and a failing server update never leaves
the model stepped with the round open."""

import pytest
import torch

import koinon as kn
from koinon.deploy.asynchronous import build_for_deployment
from koinon.deploy.server import check_deployable
from koinon.wire import Rejected

STREAM = {"fedossl": "centroids", "reconnaissance": "prototypes", "fedka": "moments"}


def _server(algorithm):
    cfg = kn.Config()
    cfg.data.num_clients = 4
    cfg.server.clients_per_round = 2
    cfg.client.algorithm = algorithm
    cfg.client.momentum = 0.0
    if algorithm == "fedossl":
        cfg.data.label_fraction = 0.5
    fed = check_deployable(build_for_deployment(cfg)[0], cfg)
    return fed.server


def _honest(srv, algorithm):
    """A well-formed stream: the model's head is 10 outputs on a `d`-value embedding."""
    alg, numel = srv.algorithm, srv.params.numel()
    row = torch.zeros(numel)
    if algorithm == "fedka":
        d = alg.server_dim
        row[:d], row[d : 2 * d], row[-1] = 0.5, 1.0, float(d)
        return row
    c, d = alg.server_shape
    row[: c * d] = 0.1
    row[c * d] = 3.0  # output 0: three samples
    row[-3], row[-2], row[-1] = float(c), float(d), 1.0
    return row


def _malformed(srv, algorithm):
    """(name, stream) pairs a server must refuse."""
    honest = _honest(srv, algorithm)
    out = []
    if algorithm == "fedka":
        d = srv.algorithm.server_dim
        wrong = honest.clone()
        wrong[-1] = float(d + 1000)
        out.append(("wrong size", wrong))
        neg = honest.clone()
        neg[d] = -1.0
        out.append(("negative moment", neg))
    else:
        c, d = srv.algorithm.server_shape
        wrong = honest.clone()
        wrong[-3] = float(c + 2000)  # the reviewer's forgery: a finite value, an impossible table
        out.append(("wrong shape", wrong))
        marker = honest.clone()
        marker[-1] = -1.0
        out.append(("negative marker", marker))
        neg = honest.clone()
        neg[c * d + 1] = -2.0
        out.append(("negative count", neg))
    nan = honest.clone()
    nan[0] = float("nan")
    out.append(("non-finite", nan))
    return out


def _payloads(srv, rows):
    codec = srv.receiver.codec
    return [codec.encode(rows[s], {}, torch.Generator())[0] for s in srv.streams]


@pytest.mark.parametrize("algorithm", ["fedossl", "reconnaissance", "fedka"])
def test_the_server_reads_the_table_shape_from_its_model(algorithm):
    alg = _server(algorithm).algorithm
    shape = alg.server_dim if algorithm == "fedka" else alg.server_shape
    assert shape is not None  # attached: C and D are the model's, whatever an upload claims


@pytest.mark.parametrize("algorithm", ["fedossl", "reconnaissance", "fedka"])
def test_a_malformed_stream_is_refused_on_arrival_in_one_line(algorithm):
    srv = _server(algorithm)
    srv.open_round(0, [0, 1])
    numel = srv.params.numel()
    delta = torch.full((numel,), 1e-3)
    good = _payloads(srv, {"delta": delta, STREAM[algorithm]: _honest(srv, algorithm)})
    assert set(srv.decode(0, good)) == set(srv.streams)
    for name, row in _malformed(srv, algorithm):
        with pytest.raises(Rejected) as err:
            srv.decode(1, _payloads(srv, {"delta": delta, STREAM[algorithm]: row}))
        reason = str(err.value)
        assert STREAM[algorithm] in reason and "\n" not in reason, (name, reason)


@pytest.mark.parametrize("algorithm", ["fedossl", "reconnaissance", "fedka"])
def test_a_malformed_stream_taken_as_rows_costs_only_its_client_the_round(algorithm):
    """Rows handed to `accept` (as a restarted server re-reads stored ones) are checked again at
    close: the forger is rejected, the honest client's update steps the model, the round closes."""
    stream = STREAM[algorithm]
    for name, row in _malformed(_server(algorithm), algorithm):
        srv = _server(algorithm)
        before = srv.params.clone()
        srv.open_round(0, [0, 1])
        numel = srv.params.numel()
        srv.accept(0, 0, {"delta": torch.full((numel,), 1e-3), stream: _honest(srv, algorithm)}, 10, 0.1, [b"x"])
        srv.accept(1, 0, {"delta": torch.full((numel,), 5e-3), stream: row}, 10, 0.1, [b"x"])
        result = srv.close_round()
        assert srv.open is None and srv.round_index == 1, name
        assert result.applied and result.included == [0] and 1 in result.rejected, name
        assert torch.allclose(srv.params - before, torch.full((numel,), 1e-3)), name  # the honest update alone
        assert stream in result.reasons[1], (name, result.reasons[1])


def test_server_update_ignores_forged_shape_markers():
    """An attached FedoSSL merges the cohort mean with its model's C, D: forged markers in the
    mean cannot reshape the table (and unattached use still reads them)."""
    srv = _server("fedossl")
    alg, numel = srv.algorithm, srv.params.numel()
    honest = _honest(srv, "fedossl")
    forged = honest.clone()
    forged[-3] = 2010.0
    a = alg.server_update(srv.server_state, {"centroids": honest}, 0.5)["centroids"]
    b = alg.server_update(srv.server_state, {"centroids": forged}, 0.5)["centroids"]
    assert torch.equal(a, b) and a.shape == (numel,)
    c, d = alg.server_shape
    centroids, has, _ = alg.unpack(a, c, d)
    assert has[0] == 1 and torch.allclose(centroids[0].norm(), torch.tensor(1.0))


def test_a_failing_server_update_closes_the_round_with_the_model_unchanged(monkeypatch):
    srv = _server("reconnaissance")
    before, state = srv.params.clone(), srv.server_state
    srv.open_round(0, [0, 1])
    numel = srv.params.numel()
    srv.accept(0, 0, {"delta": torch.full((numel,), 1e-3), "prototypes": _honest(srv, "reconnaissance")},
               10, 0.1, [b"x"])

    def broken(server_state, uploads, cohort_fraction):
        raise RuntimeError("shape '[10, 64]' is invalid")

    monkeypatch.setattr(srv.algorithm, "server_update", broken)
    result = srv.close_round()
    assert srv.open is None and srv.round_index == 1
    assert not result.applied and "server update failed, model unchanged" in result.refused
    assert torch.equal(srv.params, before) and srv.server_state is state
