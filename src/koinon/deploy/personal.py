"""Personalized metrics in a deployment: each client scores its own personalized model on its own
held-out split (`data.client_test_fraction`) and sends the counts with its upload; the server
summarizes them into the round's record with the simulation's names and definition.

The simulation's `personal_accuracy_*` of round r scores, for every training client, the model
the method serves it (`koinon.personal.evaluate`): its `personalize` hook (or
`personal_predictors`) on the global model after r rounds, the server state after r rounds and the
client's own state after r rounds. A deployed client has all of these when round r + 1's task
arrives: the task carries the global model after r rounds (and the downloads, e.g. IFCA's cluster
models, standing in for the server state; a per-client download such as FedCAC's customized model
joins the client's own state), and its `--state` holds its state as of its last
accepted upload (r or earlier, as in the simulation). So it scores before it trains, with the
simulation's code and seed, and sends (correct, total) in the upload header of round r + 1. The
server writes their summary into round r's record when round r + 1 commits: the figures are the
simulation's for the clients that reported (with `clients_per_round = num_clients`, all of them),
and the last round's model reaches the clients in an EVALUATE task after the last round
(`final_evaluation`: the clients answer with an upload of empty payloads that carries the counts).

Counts that are negative, `correct > total`, or a `total` other than the held-out split the server
knows for that client, refuse the upload: a client that scores another split runs other data or
another config than the one it joined with, so its update is not to be trusted either, and a
refusal leaves its states as they were (the upload's are dropped).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from koinon.deploy.wire import pb, upload_frames
from koinon.personal.base import personal_payloads
from koinon.personal.evaluate import PersonalEvaluation, summarize
from koinon.wire import Rejected, receive_model

PREFIX = "personal_accuracy"


def own_streams(fed: Any, idx: int, round_index: int) -> list[tuple[str, bytes]]:
    """What client `idx`'s task of round `round_index` carries for it alone: the algorithm's
    `downlink_for` of the server state, encoded as the simulation encodes it
    (`koinon.personal.personal_payloads`); they go last in the task, counted by `TaskHeader.own`."""
    return personal_payloads(fed.algorithm, fed.server.server_state, idx, fed.downlink, fed.seed, round_index)


def split_own(named: list[tuple[str, Any]], own: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(downloads, this client's own) of a task's streams after the model: the last `own` are its own."""
    if own < 0 or own > len(named):
        raise Rejected(f"the task names {own} streams of this client's own among {len(named)} downloads")
    cut = len(named) - own
    return dict(named[:cut]), dict(named[cut:])


def evaluated_round(fed: Any, round_index: int, eval_every: int) -> bool:
    """Whether the simulation scores personal models after `round_index` rounds (a task of
    round `round_index` carries that model): holdout on, an evaluated round, not the start."""
    every = max(int(eval_every), 1)
    return getattr(fed, "personal", None) is not None and round_index >= 1 and round_index % every == 0


def client_counts(fed: Any, idx: int, params: torch.Tensor, downloads: dict[str, torch.Tensor],
                  client_state: dict[str, torch.Tensor], round_index: int) -> tuple[int, int]:
    """(correct, total) of client `idx`'s personalized model on its held-out split, for the
    global model `params` after `round_index` rounds; (0, 0) without a held-out split."""
    personal: PersonalEvaluation | None = getattr(fed, "personal", None)
    if personal is None or idx >= len(personal.held) or len(personal.held[idx]) == 0:
        return 0, 0
    held = personal.held[idx]
    server_state = {**fed.server.server_state, **downloads}  # the downloads are the server's state as sent
    acc, counts = PersonalEvaluation._scores(fed.algorithm, personal.trainer, [idx], params, server_state,
                                             [client_state], personal.seed, round_index, [held])
    total = int(counts[0])
    return int(round(float(acc[0]) * total)), total


def split_size(fed: Any, idx: int) -> int:
    """The held-out samples of client `idx` as the server knows them (0: none, e.g. a client with
    its own data)."""
    personal: PersonalEvaluation | None = getattr(fed, "personal", None)
    if personal is None or idx >= len(personal.held):
        return 0
    return len(personal.held[idx])


def check_counts(correct: int, total: int, expected: int) -> str | None:
    """Why the counts of an upload are refused (one line), or None."""
    if correct == 0 and total == 0:
        return None  # not evaluated this round
    if correct < 0 or total < 0:
        return f"personal counts {correct}/{total}: negative"
    if correct > total:
        return f"personal counts {correct}/{total}: more correct predictions than held-out samples"
    if total != expected:
        return (f"personal counts over {total} held-out samples; this client's held-out split "
                f"(data.client_test_fraction) has {expected}")
    return None


def summarize_counts(reports: dict[int, tuple[int, int]]) -> dict[str, float]:
    """The simulation's `personal_accuracy_mean / _weighted / _p10 / _min` over the reporting
    clients (in client order, each accuracy computed in float32 as the simulation does)."""
    ids = sorted(c for c, (_, total) in reports.items() if total > 0)
    if not ids:
        return {}
    correct = torch.tensor([float(reports[c][0]) for c in ids], dtype=torch.float32)
    counts = torch.tensor([float(reports[c][1]) for c in ids], dtype=torch.float32)
    return summarize(correct / counts, counts, PREFIX)


