"""FedoSSL: federated open-world semi-supervised learning (Zhang et al. 2023,
https://arxiv.org/abs/2305.00771): clients with few or no labels, and classes that no client has
a label of ("novel"), present on some clients only.

Each round a client trains on its labeled samples (cross-entropy) and on its unlabeled ones
(`koinon.personal.labels`: `data.unlabeled_clients`, `data.label_fraction`,
`data.unseen_classes`). The outputs no client has a label of are the novel outputs (with
`unseen_classes = [8, 9]` on digits: outputs 8 and 9); the model discovers novel classes in
them. Everything a client needs is computed once per round with the model it received (its
embedding: the input of the last Linear layer, L2-normalized; its class probabilities):

1. centroids shared by the server (the paper's calibration module): one centroid per output in
   the embedding space, a seen output's the mean embedding of its labeled samples, a novel
   output's the mean embedding of the unlabeled samples assigned to it (nearest centroid by
   cosine). Each client uploads, per output, the sums and counts of those embeddings (labeled
   samples by their label, unlabeled ones by their assignment when it is a novel output) and
   which outputs it has labels of; the server's centroids are the cohort's sums over counts, so
   every client assigns to the same centroids and output 8 means the same cluster everywhere
   (a Lloyd step of k-means across the federation). A novel output gets its first centroid
   from the clients' outlying samples: the share 1 / C of each client's unlabeled samples least
   similar to every existing centroid; their mean seeds one novel output a round, in output
   order, until every novel output has a centroid;
2. pseudo-labels, calibrated and suppressed by uncertainty: the model's probabilities q_i,
   divided by their mean over the client's unlabeled samples and renormalized,
   t_i = (q_i / qbar) / sum(q_i / qbar) (a class the global model under-predicts can win where
   it stands out), give the pseudo-label argmax t_i with weight w_i = lam * (1 - H(t_i) / log C)
   when max t_i >= `threshold`, else 0 (uncertain samples, most often those of classes only one
   client holds, are suppressed instead of dominating). A sample whose nearest centroid is a
   novel output, and which is closer to that centroid than to every labeled sample of its
   client, takes that output instead (each novel output taking at most the share `cap`,
   default 1 / C, of the client's unlabeled samples: those nearest its centroid, chosen among
   all samples whose nearest centroid it is), with weight lam when its assignment
   a_i = softmax(cos(e_i, mu) / T) puts at least `threshold` on it, else 0 (an uncertain sample
   near a novel cluster sits the round out instead of being pulled into a seen class);
3. the pairwise (ORCA) objective: each unlabeled sample's nearest neighbour j among the
   client's samples (cosine of the embeddings, itself excluded) adds
   -pair * w_j * log p_i(l_j): the sample is pushed to the output its neighbour is given (l_j
   its label, w_j = 1, if it is labeled; else its pseudo-label and weight without lam);
4. local training on the labeled samples (weight 1) and the unlabeled ones with a pseudo-label
   or pair term of weight > 0, by the configured local optimizer. The upload is the model delta,
   weighted by the samples it trained on, and the centroid sums (one extra vector of the model's
   size, so the uplink doubles; the centroids are a download every sampled client receives).

Where the paper leaves details open or ties them to its backbone, our choices: the embeddings,
pseudo-labels, neighbours and centroid sums come from the received global model, once per round
(not from the local model per step), so the server's centroids describe the previous round's
model; the pair's target is fixed for the round (the neighbour's pseudo-label, not its live
output as in ORCA's symmetric BCE), so each sample's loss is its own and the batched trainer
needs no pairs inside a batch; the pairwise term acts on unlabeled samples only, without ORCA's
entropy regularizer (the shared centroids keep the novel outputs apart) or its adaptive margin;
the seen pseudo-labels' uncertainty weight is 1 minus the normalized entropy (the paper weights
by class frequency), a novel one's is 0 or 1 (entropy weights left output 9 almost without
samples on digits); "closer than every labeled sample" because a class is more than its mean
(on digits a novel centroid seeded from outliers took a sub-cluster of the 1s); the cap of
1 / C (a balanced class's share; the paper balances its local clustering with Sinkhorn-Knopp)
because a novel output still took some 1s, 2s and 3s without it (3 seeds: seen accuracy 86.5
-> 89.4, novel 59.6 -> 58.7; a margin over every seen centroid instead cost novel accuracy
first: 0.03 gave seen 89.0, novel 50.7); the server
averages centroid sums over the cohort (the paper clusters the clients' local centroids on the
server), seeded greedily from outliers instead of at random. `discover = False` turns steps 1
and 3 off (the model's calibrated pseudo-labels alone: no output without a label ever wins).
Novel classes are scored as open-world learning scores them: `novel_accuracy` after a
Hungarian match of outputs to classes (`koinon.personal.labels`). Without hidden labels FedoSSL
is FedAvg.
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
from koinon.personal.recon import body_of, check_marked, head_shape, table_shape
from koinon.update import CohortResult

if TYPE_CHECKING:
    from torch import nn

    from koinon.local.trainer import CohortTrainer
    from koinon.params import Layout


def calibrated_targets(probs: torch.Tensor, threshold: float, calibrate: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pseudo-labels `[n]`, weights in [0, 1] `[n]`) of unlabeled samples whose global-model
    probabilities are `probs` (`[n, C]`): the model's part of step 2 of the module docstring
    (lam = 1; `calibrate = False` takes `probs` as they are)."""
    t = calibrate_probs(probs, calibrate)
    return certain(t, threshold)


