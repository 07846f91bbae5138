"""FedKA: domain generalization by feature-distribution matching and voted pseudo-labels.

"Federated Knowledge Alignment" (FedKA, 2022). Clients
hold different domains (feature shift); the global model should also serve a domain no client
trained on. Two parts:

- feature-distribution matching in a global workspace: each client's local objective adds
  lam * (||mean_B(e) - mu||^2 + ||std_B(e) - sigma||^2) / D to its cross-entropy, where e are the
  embeddings (the head's inputs, D of them) of its batch and (mu, sigma) the workspace's: the
  per-feature mean and standard deviation over the clients' embeddings, which every client
  uploads as its embeddings' mean and mean square (`moments`) after training and the server
  averages over the cohort (each client, i.e. each domain, counts equally) and sends back
  (`workspace`, a download);
- federated voting: the server keeps the last cohort's first `voters` local models; a new
  client (a domain never trained on) labels its own *unlabeled* training samples by their
  majority vote, keeps the samples on which at least `agreement` of the voters agree, and
  fine-tunes the global model on them for `adapt_steps` SGD steps: it uses no labels at all.

Choices of ours where the paper leaves room or where we simplified: the abstract speaks of
feature-distribution matching in a global workspace; we match the first two moments per
feature (the MMD of a diagonal second-order kernel), which needs only 2 D numbers
per client on the wire and no target data during training (domain *generalization*); before the
first workspace exists (round one) there is no matching term. Where the paper fine-tunes the
global model on the voted labels, here the new client does, on its own data (the same
computation where the target domain lives). Training clients serve the global model. Local
training is the method's own plain-SGD loop (one client at a time, so both runtimes agree).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.data.federated import FederatedData
from koinon.personal.base import train_part
from koinon.personal.evaluate import with_steps
from koinon.personal.hetero import check_plain_sgd, mean_ce, sgd_loop
from koinon.personal.recon import body_of, embed, head_shape
from koinon.update import CohortResult

if TYPE_CHECKING:
    from torch import nn

    from koinon.local.trainer import CohortTrainer
    from koinon.params import Layout


def moment_loss(emb: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(||mean(e) - mu||^2 + ||std(e) - sigma||^2) / D over a batch of embeddings `[B, D]`
    (the population standard deviation; a small floor keeps its gradient finite)."""
    mean = emb.mean(dim=0)
    std = (emb.pow(2).mean(dim=0) - mean.pow(2)).clamp_min(1e-8).sqrt()
    return ((mean - mu).pow(2).sum() + (std - sigma).pow(2).sum()) / emb.shape[1]


