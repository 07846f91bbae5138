"""Several global models: IFCA, and hierarchical clustering of client updates with meta-learning.

Both keep C cluster models at the server, stored as offsets from the global model (cluster j is
`params + cluster_j`), so every server optimizer and aggregator still applies: the global model
moves by the aggregated update of the whole cohort, and `server_update_rows` (called by the
server with each kept client's rows) moves each offset so that cluster j's model moves by the
sample-weighted mean update of its own members,

    cluster_j <- (old + cluster_j + mean_{i in j} delta_i) - new,

where old and new are the global model before and after the server's step. Clients receive
all C offsets (downloads; their bytes are counted) and report the cluster they trained in the
`assignment` upload (one-hot in its first C coordinates: the wire's streams all have the
model's shape, so with a dense codec this costs a second model's bytes; a sparse codec sends C
values).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.personal.base import train_part
from koinon.personal.meta import PerFedAvg
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


@torch.no_grad()
def cluster_losses(trainer: CohortTrainer, client_ids: list[int], models: torch.Tensor) -> torch.Tensor:
    """`[K, C]`: each client's mean loss on its whole training data under each of `models` (`[C, P]`)."""
    out = torch.zeros(len(client_ids), models.shape[0])
    trainer.module.eval()
    for i, c in enumerate(client_ids):
        ix = trainer.data.client_indices[c]
        if not len(ix):
            continue
        x, y = trainer.x_train[ix], trainer.y_train[ix]
        for j in range(models.shape[0]):
            logits = functional_call(trainer.module, trainer.layout.views(models[j]), (x,))
            out[i, j] = trainer.loss_fn(logits, y).mean()
    trainer.module.train()
    return out


class _Clusters:
    """Cluster models as offsets from the global model, picked per client (see the module docstring)."""

    name = "clusters"
    uploads: tuple[str, ...] = ("assignment",)
    downloads: tuple[str, ...]
    num_clusters: int
    init_scale: float
    seed: int

    def _check(self, clusters: int, init_scale: float) -> None:
        if not isinstance(clusters, int) or isinstance(clusters, bool) or clusters < 1:
            raise ValueError(f"client.clusters must be an integer >= 1, got {clusters!r}")
        if not init_scale >= 0:
            raise ValueError(f"client.init_scale must be >= 0, got {init_scale}")

    def init_server_state(self, numel: int) -> State:
        return {f"cluster_{j}": self.init_scale * torch.randn(numel, generator=generator(self.seed, 0xC1, j))
                for j in range(self.num_clusters)}

    def models(self, global_params: torch.Tensor, server_state: State) -> torch.Tensor:
        """`[C, P]`: the cluster models."""
        return global_params.unsqueeze(0) + torch.stack([server_state[f"cluster_{j}"] for j in range(self.num_clusters)])

    def choose(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
               server_state: State, client_states: list[State]) -> torch.Tensor:
        """`[K]` long: each client's cluster, the one whose model has the lowest loss on its data
        (IFCA's rule; ties go to the lower index)."""
        return cluster_losses(trainer, client_ids, self.models(global_params, server_state)).argmin(dim=1)

    def assignment(self, picks: torch.Tensor, numel: int) -> torch.Tensor:
        rows = torch.zeros(len(picks), numel)
        rows[torch.arange(len(picks)), picks] = 1.0
        return rows

    def server_update_rows(self, server_state: State, old: torch.Tensor, new: torch.Tensor,
                           rows: dict[str, torch.Tensor], weights: torch.Tensor, client_ids: list[int]) -> State:
        picks = rows["assignment"][:, : self.num_clusters].argmax(dim=1)
        out = dict(server_state)
        for j in range(self.num_clusters):
            members = picks == j
            if bool(members.any()):
                w = weights[members] / weights[members].sum()
                mean = (rows["model"][members] * w.unsqueeze(1)).sum(dim=0)
                out[f"cluster_{j}"] = old + server_state[f"cluster_{j}"] + mean - new
            else:  # a cluster nobody picked keeps its model, whatever the global one did
                out[f"cluster_{j}"] = old + server_state[f"cluster_{j}"] - new
        return out

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        raise ValueError(f"client.algorithm = {self.name!r} needs the server's per-client rows "
                         "(server_update_rows); one update at a time (apply_update) is not supported")