def calibrate_probs(probs: torch.Tensor, calibrate: bool = True) -> torch.Tensor:
    """`probs` divided by their mean over the samples, rows renormalized (`calibrate = False`:
    unchanged)."""
    if not calibrate or len(probs) == 0:
        return probs
    t = probs / probs.mean(dim=0).clamp_min(1e-12)
    return t / t.sum(dim=1, keepdim=True)


def certain(t: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax `[n]`, weight `[n]`) of distributions `t` (`[n, C]`): 1 - H(t) / log C where the
    top probability is >= `threshold`, else 0."""
    if len(t) == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    top, label = t.max(dim=1)
    entropy = -(t * t.clamp_min(1e-12).log()).sum(dim=1)
    weight = (1.0 - entropy / math.log(t.shape[1])).clamp(0.0, 1.0)
    return label, torch.where(top >= threshold, weight, torch.zeros_like(weight))


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """`[n]`: for each row of `emb` (`[n, D]`, L2-normalized), the row of largest cosine
    similarity other than itself (ties: the earlier row); itself when it is alone."""
    if len(emb) < 2:
        return torch.arange(len(emb))
    sim = emb @ emb.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(dim=1)


def assign(emb: torch.Tensor, centroids: torch.Tensor, has: torch.Tensor, temperature: float) -> torch.Tensor:
    """`[n, C]`: softmax over the outputs with a centroid (`has`) of cos(e, mu) / T (0 elsewhere)."""
    sim = emb @ F.normalize(centroids, dim=1).T
    sim = sim.masked_fill(~has.bool().unsqueeze(0), float("-inf"))
    return (sim / temperature).softmax(dim=1)


def outliers(emb: torch.Tensor, centroids: torch.Tensor, has: torch.Tensor, share: float) -> torch.Tensor:
    """Positions of the `ceil(share * n)` rows of `emb` least similar to every centroid of `has`
    (ties: the earlier row), in ascending order."""
    n = len(emb)
    k = min(n, math.ceil(share * n))
    if k == 0 or not bool(has.any()):
        return torch.zeros(0, dtype=torch.long)
    best = (emb @ F.normalize(centroids[has.bool()], dim=1).T).max(dim=1).values
    return torch.sort(best, stable=True).indices[:k].sort().values


def capped(emb: torch.Tensor, centroids: torch.Tensor, near: torch.Tensor, chosen: torch.Tensor,
           cap: float) -> torch.Tensor:
    """`chosen` (`[n]` bool: row i goes to output `near[i]`) with each output keeping at most
    `ceil(cap * n)` rows, those most similar to its centroid (ties: the earlier row)."""
    k = math.ceil(cap * len(emb))
    keep = chosen.clone()
    sim = (emb * F.normalize(centroids, dim=1)[near]).sum(dim=1)
    for j in near[chosen].unique().tolist():
        members = torch.nonzero(chosen & (near == j)).flatten()
        if len(members) > k:
            keep[members[torch.sort(sim[members], descending=True, stable=True).indices[k:]]] = False
    return keep


def merge_centroids(centroids: torch.Tensor, has: torch.Tensor, labeled: torch.Tensor, sums: torch.Tensor,
                    counts: torch.Tensor, has_labels: torch.Tensor, outlier_sum: torch.Tensor,
                    outlier_count: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The server's step (1 of the module docstring): new (centroids `[C, D]`, has-a-centroid
    `[C]`, labeled-somewhere `[C]`) from the cohort's mean sums `[C, D]`, counts `[C]`,
    has-labels flags `[C]` and outlier sum `[D]` and count. An output with counts > 0 takes
    sums / counts (L2-normalized); the others keep theirs; then, when an output no client has a
    label of has no centroid yet and outliers came, the first such output takes their mean."""
    labeled = labeled.bool() | (has_labels > 0)
    out, has = centroids.clone(), has.bool().clone()
    upd = counts > 0
    out[upd] = F.normalize(sums[upd] / counts[upd].unsqueeze(1), dim=1)
    has |= upd
    missing = ((~has | ~upd) & ~labeled).nonzero().flatten()
    if len(missing) and outlier_count > 0 and bool(labeled.any()):
        c = int(missing[0])
        out[c] = F.normalize(outlier_sum / outlier_count, dim=0)
        has[c] = True
    return out, has, labeled


