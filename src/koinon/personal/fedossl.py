"""FedoSSL: federated open-world semi-supervised learning (Zhang et al. 2023,
https://arxiv.org/abs/2305.00771): clients with few or no labels, and classes that no client has
a label of ("novel"), present on some clients only.

Each round a client trains on its labeled samples (cross-entropy) and on its unlabeled ones
(`koinon.personal.labels`: `data.unlabeled_clients`, `data.label_fraction`,
`data.unseen_classes`) with pseudo-labels from the model it received, calibrated and weighted
by their certainty:

1. calibration: the received (global) model's class probabilities q_i on the client's unlabeled
   samples are divided by their mean over those samples (the marginal the global model assigns
   to the client's unlabeled data) and renormalized, t_i = (q_i / qbar) / sum(q_i / qbar). A
   class the global model under-predicts - a novel class, which no label supports, or one rare
   on this client - can then win pseudo-labels where it stands out, instead of every unlabeled
   sample being pulled into the seen classes (the bias the paper's calibration module is for);
2. uncertainty-aware suppression: sample i's pseudo-label argmax t_i counts with weight
   w_i = lam * (1 - H(t_i) / log C) when max t_i >= `threshold`, else 0 (uncertain samples,
   most often those of classes only one client holds, are suppressed instead of dominating);
3. local training on the labeled samples (weight 1) and the pseudo-labeled ones (weight w_i > 0)
   together, by the configured local optimizer; samples below the threshold sit this round out
   (as FixMatch masks them). The upload is the model delta, weighted by the samples it trained
   on, so a client without labels counts by its pseudo-labeled samples.

Where the paper leaves details open or ties them to its backbone, our choices: the pseudo-labels
come from the received global model, once per round (not from the local model per step; the
global model is what aggregation made of every client's data, which is the paper's point about
locally vs globally unseen classes); calibration by the client's own marginal stands for the
paper's centroid-based calibration module, which needs a projection head our models do not
have; the suppression weight is 1 minus the normalized entropy; no pairwise (ORCA) objective.
Novel classes are scored as open-world learning scores them: `novel_accuracy` after a
Hungarian match of outputs to classes (`koinon.personal.labels`). Without hidden labels
FedoSSL is FedAvg.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.data.federated import FederatedData
from koinon.personal.labels import PartlyLabeled
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

_SCALE = 1000  # pseudo-label weights travel inside the label, quantized to 1/1000


def calibrated_targets(probs: torch.Tensor, threshold: float, calibrate: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels `[n]`, weights in [0, 1] `[n]`) of unlabeled samples whose global-model
    probabilities are `probs` (`[n, C]`): steps 1 and 2 of the module docstring (lam = 1;
    `calibrate = False` skips step 1)."""
    if len(probs) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    t = probs
    if calibrate:
        t = probs / probs.mean(dim=0).clamp_min(1e-12)
        t = t / t.sum(dim=1, keepdim=True)
    top, label = t.max(dim=1)
    entropy = -(t * t.clamp_min(1e-12).log()).sum(dim=1)
    weight = (1.0 - entropy / math.log(probs.shape[1])).clamp(0.0, 1.0)
    return label, torch.where(top >= threshold, weight, torch.zeros_like(weight))


def encode(labels: torch.Tensor, weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pseudo-labels and their weights as negative class indices (true labels are >= 0), so the
    trainer's batches carry them like labels: -1 - (label + C * round(1000 w))."""
    return -1 - (labels + num_classes * (weights * _SCALE).round().long())


class _SemiSupervisedLoss:
    """Per-sample loss of a batch that mixes labels (>= 0) and encoded pseudo-labels (< 0)."""

    def __init__(self, num_classes: int, lam: float) -> None:
        self.num_classes = num_classes
        self.lam = lam

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 2:
            raise ValueError("client.algorithm = 'fedossl' needs a classifier ([N, C] outputs)")
        labeled = targets >= 0
        code = (-1 - targets).clamp_min(0)
        target = torch.where(labeled, targets, code % self.num_classes)
        weight = torch.where(labeled, torch.ones_like(target, dtype=outputs.dtype),
                             self.lam * (code // self.num_classes).to(outputs.dtype) / _SCALE)
        return F.cross_entropy(outputs, target, reduction="none") * weight


@CLIENT_ALGORITHMS.register("fedossl")
class FedoSSL(LocalSGD):
    """Open-world semi-supervised learning with unlabeled clients and unseen classes (see the
    module docstring). `lam`: weight of the pseudo-labeled loss; `threshold`: the least
    calibrated confidence a pseudo-label needs; `calibrate = False` takes the global model's
    probabilities as they are (the ablation of step 1)."""

    name = "fedossl"

    def __init__(self, lam: float = 1.0, threshold: float = 0.5, calibrate: bool = True) -> None:
        if not lam >= 0:
            raise ValueError(f"client.lam must be >= 0, got {lam}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"client.threshold must be in [0, 1], got {threshold}")
        self.lam = float(lam)
        self.threshold = float(threshold)
        self.calibrate = bool(calibrate)

    @torch.no_grad()
    def pseudo_labels(self, trainer: CohortTrainer, global_params: torch.Tensor, indices: torch.Tensor,
                      num_classes: int) -> torch.Tensor:
        """Encoded calibrated pseudo-labels of one client's unlabeled `indices`."""
        if len(indices) == 0:
            return torch.zeros(0, dtype=torch.long)
        x = trainer.x_train[indices.to(trainer.x_train.device)]
        trainer.module.eval()
        logits = functional_call(trainer.module, trainer.layout.views(global_params[: trainer.layout.numel]), (x,))
        trainer.module.train()
        label, weight = calibrated_targets(logits.float().softmax(dim=1).cpu(), self.threshold, self.calibrate)
        return encode(label, weight, num_classes)

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        data = trainer.data
        if not isinstance(data, PartlyLabeled):  # every label known: FedAvg
            return trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                     algorithm=LocalSGD())
        from koinon.personal.evaluate import with_steps

        ds = data.dataset
        y = ds.y_train.clone()
        indices = list(data.client_indices)
        for c in client_ids:
            extra = data.unlabeled[c]
            codes = self.pseudo_labels(trainer, global_params, extra, ds.num_classes)
            used = codes <= -1 - ds.num_classes  # weight > 0 (quantized): this round's pseudo-labeled samples
            y[extra[used]] = codes[used]
            indices[c] = torch.cat([data.client_indices[c], extra[used]]).sort().values
        view = with_steps(trainer, data=FederatedData(dataclasses.replace(ds, y_train=y), indices))
        view._manual = None  # the hand-written backward is plain cross-entropy; this loss is weighted
        view.loss_fn = _SemiSupervisedLoss(ds.num_classes, self.lam)
        all_idx, all_steps = view.schedule(client_ids, seed, round_index)
        return view.run_steps(client_ids, global_params, server_state, client_states, all_idx, all_steps,
                              algorithm=LocalSGD())
