"""KAFAL: knowledge-aware federated active learning (Cao et al. 2022,
https://arxiv.org/abs/2211.13579; official code github.com/ycao5602/KAFAL): clients start
mostly unlabeled (`data.label_fraction`, `data.unlabeled_clients`; `koinon.personal.labels`)
and buy labels within a budget.

Each round a client trains from the received model with the knowledge-compensatory federated
update (KCFU), two parts:

- a balanced classifier: its labeled samples' cross-entropy on the logits shifted by
  log n_c, n_c its label count of class c (Balanced Softmax: the frequent classes' bias is taken
  out of what the shared model learns; a class it has no label of drops out);
- compensation on weak classes: as many of its unlabeled samples as it has labels, drawn afresh
  each round, join the batches with kd * Gamma(x) * mean_c KL(p_global(x) || p_local(x)) as
  their whole loss, Gamma(x) = r_k / sum_c r_c for the class k the global model predicts, where
  r_c = (sum n) / n_c for the classes it has labels of and 0 for the others: the global model
  teaches most where the client is weakest.

Then, every `query_every` rounds while its budget lasts, it asks the annotator
(`PartlyLabeled.reveal`) for the labels of `query_per_round` of its unlabeled samples, picked by
knowledge-specialized active sampling (KSAS): the samples of largest symmetric KL divergence
between its freshly trained local model and the global model it received, both logits shifted
by log n_c first (`ksas_scores`): the client's specialized knowledge, its frequent classes, is
intensified, so it buys the samples of its own classes on which the two models disagree - the
paper's design ("selects more informative data points from its specialized classes"; KCFU's
balanced classifier is what keeps the model from leaning to them). The labels bought stay on
the client (state `queried`: their indices; in a deployment, the client's `--state`) and join
its training set, and its counts n_c, from the next round on; `label_budget` caps the labels a
client buys over the whole run (its initial labels not counted). `sampling = "random"` buys the
same number of labels uniformly at random (the baseline the paper compares against),
`"entropy"` by the global model's predictive entropy. `kd = 0` drops the compensation,
`balanced = false` the balanced classifier; both off is plain FedAvg local SGD on the labels
(the sampling measured alone). With one local step a round (a client with a handful of labels
and batch size 16) the compensation does nothing: the local model equals its teacher at the only
step, where the KL divergence has zero gradient.

Where our setting differs from the paper's, our choices: queries come every `query_every`
rounds in the same run (the paper retrains for 50 rounds per query cycle); the compensation's
unlabeled inputs are not mixed up (the paper blends pairs of them, Beta(2, 2)), and they are a
fresh random draw of the labeled set's size per round rather than a paired unlabeled batch per
labeled batch; the upload is weighted by the samples trained on (labeled plus that draw).
Sampling costs one forward pass of two models over the client's unlabeled pool per query.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.data.federated import FederatedData
from koinon.personal.labels import PartlyLabeled
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer

SAMPLING = ("ksas", "random", "entropy")


def ksas_scores(local_logits: torch.Tensor, global_logits: torch.Tensor, counts: torch.Tensor | None = None
                ) -> torch.Tensor:
    """`[n]`: KSAS's knowledge-specialized discrepancy per sample, the symmetric KL divergence
    (KL(g || l) + KL(l || g)) / 2 of the local and global predictions after both logits are
    shifted by log n_c, the client's label count of class c (its specialized knowledge
    intensified: classes it holds many labels of weigh more, classes it has no label of drop
    out). `counts = None` (or no label at all): the plain symmetric KL."""
    lo, go = local_logits.float(), global_logits.float()
    if counts is not None and bool((counts > 0).any()):
        keep = counts > 0
        shift = counts[keep].float().log().to(lo.device)
        lo, go = lo[:, keep] + shift, go[:, keep] + shift
    lp, gp = lo.log_softmax(dim=1), go.log_softmax(dim=1)
    return 0.5 * ((gp.exp() * (gp - lp)).sum(dim=1) + (lp.exp() * (lp - gp)).sum(dim=1))


def compensation_weights(counts: torch.Tensor) -> torch.Tensor:
    """`[C]`: KCFU's Gamma per predicted class, r_c / sum r with r_c = (sum n) / n_c where the
    client has labels of class c (n_c > 0), else 0."""
    counts = counts.float()
    r = torch.where(counts > 0, counts.sum() / counts.clamp_min(1.0), torch.zeros_like(counts))
    return r / r.sum().clamp_min(1e-12)


class _KCFULoss:
    """Per-sample loss of KCFU's batches: every sample is `-1 - row` of the round's tables. A
    labeled row (`label >= 0`): cross-entropy on the logits + its client's log n_c (`shift`, a
    class without labels at -1e4, i.e. out), times `scale` (2 where as many unlabeled samples join
    the batches: a batch's mean is then about the paper's labeled mean plus unlabeled mean); an
    unlabeled row: weight * mean_c KL(teacher || p)."""

    def __init__(self, label: torch.Tensor, shift: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                 scale: float = 2.0) -> None:
        self.label, self.shift, self.teacher, self.weight, self.scale = label, shift, teacher, weight, scale

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 2:
            raise ValueError("client.algorithm = 'kafal' needs a classifier ([N, C] outputs)")
        row = (-1 - targets).clamp_min(0)
        label = self.label[row]
        labeled = label >= 0
        ce = F.cross_entropy(outputs + self.shift[row].to(outputs.dtype), label.clamp_min(0), reduction="none")
        t = self.teacher[row].to(outputs.dtype)
        kl = (t * (t.clamp_min(1e-12).log() - outputs.log_softmax(dim=1))).mean(dim=1)
        return torch.where(labeled, self.scale * ce, self.weight[row].to(outputs.dtype) * kl)


def pick(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` highest scores (ties: the earlier position), in ascending order."""
    count = min(count, len(scores))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:count].sort().values