def vote(predictions: torch.Tensor, num_classes: int, agreement: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority labels `[N]` of voters' predictions `[V, N]`, and `[N]` bool: at least a share
    `agreement` of the voters chose the label (ties go to the lower class)."""
    counts = torch.zeros(num_classes, predictions.shape[1]).scatter_add_(
        0, predictions, torch.ones_like(predictions, dtype=torch.float32))
    top, label = counts.max(dim=0)
    return label, top / predictions.shape[0] >= agreement - 1e-9


@CLIENT_ALGORITHMS.register("fedka")
class FedKA(LocalSGD):
    """FedKA (2022): moment matching to a global workspace, voted pseudo-labels for new domains."""

    name = "fedka"
    uploads: tuple[str, ...] = ("moments",)
    downloads: tuple[str, ...] = ("workspace",)
    server_dim: int | None = None  # embedding size D of the server's model (`attach`)

    def __init__(self, lam: float = 0.1, voters: int = 5, agreement: float = 0.6, adapt_steps: int = 20) -> None:
        if not lam >= 0:
            raise ValueError(f"client.lam must be >= 0, got {lam}")
        if not isinstance(voters, int) or isinstance(voters, bool) or voters < 1:
            raise ValueError(f"client.voters must be an integer >= 1, got {voters!r}")
        if not 0.0 < agreement <= 1.0:
            raise ValueError(f"client.agreement must be in (0, 1], got {agreement}")
        if not isinstance(adapt_steps, int) or isinstance(adapt_steps, bool) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.lam, self.voters, self.agreement, self.adapt_steps = float(lam), voters, float(agreement), adapt_steps

    def attach(self, module: nn.Module, layout: Layout, *public: torch.Tensor) -> None:
        """The server's model: the embedding size comes from it, not from uploads."""
        try:
            d = head_shape(module, layout)[1]
        except ValueError:
            return  # not a model of this method: its training says why
        self.server_dim = d if 2 * d + 2 <= layout.numel else None

    def check_uploads(self, rows: dict[str, torch.Tensor]) -> str:
        """Refuse (one line) a client's moment stream the server could not average: its last value
        must be the model's embedding size, its second moments not negative."""
        row = rows.get("moments")
        if row is None or self.server_dim is None:
            return ""
        d = self.server_dim
        if not bool(torch.isfinite(row).all()):
            return "moments hold NaN or Inf values"
        if abs(float(row[-1]) - d) >= 0.5:
            return f"moments announce {float(row[-1]):g} embedding values, the model has {d}"
        if bool((row[d : 2 * d] < 0).any()):
            return "moments hold negative second moments"
        return ""

    def init_server_state(self, numel: int) -> State:
        return {"workspace": torch.zeros(numel)}  # mu [D], sigma [D], then a flag: 1 once it exists

    @staticmethod
    def dim(trainer: CohortTrainer) -> int:
        _, head = body_of(trainer.module)
        d = int(trainer.layout.views(torch.zeros(trainer.layout.numel))[f"{head}.weight"].shape[1])
        if 2 * d + 2 > trainer.layout.numel:
            raise ValueError(f"client.algorithm = 'fedka': {d} embedding moments do not fit the model's parameters")
        return d

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        check_plain_sgd(trainer.local, self.name)
        d = self.dim(trainer)
        ws = server_state.get("workspace", torch.zeros(trainer.layout.numel))
        mu, sigma, ready = ws[:d], ws[d : 2 * d], bool(ws[2 * d] > 0.5)
        lam = self.lam if ready else 0.0
        module, layout, pt = trainer.module, trainer.layout, trainer.num_trainable
        frozen = global_params[pt:]
        _, head = body_of(module)

        def loss_of(ts: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            views = layout.views(torch.cat([ts[0], frozen]))
            emb = embed(module, views, x)
            logits = functional_call(module.get_submodule(head), {"weight": views[f"{head}.weight"],
                                                                  "bias": views[f"{head}.bias"]}, (emb,))
            loss = mean_ce(logits, y)
            return loss + lam * moment_loss(emb, mu, sigma) if lam else loss

        deltas, losses = [], []
        moments = torch.zeros(len(client_ids), layout.numel)
        for i, c in enumerate(client_ids):
            (theta,), loss = sgd_loop(trainer.local, trainer.x_train, trainer.y_train, idx[i], int(steps[i]),
                                      [global_params[:pt]], loss_of)
            model = torch.cat([theta, frozen])
            deltas.append(model - global_params)
            losses.append(loss)
            with torch.no_grad():
                emb = embed(module, layout.views(model), trainer.x_train[trainer.data.client_indices[c]])
            if len(emb):
                moments[i, :d], moments[i, d : 2 * d] = emb.mean(dim=0), emb.pow(2).mean(dim=0)
            else:  # no samples (no labels): the workspace it received, so the average is not moved
                moments[i, :d], moments[i, d : 2 * d] = mu, sigma.pow(2) + mu.pow(2)
            moments[i, -1] = float(d)
        return CohortResult(list(client_ids), torch.stack(deltas), {"moments": moments}, trainer.sizes(client_ids),
                            steps.clone(), torch.tensor(losses), [{"trained": torch.ones(1)} for _ in client_ids])

    def server_update_rows(self, server_state: State, old: torch.Tensor, new: torch.Tensor,
                           rows: dict[str, torch.Tensor], weights: torch.Tensor, client_ids: list[int]) -> State:
        out = dict(server_state)
        m = rows["moments"].mean(dim=0)
        # The size is the server's model's; only a server never attached to one reads the marker.
        d = self.server_dim or int(round(float(m[-1])))
        if not (0 < d and 2 * d + 1 <= len(m)):
            return server_state
        ws = torch.zeros_like(server_state["workspace"])
        ws[:d] = m[:d]
        ws[d : 2 * d] = (m[d : 2 * d] - m[:d].pow(2)).clamp_min(0.0).sqrt()
        ws[2 * d] = 1.0
        out["workspace"] = ws
        for j in range(self.voters):  # the cohort's first local models (in client order) vote
            out.pop(f"voter_{j}", None)
        order = sorted(range(len(client_ids)), key=lambda i: client_ids[i])
        for j, i in enumerate(order[: self.voters]):
            out[f"voter_{j}"] = old + rows["model"][i]
        return out

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        raise ValueError("client.algorithm = 'fedka' needs the server's per-client rows (server_update_rows); "
                         "one update at a time (apply_update) is not supported")

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        """Training clients: the global model. A client that never trained (empty state: a new
        client): the global model fine-tuned on its own samples under the voters' majority
        labels (its own labels are never read)."""
        models = global_params.unsqueeze(0).repeat(len(client_ids), 1)
        voters = [server_state[k] for k in sorted(server_state) if k.startswith("voter_")]
        fresh = [i for i, st in enumerate(client_states) if "trained" not in st] if voters else []
        if not fresh or not self.adapt_steps:
            return models
        ds = trainer.data.dataset
        y = ds.y_train.clone()
        keep_idx = [torch.zeros(0, dtype=torch.long) for _ in range(trainer.data.num_clients)]
        num_classes = int(ds.num_classes)
        with torch.no_grad():
            for i in fresh:
                c = client_ids[i]
                ix = trainer.data.client_indices[c]
                preds = torch.stack([functional_call(trainer.module, trainer.layout.views(v), (ds.x_train[ix],))
                                     .argmax(dim=1) for v in voters])
                label, agree = vote(preds, num_classes, self.agreement)
                y[ix] = label
                keep_idx[c] = ix[agree]
        pseudo = FederatedData(dataclasses.replace(ds, y_train=y), keep_idx)
        other = with_steps(trainer, self.adapt_steps, data=pseudo)
        ids = [client_ids[i] for i in fresh if len(keep_idx[client_ids[i]])]
        if ids:
            trained = train_part(other, ids, global_params, self.adapt_steps, seed, round_index)
            rows = [i for i in fresh if len(keep_idx[client_ids[i]])]
            models[rows] = trained
        return models


__all__ = ["FedKA", "moment_loss", "vote"]
