"""Hidden labels in a deployment: `koinon client` hides the labels the simulation hides.

A client that loads its shard from the run's dataset (`--data partition:I`) builds the same
federation the simulation builds, from the server's config and seed, and so the same
`koinon.personal.labels.PartlyLabeled` split: the same samples lose their label, the held-out
split keeps its own, and an active learner (`kafal`) asks the same annotator (the hidden labels,
which only `PartlyLabeled.reveal` reads). The labels a client buys are its algorithm state, so
they live in its `--state` and survive a restart.

A client with its own data (`--data module:function`) marks a sample without a label by the
label `UNLABELED` (-100, cross-entropy's ignore index) in `y_train`
(`Dataset.from_tensors(..., unlabeled=True)` accepts it). Its labeled samples are its training
set; semi-supervised methods (`fedossl`) reach the others as `PartlyLabeled.unlabeled`. It has
no annotator to buy labels from, so `kafal` refuses such a client in one line.

Sample counts: a client declares, when it joins, every training sample it holds, labeled or not
(`held_samples`; the server checks a partition's count against its own copy), and each upload
carries the samples it trained on that round (`trained_samples`, at most the declared count),
the weight the simulation gives its update (`CohortResult.num_samples`: FedoSSL's pseudo-labeled
samples count, KAFAL's bought labels count, a fully unlabeled FedAvg client weighs zero). The
server bounds a partition's count by what its algorithm declares (`trained_bounds`; exactly its
labeled count for supervised methods), an own-data client's by its declared count. SecAgg+ and
FedBuff/FedAsync weigh the declared count, so an own-data client with unlabeled samples is
refused there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from koinon.data.datasets import Dataset
from koinon.data.federated import FederatedData
from koinon.errors import KoinonError
from koinon.personal.labels import UNLABELED, PartlyLabeled


def held_samples(data: FederatedData, client: int) -> int:
    """The training samples client `client` holds: its labeled ones and, where labels are
    hidden, its unlabeled ones."""
    held = len(data.client_indices[client])
    if isinstance(data, PartlyLabeled) and client < len(data.unlabeled):
        held += len(data.unlabeled[client])
    return held


def hides_labels(data: FederatedData) -> bool:
    """Whether a client's data has samples without a label (its trained count varies)."""
    return isinstance(data, PartlyLabeled)


def own_labels(dataset: Dataset, entry_point: str, algorithm: Any, weighs_declared: str = "") -> Dataset:
    """A probe copy of a client's own `dataset` for the model checks (unlabeled samples stand
    in as class 0); refuses labels below 0 other than `UNLABELED`, `kafal` with unlabeled
    samples (no annotator), and unlabeled samples where the run weighs a client by the count it
    declared when joining (`weighs_declared` names the setting: SecAgg+, FedBuff/FedAsync)."""
    y = dataset.y_train
    marked = y == UNLABELED
    if bool(((y < 0) & ~marked).any()):
        raise KoinonError(f"--data {entry_point}: y_train holds labels below 0 other than {UNLABELED}; labels "
                          f"are classes 0..C-1, or {UNLABELED} for a sample without a label")
    if not bool(marked.any()):
        return dataset
    if weighs_declared:
        raise KoinonError(f"--data {entry_point}: y_train marks samples without a label ({UNLABELED}), which "
                          f"{weighs_declared} does not take (it weighs a client by every sample it declared when "
                          "joining); drop them or run synchronous rounds without privacy.secagg")
    if getattr(algorithm, "name", "") == "kafal":
        raise KoinonError(f"--data {entry_point}: client.algorithm = 'kafal' buys labels from an annotator, "
                          "which a client with its own data does not have; label the samples it should train on "
                          "or load a partition (--data partition:I)")
    return dataclasses.replace(dataset, y_train=torch.where(marked, torch.zeros_like(y), y))


def own_data(dataset: Dataset, idx: int) -> FederatedData:
    """A client's own data installed as client `idx` (other indices hold nothing); a
    `PartlyLabeled` where some samples carry `UNLABELED`."""
    empty = torch.zeros(0, dtype=torch.long)
    marked = dataset.y_train == UNLABELED
    everything = torch.arange(len(dataset.y_train))
    if not bool(marked.any()):
        return FederatedData(dataset, [empty] * idx + [everything])
    return PartlyLabeled(dataset, [empty] * idx + [everything[~marked]], [empty] * idx + [everything[marked]])


def trained_samples(data: FederatedData, held: int, result: Any) -> int:
    """The upload's `num_samples`: the samples the client trained on this round where labels
    are hidden (the simulation's weight), else every sample it holds (the declared count)."""
    return int(result.num_samples[0]) if hides_labels(data) else held


def trained_bounds(algorithm: Any, labeled: int, held: int) -> tuple[int, int]:
    """The least and most samples a partition client with `labeled` labels among the `held` it
    holds can have trained on in a round (the simulation's weight): what the algorithm declares
    (`trained_bounds(labeled, held)`: `kafal` adds the labels it buys and its compensation draw,
    `fedossl` its pseudo-labeled samples), else exactly `labeled` (supervised methods)."""
    bounds = getattr(algorithm, "trained_bounds", None)
    return bounds(labeled, held) if bounds is not None else (labeled, labeled)


def check_trained(num_samples: int, declared: int, bounds: tuple[int, int] | None = None) -> str | None:
    """Why an upload's `num_samples` is refused (one line), or None: equal to the count declared
    when joining (`bounds` None), or - where labels may be hidden - within `bounds` (a
    partition's `trained_bounds`; `(0, declared)` for a client with its own data)."""
    if bounds is None:
        if num_samples != declared:
            return f"num_samples {num_samples} differs from the {declared} declared when joining"
        return None
    if not 0 <= num_samples <= declared:
        return (f"num_samples {num_samples}: more than the {declared} samples declared when joining "
                "(an upload counts the samples it trained on)")
    low, high = bounds
    if not low <= num_samples <= high:
        return (f"num_samples {num_samples}: this client trains on {low}..{high} samples a round "
                "(its labeled ones, and what the algorithm adds to them)")
    return None


__all__ = ["check_trained", "held_samples", "hides_labels", "own_data", "own_labels", "trained_bounds",
           "trained_samples"]
