"""Labels a federation does not have: unlabeled clients, partly labeled clients, unseen classes.

Data settings (`[data]` keys; `LabelSetting` in the Python API, `Federation(labels=...)`):

- `unlabeled_clients`: a share (< 1) or a count (>= 1) of the training clients whose training
  labels are all hidden (a seeded choice);
- `label_fraction`: the share of every other client's training samples that keep their label
  (a seeded choice per client; at least one sample where the client has any);
- `unseen_classes`: classes whose labels are hidden on every client: their samples exist only as
  unlabeled data (the open-world setting of FedoSSL: "novel" classes, present on some clients
  and not on others as the partition puts them).

Labels are hidden after each client's held-out split is set aside, so the held-out samples keep
theirs and the personal metrics (`personal_accuracy_*`) are reported for every client,
unlabeled ones included. A hidden sample leaves the client's training indices (supervised
methods never see it; a fully unlabeled client then trains nothing and weighs zero in FedAvg)
and goes to `PartlyLabeled.unlabeled[client]`; its label in the dataset is overwritten with
`UNLABELED`, so no code can read it by accident. Semi-supervised methods (`fedossl`) train on
the unlabeled samples too; active learning (`kafal`) asks `PartlyLabeled.reveal` - the
annotator - for the labels it buys within its budget.

With `unseen_classes`, each evaluation reports `seen_accuracy` (the global model on the test
samples of seen classes) and `novel_accuracy` (on the test samples of unseen classes, after
matching predicted classes to true ones one-to-one by the Hungarian method over the whole test
split, as open-world
semi-supervised learning is scored: a model that never saw a label of a class can only find it
as a cluster, under whatever output it picks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from koinon.data.datasets import Dataset
from koinon.data.federated import FederatedData
from koinon.local.losses import evaluate
from koinon.params import Layout

UNLABELED = -100  # the label of a hidden sample (cross-entropy's ignore_index)
LABEL_STREAM = 0x1AB31  # seeds the choice of hidden labels apart from every other choice


@dataclass
class PartlyLabeled(FederatedData):
    """`FederatedData` whose `client_indices` are the labeled training samples; `unlabeled[c]`
    are client c's samples without a label (their dataset label is `UNLABELED`)."""

    unlabeled: list[torch.Tensor] = field(default_factory=list)
    oracle: torch.Tensor | None = field(default=None, repr=False)  # the hidden labels, for `reveal` only

    def reveal(self, indices: torch.Tensor) -> torch.Tensor:
        """The true labels of hidden samples: what an annotator answers to an active learner's
        query. Only label-buying methods call it, and they count what they ask."""
        if self.oracle is None:
            raise ValueError("no hidden labels to reveal")
        return self.oracle[indices]

    @property
    def labeled_count(self) -> int:
        return int(sum(len(ix) for ix in self.client_indices))