class _OpenWorldLoss:
    """Per-sample loss of a batch of labels (>= 0) and unlabeled samples (-1 - row of the tables):
    lam-weighted pseudo-label cross-entropy plus the pairwise term (steps 2 and 3)."""

    def __init__(self, label: torch.Tensor, weight: torch.Tensor, pair_target: torch.Tensor, pair: float) -> None:
        self.label, self.weight, self.pair_target, self.pair = label, weight, pair_target, pair

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.dim() != 2:
            raise ValueError("client.algorithm = 'fedossl' needs a classifier ([N, C] outputs)")
        labeled = targets >= 0
        row = (-1 - targets).clamp_min(0)
        target = torch.where(labeled, targets, self.label[row])
        weight = torch.where(labeled, torch.ones_like(target, dtype=outputs.dtype), self.weight[row].to(outputs.dtype))
        loss = F.cross_entropy(outputs, target, reduction="none") * weight
        if self.pair:  # -pair * sum_c s_c log p_c: the neighbour's (pseudo-)label, by its weight
            pairwise = -(outputs.log_softmax(dim=1) * self.pair_target[row].to(outputs.dtype)).sum(dim=1)
            loss = loss + torch.where(labeled, torch.zeros_like(pairwise), self.pair * pairwise)
        return loss