@CLIENT_ALGORITHMS.register("ifca")
class IFCA(_Clusters, LocalSGD):
    """IFCA (Ghosh et al. 2020, https://arxiv.org/abs/2006.04088): C global models; each round a
    client evaluates all of them on its data, trains the one with the lowest loss (model
    averaging variant: local SGD, its update counts for that cluster only) and serves it. The
    cluster models start as the global model plus seeded N(0, init_scale^2) offsets (the paper
    draws them at random; the run's seed seeds them). A new client picks by loss too, then serves the model as it is
    (`adapt_steps` = 0) or fine-tunes it."""

    name = "ifca"

    def __init__(self, clusters: int = 2, init_scale: float = 0.05, adapt_steps: int = 0, seed: int = 0) -> None:
        self._check(clusters, init_scale)
        if not isinstance(adapt_steps, int) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.num_clusters = clusters
        self.init_scale = float(init_scale)
        self.adapt_steps = adapt_steps
        self.seed = seed
        self.downloads = tuple(f"cluster_{j}" for j in range(clusters))

    def start(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
              server_state: State, client_states: list[State]) -> torch.Tensor:
        picks = self.choose(trainer, client_ids, global_params, server_state, client_states)
        self._picks = picks
        return self.models(global_params, server_state)[picks]

    def end(self, theta0: torch.Tensor, theta: torch.Tensor, num_steps: torch.Tensor, lr: float, ctx: State
            ) -> tuple[dict[str, torch.Tensor], list[State]]:
        return {}, [{} for _ in range(theta.shape[0])]

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        starts = self.start(trainer, client_ids, global_params, server_state, client_states)
        result = trainer.run_steps(client_ids, starts, server_state, client_states, idx, steps, algorithm=LocalSGD())
        result.uploads = {"assignment": self.assignment(self._picks, global_params.shape[-1])}
        return result

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        models = self.start(trainer, client_ids, global_params, server_state, client_states)
        return train_part(trainer, client_ids, models, self.adapt_steps, seed, round_index)