@CLIENT_ALGORITHMS.register("kafal")
class KAFAL(LocalSGD):
    """Federated active learning under a label budget (see the module docstring)."""

    name = "kafal"

    def __init__(self, label_budget: int = 40, query_per_round: int = 8, sampling: str = "ksas",
                 kd: float = 1.0, query_every: int = 1, balanced: bool = True) -> None:
        if not kd >= 0:
            raise ValueError(f"client.kd must be >= 0, got {kd}")
        self.kd = float(kd)
        for key, value in (("label_budget", label_budget), ("query_per_round", query_per_round)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"client.{key} must be an integer >= 0, got {value!r}")
        if not isinstance(query_every, int) or isinstance(query_every, bool) or query_every < 1:
            raise ValueError(f"client.query_every must be an integer >= 1, got {query_every!r}")
        self.query_every = query_every
        if not isinstance(balanced, bool):
            raise ValueError(f"client.balanced must be true or false, got {balanced!r}")
        self.balanced = balanced
        if sampling not in SAMPLING:
            raise ValueError(f"client.sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.label_budget = label_budget
        self.query_per_round = query_per_round
        self.sampling = sampling

    def trained_bounds(self, labeled: int, held: int) -> tuple[int, int]:
        """The samples a client trains on in a round (its upload's weight; `koinon.deploy.labels`):
        its labels plus those it bought (at most `label_budget`), and with `kd` a draw of as many of
        its unlabeled ones."""
        return labeled, min(held, (labeled + self.label_budget) * (2 if self.kd else 1))

    @torch.no_grad()
    def _logits(self, trainer: CohortTrainer, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        trainer.module.eval()
        out = functional_call(trainer.module, trainer.layout.views(params[: trainer.layout.numel]), (x,))
        trainer.module.train()
        return out.cpu()

    def query(self, trainer: CohortTrainer, client: int, pool: torch.Tensor, local: torch.Tensor,
              global_params: torch.Tensor, count: int, seed: int, round_index: int,
              counts: torch.Tensor | None = None) -> torch.Tensor:
        """The sample indices (from `pool`) whose labels `client` buys this round."""
        if count <= 0 or len(pool) == 0:
            return torch.zeros(0, dtype=torch.long)
        if self.sampling == "random":
            g = generator(seed, round_index, client, 0xAC71)
            return pool[torch.randperm(len(pool), generator=g)[: min(count, len(pool))].sort().values]
        x = trainer.x_train[pool.to(trainer.x_train.device)]
        g_logits = self._logits(trainer, global_params, x)
        if self.sampling == "entropy":
            logp = g_logits.float().log_softmax(dim=1)
            scores = -(logp.exp() * logp).sum(dim=1)
        else:
            scores = ksas_scores(self._logits(trainer, local, x), g_logits, counts)
        return pool[pick(scores, count)]

    def _kcfu_view(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor, y: torch.Tensor,
                   indices: list[torch.Tensor], bought: list[torch.Tensor], seed: int, round_index: int
                   ) -> CohortTrainer:
        """A trainer view whose batches hold each client's labeled samples and a fresh draw of as
        many of its unlabeled ones, every sample `-1 - index` into the round's KCFU tables."""
        from koinon.personal.evaluate import with_steps

        data = trainer.data
        assert isinstance(data, PartlyLabeled)
        ds = data.dataset
        n, c = len(y), ds.num_classes
        label = torch.full((n,), -1, dtype=torch.long)
        shift = torch.zeros(n, c)
        teacher = torch.zeros(n, c)
        weight = torch.zeros(n)
        new_indices = list(indices)
        for i, cid in enumerate(client_ids):
            lab = indices[cid]
            counts = torch.bincount(y[lab].cpu(), minlength=c)
            pool = data.unlabeled[cid]
            if len(bought[i]):
                pool = pool[~torch.isin(pool, bought[i])]
            g = generator(seed, round_index, cid, 0xCF0)
            draw = pool[torch.randperm(len(pool), generator=g)[: min(len(lab), len(pool))]].sort().values
            if not self.kd:
                draw = draw[:0]
            label[lab] = y[lab].cpu()
            if self.balanced:
                shift[lab] = torch.where(counts > 0, counts.float().clamp_min(1.0).log(), torch.full((c,), -1e4))
            if len(draw):
                gp = self._logits(trainer, global_params if global_params.dim() == 1 else global_params[i],
                                  trainer.x_train[draw.to(trainer.x_train.device)]).float().softmax(dim=1)
                teacher[draw] = gp
                weight[draw] = self.kd * compensation_weights(counts)[gp.argmax(dim=1)]
            new_indices[cid] = torch.cat([lab, draw]).sort().values
        codes = ds.y_train.clone()
        every = torch.cat([new_indices[cid] for cid in client_ids]) if client_ids else torch.zeros(0, dtype=torch.long)
        codes[every] = -1 - every
        view = with_steps(trainer, data=FederatedData(dataclasses.replace(ds, y_train=codes), new_indices))
        view._manual = None  # the hand-written backward is plain cross-entropy; this loss is not
        dev = trainer.device
        view.loss_fn = _KCFULoss(label.to(dev), shift.to(dev), teacher.to(dev), weight.to(dev),
                                 2.0 if self.kd else 1.0)
        return view

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        data = trainer.data
        if not isinstance(data, PartlyLabeled):  # every label known: nothing to buy, FedAvg
            return trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                     algorithm=LocalSGD())
        from koinon.personal.evaluate import with_steps

        ds = data.dataset
        y = ds.y_train.clone()
        indices = list(data.client_indices)
        bought = []
        for c, st in zip(client_ids, client_states):
            queried = st.get("queried", torch.zeros(0, dtype=torch.long)).cpu().long()
            bought.append(queried)
            if len(queried):
                y[queried] = data.reveal(queried)
                indices[c] = torch.cat([data.client_indices[c], queried]).sort().values
        if self.kd or self.balanced:
            view = self._kcfu_view(trainer, client_ids, global_params, y, indices, bought, seed, round_index)
        else:
            view = with_steps(trainer, data=FederatedData(dataclasses.replace(ds, y_train=y), indices))
        own_idx, own_steps = view.schedule(client_ids, seed, round_index)
        result = view.run_steps(client_ids, global_params, server_state, client_states, own_idx, own_steps,
                                algorithm=LocalSGD())
        assert result.deltas is not None
        states = []
        for i, c in enumerate(client_ids):
            have = bought[i]
            pool = data.unlabeled[c]
            if len(have):
                pool = pool[~torch.isin(pool, have)]
            count = min(self.query_per_round, self.label_budget - len(have))
            if (round_index + 1) % self.query_every:
                count = 0  # between query cycles
            counts = torch.bincount(y[indices[c]].cpu(), minlength=ds.num_classes)
            local = (global_params + result.deltas[i]) if global_params.dim() == 1 else global_params[i] + result.deltas[i]
            new = self.query(trainer, c, pool, local, global_params if global_params.dim() == 1 else global_params[i],
                             count, seed, round_index, counts)
            states.append({"queried": torch.cat([have, new]).sort().values})
        result.client_states = states
        return result


def labels_used(data: FederatedData, client_states: dict[int, State]) -> int:
    """Labels a run has used: the clients' initial labels and every label bought since."""
    initial = data.labeled_count if isinstance(data, PartlyLabeled) else int(data.sizes.sum())
    return initial + sum(len(st.get("queried", ())) for st in client_states.values())