def drop_server_figures(extra: dict[str, Any]) -> None:
    """The server holds no client's state: its own `personal_accuracy_*` would score the global
    model with empty states, so they go (the clients' reports stand in for them)."""
    for key in [k for k in extra if k.startswith(f"{PREFIX}_")]:
        del extra[key]


class Reported(Rejected):
    """Raised by the server's upload check for a final-evaluation report: its text is the
    refusal reason, empty when the counts were taken (no payload follows such a report)."""


def final_evaluation(srv: Any) -> None:
    """After the last round: every connected client with a held-out split gets an EVALUATE task
    with the final model, the algorithm's downloads (e.g. IFCA's cluster models) and its own
    (`downlink_for`, e.g. FedCAC's customized model), all float32 as the simulation's evaluation
    reads them from the server state, and answers with its counts, which go into the last record.
    Skipped under SecAgg+ (see `koinon.deploy.secure`: no per-client figures there) and when the
    last record has the figures (a restart). The task's bytes are not counted in `downlink_total`,
    as the simulation's evaluation sends nothing."""
    fed = srv.fed
    total = srv.cfg.server.rounds
    records = srv.store.records()
    if (getattr(fed, "personal", None) is None or srv.secure is not None
            or not records or f"{PREFIX}_mean" in records[-1]):
        return
    with srv.lock:
        now = time.monotonic()
        srv.eval_clients = {m.idx for m in srv.members.values() if srv._connected(m, now) and split_size(fed, m.idx)}
        srv.evaluating = total
        srv.deadline = now + srv.cfg.deploy.round_timeout_s
        srv.changed.notify_all()
        while not srv.eval_clients <= set(srv.personal.get(total, {})) and time.monotonic() < srv.deadline:
            srv.changed.wait(min(1.0, max(srv.deadline - time.monotonic(), 0.01)))
        srv.evaluating = None
        reports = srv.personal.pop(total, {})
    if figures := summarize_counts(reports):
        srv.store.merge_record(total, figures)
        srv._write_metrics()


def evaluation_task(srv: Any, member: Any) -> Any:
    """The EVALUATE task of `member` during `final_evaluation` (None: it has reported, or it is
    not asked)."""
    if member.idx not in srv.eval_clients or member.idx in srv.personal.get(srv.evaluating, {}):
        return None
    fed = srv.fed
    state = fed.server.server_state
    hook = getattr(fed.algorithm, "downlink_for", None)
    own = sorted(hook(state, member.idx).items()) if hook is not None else []
    named = [("model", fed.params), *((n, state[n]) for n in fed.algorithm.downloads), *own]
    payloads = [t.detach().float().reshape(-1).contiguous().numpy().tobytes() for _, t in named]
    header = pb.TaskHeader(status=pb.TaskHeader.EVALUATE, round=srv.evaluating, layout_hash=srv.layout_hash,
                           codec="float32", streams=[n for n, _ in named], sizes=[len(p) for p in payloads],
                           seed=srv.cfg.seed, own=len(own))
    return header, payloads


def take_report(srv: Any, member: Any, header: Any) -> str:
    """Keep a final-evaluation report (counts already checked); "" when taken."""
    if member.idx not in srv.eval_clients:
        return f"no evaluation was asked of client {member.name}"
    with srv.lock:
        srv.personal.setdefault(int(header.round), {})[member.idx] = (int(header.personal_correct),
                                                                      int(header.personal_total))
        srv.changed.notify_all()
    return ""


def report(stub: Any, worker: Any, idx: int, header: Any, payloads: list[bytes], state: Any,
           layout_hash: str) -> None:
    """Client side of an EVALUATE task: score, then send the counts in an upload header."""
    fed = worker.fed
    if not payloads or (header.streams and header.streams[0] != "model"):
        raise Rejected("an EVALUATE task must bring the model first; this one did not")
    params = receive_model(fed.downlink, None, payloads[:1], True, fed.layout.numel)
    numel = fed.layout.numel
    if any(len(p) != numel * 4 for p in payloads[1:]):
        raise Rejected(f"an evaluation download is not {numel} float32 values")
    named = [(n, torch.frombuffer(bytearray(p), dtype=torch.float32)) for n, p in zip(header.streams[1:], payloads[1:])]
    down, own = split_own(named, int(header.own))
    counts = (client_counts(fed, idx, params, down, {**state.algorithm, **own}, int(header.round))
              if worker.spec.partition >= 0 else (0, 0))
    streams = list(fed.server.streams)
    up = pb.UploadHeader(round=header.round, layout_hash=layout_hash, codec=fed.codec.name, streams=streams,
                         sizes=[0] * len(streams), num_samples=worker.num_samples, client_index=idx,
                         personal_correct=counts[0], personal_total=counts[1])
    stub.Upload(upload_frames(up, [b""] * len(streams)), timeout=60.0)


__all__ = ["Reported", "check_counts", "client_counts", "drop_server_figures", "evaluated_round", "split_size",
           "evaluation_task", "final_evaluation", "own_streams", "report", "split_own", "summarize_counts",
           "take_report"]