@dataclass(frozen=True)
class LabelSetting:
    """Which labels are hidden (see the module docstring); the defaults hide none."""

    unlabeled_clients: float = 0.0
    label_fraction: float = 1.0
    unseen_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        u = self.unlabeled_clients
        if isinstance(u, bool) or not isinstance(u, (int, float)) or u < 0 or (u >= 1 and u != int(u)):
            raise ValueError(f"data.unlabeled_clients = {u!r}: a share in [0, 1) or a count (integer >= 1)")
        if isinstance(self.label_fraction, bool) or not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"data.label_fraction = {self.label_fraction!r}: must be in (0, 1]")
        bad = [c for c in self.unseen_classes if isinstance(c, bool) or not isinstance(c, int) or c < 0]
        if bad or len(set(self.unseen_classes)) != len(self.unseen_classes):
            raise ValueError(f"data.unseen_classes = {list(self.unseen_classes)!r}: distinct class indices >= 0")

    @property
    def active(self) -> bool:
        return bool(self.unlabeled_clients) or self.label_fraction < 1.0 or bool(self.unseen_classes)

    def apply(self, data: FederatedData, seed: int) -> PartlyLabeled:
        """`data` with the setting's labels hidden (seeded; the dataset is copied, not changed)."""
        ds = data.dataset
        novel = list(self.unseen_classes)
        if novel and max(novel) >= ds.num_classes:
            raise ValueError(f"data.unseen_classes = {novel}: the dataset has classes 0..{ds.num_classes - 1}")
        if len(novel) >= ds.num_classes:
            raise ValueError(f"data.unseen_classes = {novel}: at least one class must keep its labels")
        n = data.num_clients
        u = self.unlabeled_clients
        count = int(u) if u >= 1 else int(round(u * n))
        if count >= n:
            raise ValueError(f"data.unlabeled_clients = {u} hides the labels of {count} of {n} training clients; "
                             "at least one must keep labels")
        rng = np.random.default_rng([seed, LABEL_STREAM])
        dark = {int(c) for c in rng.choice(n, count, replace=False)} if count else set()
        y = ds.y_train
        novel_t = torch.tensor(novel, dtype=y.dtype)
        labeled, unlabeled = [], []
        for c, ix in enumerate(data.client_indices):
            order = torch.from_numpy(rng.permutation(len(ix)))
            keep = torch.zeros(len(ix), dtype=torch.bool)
            if c not in dark and len(ix):
                k = max(1, int(round(self.label_fraction * len(ix))))
                keep[order[:k]] = True
            if novel:
                keep &= ~torch.isin(y[ix], novel_t)
            labeled.append(ix[keep])
            unlabeled.append(ix[~keep])
        hidden = torch.cat(unlabeled) if unlabeled else torch.zeros(0, dtype=torch.long)
        y_new = y.clone()
        y_new[hidden] = UNLABELED
        oracle = torch.full_like(y, UNLABELED)
        oracle[hidden] = y[hidden]
        return PartlyLabeled(dataclasses.replace(ds, y_train=y_new), labeled, unlabeled, oracle)

    @torch.no_grad()
    def metrics(self, module: torch.nn.Module, layout: Layout, params: torch.Tensor, dataset: Dataset
                ) -> dict[str, float]:
        """`seen_accuracy` and `novel_accuracy` of the global model on the test split (only
        with `unseen_classes`)."""
        if not self.unseen_classes:
            return {}
        novel = torch.tensor(self.unseen_classes)
        is_novel = torch.isin(dataset.y_test, novel)
        out: dict[str, float] = {}
        if bool((~is_novel).any()):
            out["seen_accuracy"] = evaluate(module, layout, params, dataset.x_test[~is_novel],
                                            dataset.y_test[~is_novel])[0]
        if bool(is_novel.any()):
            module.eval()
            pred = torch.func.functional_call(module, layout.views(params), (dataset.x_test,)).argmax(1)
            module.train()
            out["novel_accuracy"] = matched_accuracy(pred, dataset.y_test, dataset.num_classes, is_novel)
        return out


def matched_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int, subset: torch.Tensor | None = None
                     ) -> float:
    """Accuracy on `subset` (default: every sample) after the one-to-one map of predicted
    classes to true classes that matches the most samples of the whole set (Hungarian method on
    the confusion counts), as open-world semi-supervised learning is scored (ORCA, FedoSSL): the
    map is found on all samples, so an output that seen-class samples own cannot also stand for
    a novel class."""
    if len(y) == 0:
        return 0.0
    # Imported here: scipy.optimize takes 0.1-0.2 s to import, which every run would pay.
    from scipy.optimize import linear_sum_assignment

    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (pred.numpy(), y.numpy()), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = torch.zeros(num_classes, dtype=torch.long)
    mapping[torch.from_numpy(rows)] = torch.from_numpy(cols)
    hit = mapping[pred] == y
    if subset is not None:
        hit = hit[subset]
    return float(hit.float().mean()) if len(hit) else 0.0


def setting_from(unlabeled_clients: float = 0.0, label_fraction: float = 1.0, unseen_classes=()) -> LabelSetting | None:
    """The `LabelSetting` of `[data]`'s keys, or None where they hide nothing."""
    setting = LabelSetting(unlabeled_clients, label_fraction, tuple(unseen_classes))
    return setting if setting.active else None


__all__ = ["UNLABELED", "LabelSetting", "PartlyLabeled", "matched_accuracy", "setting_from"]