@CLIENT_ALGORITHMS.register("clustered_meta")
class ClusteredMeta(_Clusters, PerFedAvg):
    """Adaptive personalization by hierarchical clustering of client updates, with meta-learning
    inside the clusters ("Adaptive Personalization in Federated Learning for Highly Non-i.i.d.
    Data", 2022).

    Every client meta-trains (first-order Per-FedAvg, `koinon.personal.meta`) from its cluster's
    model. Until round `cluster_round` everyone is in cluster 0 (federated meta-learning of one
    model). On that round the server clusters the cohort's updates: agglomerative clustering,
    average linkage on cosine distances, cut at distance `threshold` and at most
    `clusters` clusters; each cluster's model starts from its members' mean update and trains
    on from there with its members only. Clients that were not in that cohort (and new
    clients) join the cluster whose model has the lowest loss on their data, as in IFCA.
    A client personalizes by `adapt_steps` SGD steps (size alpha) from its cluster's model.

    Choices of ours where the abstract leaves details open: cosine distance, average linkage
    and the threshold rule; one clustering (not re-clustered later); membership as the
    download `membership` (entry c = 1 + client c's cluster, 0 = none yet; at most P clients).
    """

    name = "clustered_meta"

    def __init__(self, clusters: int = 4, threshold: float = 0.7, cluster_round: int = 1, alpha: float = 0.01,
                 adapt_steps: int = 5, seed: int = 0) -> None:
        PerFedAvg.__init__(self, alpha, adapt_steps)
        self._check(clusters, 0.0)
        if not 0.0 < threshold <= 2.0:
            raise ValueError(f"client.threshold must be in (0, 2] (a cosine distance), got {threshold}")
        if not isinstance(cluster_round, int) or cluster_round < 1:
            raise ValueError(f"client.cluster_round must be an integer >= 1, got {cluster_round!r}")
        self.num_clusters = clusters
        self.init_scale = 0.0
        self.threshold = float(threshold)
        self.cluster_round = cluster_round
        self.seed = seed
        self.downloads = (*(f"cluster_{j}" for j in range(clusters)), "membership")

    def init_server_state(self, numel: int) -> State:
        return {**super().init_server_state(numel), "membership": torch.zeros(numel), "rounds": torch.zeros(1)}

    def choose(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
               server_state: State, client_states: list[State]) -> torch.Tensor:
        ids = torch.as_tensor(client_ids, dtype=torch.long)
        table = server_state["membership"]
        member = torch.full((len(client_ids),), -1, dtype=torch.long)
        known = ids < table.numel()  # a client past the table has not been assigned
        member[known] = table[ids[known]].long() - 1
        fresh = member < 0
        if bool(fresh.any()) and bool((table > 0).any()):
            newcomers = [c for c, f in zip(client_ids, fresh.tolist()) if f]
            formed = sorted(set((table[table > 0].long() - 1).tolist()))
            losses = cluster_losses(trainer, newcomers, self.models(global_params, server_state)[formed])
            member[fresh] = torch.tensor(formed)[losses.argmin(dim=1)]
        return member.clamp_min(0)

    def starts(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
               server_state: State, client_states: list[State]) -> torch.Tensor:
        self._picks = self.choose(trainer, client_ids, global_params, server_state, client_states)
        return self.models(global_params, server_state)[self._picks]

    def uploads_of(self, client_ids: list[int], server_state: State, client_states: list[State]
                   ) -> tuple[dict[str, torch.Tensor], list[State]]:
        numel = server_state["membership"].numel()
        return {"assignment": self.assignment(self._picks, numel)}, [{} for _ in client_ids]

    def server_update_rows(self, server_state: State, old: torch.Tensor, new: torch.Tensor,
                           rows: dict[str, torch.Tensor], weights: torch.Tensor, client_ids: list[int]) -> State:
        rounds = int(server_state["rounds"][0]) + 1
        membership = server_state["membership"].clone()
        if len(client_ids) > membership.numel():
            raise ValueError(f"clustered_meta keeps membership in a model-sized vector: at most "
                             f"{membership.numel()} clients")
        if rounds == self.cluster_round and not bool((membership > 0).any()):
            labels = hierarchical_clusters(rows["model"], self.threshold, self.num_clusters)
            assignment = torch.zeros_like(rows["assignment"])
            assignment[torch.arange(len(labels)), labels] = 1.0
            rows = {**rows, "assignment": assignment}
            membership[torch.as_tensor(client_ids, dtype=torch.long)] = labels.float() + 1
        elif bool((membership > 0).any()):
            picks = rows["assignment"][:, : self.num_clusters].argmax(dim=1)
            membership[torch.as_tensor(client_ids, dtype=torch.long)] = picks.float() + 1
        out = super().server_update_rows(server_state, old, new, rows, weights, client_ids)
        out["membership"] = membership
        out["rounds"] = torch.tensor([float(rounds)])
        return out


def hierarchical_clusters(updates: torch.Tensor, threshold: float, max_clusters: int) -> torch.Tensor:
    """`[n]` long cluster labels from 0: average-linkage agglomerative clustering of the rows of
    `updates` on cosine distance, cut at `threshold`, with at most `max_clusters` clusters
    (scipy's `linkage` / `fcluster`); labels are numbered by first appearance."""
    from scipy.cluster.hierarchy import fcluster, linkage

    n = updates.shape[0]
    if n < 2 or max_clusters < 2:
        return torch.zeros(n, dtype=torch.long)
    x = updates.double().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    from scipy.spatial.distance import pdist

    # A zero update (a client with nothing to train on, e.g. no labels) has no direction: its
    # cosine distance is undefined, and we take it as 1 (orthogonal to every other update).
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = pdist(x, metric="cosine")
    tree = linkage(np.nan_to_num(dist, nan=1.0), method="average")
    labels = fcluster(tree, t=threshold, criterion="distance")
    if labels.max() > max_clusters:
        labels = fcluster(tree, t=max_clusters, criterion="maxclust")
    order = {v: i for i, v in enumerate(dict.fromkeys(labels.tolist()))}
    return torch.tensor([order[v] for v in labels.tolist()], dtype=torch.long)