@CLIENT_ALGORITHMS.register("fedossl")
class FedoSSL(LocalSGD):
    """Open-world semi-supervised learning with unlabeled clients and unseen classes (see the
    module docstring). `lam`: weight of the pseudo-labeled loss; `threshold`: the least
    top probability a pseudo-label needs; `calibrate = False` takes the global model's
    probabilities as they are; `discover = False` drops the centroids and the pairwise term
    (no novel class is found); `pair`: weight of the pairwise term; `temperature`: of the
    centroid assignment; `cap`: the largest share of a client's unlabeled samples a novel output
    may take (default 1 / outputs; 1 = no cap)."""

    name = "fedossl"
    uploads: tuple[str, ...] = ("centroids",)
    downloads: tuple[str, ...] = ("centroids",)
    server_shape: tuple[int, int] | None = None  # (C, D) of the server's model (`attach`)

    def __init__(self, lam: float = 0.5, threshold: float = 0.5, calibrate: bool = True, discover: bool = True,
                 pair: float = 0.25, temperature: float = 0.1, cap: float | None = None) -> None:
        if not lam >= 0:
            raise ValueError(f"client.lam must be >= 0, got {lam}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"client.threshold must be in [0, 1], got {threshold}")
        if not pair >= 0:
            raise ValueError(f"client.pair must be >= 0, got {pair}")
        if not temperature > 0:
            raise ValueError(f"client.temperature must be > 0, got {temperature}")
        if cap is not None and not 0.0 < cap <= 1.0:
            raise ValueError(f"client.cap must be in (0, 1] (1 = no cap; default 1 / outputs), got {cap}")
        for key, value in (("calibrate", calibrate), ("discover", discover)):
            if not isinstance(value, bool):
                raise ValueError(f"client.{key} must be true or false, got {value!r}")
        self.lam = float(lam)
        self.threshold = float(threshold)
        self.calibrate = calibrate
        self.discover = discover
        self.pair = float(pair)
        self.temperature = float(temperature)
        self.cap = None if cap is None else float(cap)

    def shape(self, trainer: CohortTrainer) -> tuple[int, int]:
        """(outputs C, embedding size D), checked to fit in one vector of the model's size."""
        try:
            body_of(trainer.module)
        except ValueError:
            raise ValueError("client.algorithm = 'fedossl' needs an nn.Sequential whose last layer is a Linear "
                             "(its input is the embedding; models mlp, mlp_norm, cnn, cnn1d)") from None
        c, d = head_shape(trainer.module, trainer.layout)
        if c * d + 2 * c + d + 4 > trainer.layout.numel:
            raise ValueError(f"client.algorithm = 'fedossl': {c} centroids of {d} values do not fit in the model's "
                             f"{trainer.layout.numel} parameters")
        return c, d

    def attach(self, module: nn.Module, layout: Layout, *public: torch.Tensor) -> None:
        """The server's model: the centroid table's shape comes from it, not from uploads."""
        self.server_shape = table_shape(module, layout, lambda c, d: c * d + 2 * c + d + 4)

    def check_uploads(self, rows: dict[str, torch.Tensor]) -> str:
        """Refuse (one line) a client's centroid stream the server could not merge."""
        row = rows.get("centroids")
        if row is None or self.server_shape is None:
            return ""
        c, d = self.server_shape
        base = c * d
        return check_marked("centroids", row, c, d, [row[base : base + 2 * c], row[base + 2 * c + d : base + 2 * c + d + 1]])

    def init_server_state(self, numel: int) -> State:
        return {"centroids": torch.zeros(numel)}  # centroids [C * D], has [C], labeled [C]

    @staticmethod
    def unpack(packed: torch.Tensor, c: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return packed[: c * d].view(c, d), packed[c * d : c * d + c], packed[c * d + c : c * d + 2 * c]

    @torch.no_grad()
    def _forward(self, trainer: CohortTrainer, params: torch.Tensor, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized embeddings, logits) of `x` under `params`."""
        body, head = body_of(trainer.module)
        views = trainer.layout.views(params[: trainer.layout.numel])
        trainer.module.eval()
        emb = functional_call(body, {k: v for k, v in views.items() if not k.startswith(head + ".")}, (x,))
        logits = functional_call(trainer.module, views, (x,))
        trainer.module.train()
        return F.normalize(emb.float(), dim=1).cpu(), logits.float().cpu()

    def client_targets(self, emb_l: torch.Tensor, y_l: torch.Tensor, emb_u: torch.Tensor, logits_u: torch.Tensor,
                       centroids: torch.Tensor, has: torch.Tensor, labeled: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One client's round (steps 1 to 3): pseudo-labels `[n_u]`, their weights `[n_u]` (lam
        included), the pair targets `[n_u, C]` of its unlabeled samples, and its upload `[C * D
        + 2 C + D + 1]` (sums, counts, has-labels flags, outlier sum and count)."""
        c, d = centroids.shape
        label, weight = calibrated_targets(logits_u.softmax(dim=1), self.threshold, self.calibrate)
        sums = torch.zeros(c, d).index_add_(0, y_l, emb_l)
        counts = torch.bincount(y_l, minlength=c).float()
        has_labels = (counts > 0).float()
        osum, ocount = torch.zeros(d), 0.0
        novel = ~labeled.bool()
        if self.discover and len(emb_u) and bool(labeled.any()):
            if bool((has.bool() & novel).any()):
                a = assign(emb_u, centroids, has, self.temperature)
                top, near = a.max(dim=1)
                to_novel = novel[near]
                to_novel = capped(emb_u, centroids, near, to_novel, 1.0 / c if self.cap is None else self.cap)
                if len(emb_l):  # closer to the novel centroid than to every labeled sample
                    to_centroid = (emb_u * F.normalize(centroids, dim=1)[near]).sum(dim=1)
                    to_novel &= to_centroid > (emb_u @ emb_l.T).max(dim=1).values
                label = torch.where(to_novel, near, label)
                weight = torch.where(to_novel, (top >= self.threshold).to(weight.dtype), weight)
                sums.index_add_(0, near[to_novel], emb_u[to_novel])
                counts += torch.bincount(near[to_novel], minlength=c).float()
            far = outliers(emb_u, centroids, has.bool(), 1.0 / c)
            osum, ocount = emb_u[far].sum(dim=0), float(len(far))
        upload = torch.cat([sums.reshape(-1), counts, has_labels, osum, torch.tensor([ocount])])
        if self.discover and self.pair and len(emb_u):
            emb = torch.cat([emb_l, emb_u])
            target = torch.cat([F.one_hot(y_l, c).float(), F.one_hot(label, c).float() * weight.unsqueeze(1)])
            pair_target = target[nearest_neighbours(emb)[len(emb_l):]]
        else:
            pair_target = torch.zeros(len(emb_u), c)
        return label, self.lam * weight, pair_target, upload

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        data = trainer.data
        if not isinstance(data, PartlyLabeled):  # every label known: FedAvg (the centroid stream carries zeros)
            result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                       algorithm=LocalSGD())
            result.uploads = {"centroids": torch.zeros(len(client_ids), trainer.layout.numel, device=trainer.device)}
            return result
        from koinon.personal.evaluate import with_steps

        c, d = self.shape(trainer)
        numel = trainer.layout.numel
        packed = server_state.get("centroids", torch.zeros(numel)).cpu()
        centroids, has, labeled = self.unpack(packed, c, d)
        ds = data.dataset
        n = len(ds.y_train)
        y = ds.y_train.clone()
        table_label = torch.zeros(n, dtype=torch.long)
        table_weight = torch.zeros(n)
        table_pair = torch.zeros(n, c)
        indices = list(data.client_indices)
        uploads = torch.zeros(len(client_ids), numel)
        for i, cid in enumerate(client_ids):
            lab_ix, extra = data.client_indices[cid], data.unlabeled[cid]
            emb, logits = self._forward(trainer, global_params, trainer.x_train[torch.cat([lab_ix, extra]).to(
                trainer.x_train.device)])
            k = len(lab_ix)
            label, weight, pair_target, upload = self.client_targets(
                emb[:k], ds.y_train[lab_ix].cpu(), emb[k:], logits[k:], centroids, has, labeled)
            uploads[i, : len(upload)] = upload
            used = (weight > 0) | (pair_target.sum(dim=1) > 0)
            chosen = extra[used]
            table_label[chosen], table_weight[chosen], table_pair[chosen] = label[used], weight[used], pair_target[used]
            y[chosen] = -1 - chosen
            indices[cid] = torch.cat([lab_ix, chosen]).sort().values
        # The shape, for the server, as ratios to a marker 1 (see `koinon.personal.recon`).
        uploads[:, -3], uploads[:, -2], uploads[:, -1] = float(c), float(d), 1.0
        view = with_steps(trainer, data=FederatedData(dataclasses.replace(ds, y_train=y), indices))
        view._manual = None  # the hand-written backward is plain cross-entropy; this loss is not
        dev = trainer.device
        view.loss_fn = _OpenWorldLoss(table_label.to(dev), table_weight.to(dev), table_pair.to(dev), self.pair)
        all_idx, all_steps = view.schedule(client_ids, seed, round_index)
        result = view.run_steps(client_ids, global_params, server_state, client_states, all_idx, all_steps,
                                algorithm=LocalSGD())
        result.uploads = {"centroids": uploads.to(dev)}
        return result

    def trained_bounds(self, labeled: int, held: int) -> tuple[int, int]:
        """The samples a client trains on in a round (its upload's weight; `koinon.deploy.labels`):
        its labeled ones and any of its unlabeled ones that get a pseudo-label or a pair target."""
        return labeled, held

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        if "centroids" not in uploads:
            return server_state
        up = uploads["centroids"].cpu()
        if not float(up[-1]) > 0:
            return server_state
        # The shape is the server's model's; only a server never attached to one reads the markers.
        c, d = self.server_shape or (int(round(float(up[-3] / up[-1]))), int(round(float(up[-2] / up[-1]))))
        if not (c > 0 and d > 0 and c * d + 2 * c + d + 4 <= len(up)):
            return server_state
        old = server_state["centroids"]
        centroids, has, labeled = self.unpack(old.cpu(), c, d)
        base = c * d
        sums, counts = up[:base].view(c, d), up[base : base + c]
        has_labels = up[base + c : base + 2 * c]
        osum, ocount = up[base + 2 * c : base + 2 * c + d], float(up[base + 2 * c + d])
        centroids, has, labeled = merge_centroids(centroids, has, labeled, sums, counts, has_labels, osum, ocount)
        out = old.clone()
        out[:base] = centroids.reshape(-1).to(out)
        out[base : base + c] = has.to(out)
        out[base + c : base + 2 * c] = labeled.to(out)
        return {**server_state, "centroids": out}
