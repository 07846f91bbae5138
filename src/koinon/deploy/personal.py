"""Personalized metrics in a deployment: each client scores its own personalized model on its own
held-out split (`data.client_test_fraction`) and sends the counts with its upload; the server
summarizes them into the round's record with the simulation's names and definition.

The simulation's `personal_accuracy_*` of round r scores, for every training client, the model
the method serves it (`koinon.personal.evaluate`): its `personalize` hook (or
`personal_predictors`) on the global model after r rounds, the server state after r rounds and the
client's own state after r rounds. A deployed client has all of these when round r + 1's task
arrives: the task carries the global model after r rounds (and the downloads, e.g. IFCA's cluster
models, standing in for the server state), and its `--state` holds its state as of its last
accepted upload (r or earlier, as in the simulation). So it scores before it trains, with the
simulation's code and seed, and sends (correct, total) in the upload header of round r + 1. The
server writes their summary into round r's record when round r + 1 commits: the figures are the
simulation's for the clients that reported (with `clients_per_round = num_clients`, all of them),
and the last round's record has none (no round follows it to carry them).

Counts that are negative, `correct > total`, or a `total` other than the held-out split the server
knows for that client, refuse the upload: a client that scores another split runs other data or
another config than the one it joined with, so its update is not to be trusted either, and a
refusal leaves its states as they were (the upload's are dropped).
"""

from __future__ import annotations

from typing import Any

import torch

from koinon.personal.evaluate import PersonalEvaluation, summarize

PREFIX = "personal_accuracy"


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


__all__ = ["check_counts", "client_counts", "drop_server_figures", "evaluated_round", "split_size",
           "summarize_counts"]
