"""Personalized evaluation: every client's own model on its own held-out data, and new clients.

A personalized method gives each client the model that serves it: the global model (FedAvg),
a fine-tuned copy, the global body under a private head, its cluster's model, ... The method
says which through its `personalize` hook (see `koinon.personal.base.Personalized`); a method
without one serves the global model. On each evaluated round:

- every training client's personalized model is scored on the client's held-out split
  (`data.client_test_fraction`), and the accuracies are summarized over clients:
  `personal_accuracy_mean` (unweighted), `personal_accuracy_weighted` (by held-out samples),
  `personal_accuracy_p10` (10th percentile: how the worse-off tenth does) and
  `personal_accuracy_min` (the worst client);
- clients held out of training altogether (`data.holdout_clients`) run the method's
  new-client procedure on their own training split (fine-tune, pick a cluster, train a head,
  ... with their empty client state) and are scored on their held-out split:
  `new_client_accuracy_mean`, `new_client_accuracy_p10`, `new_client_accuracy_min`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch.func import functional_call

from koinon.data.federated import FederatedData
from koinon.local.algorithm import ClientAlgorithm, State
from koinon.local.trainer import CohortTrainer
from koinon.params import Layout
from koinon.seeding import mix_seed

PERSONAL_STREAM = 0x9E250  # seeds personalization's own batches apart from training's


def summarize(accuracy: torch.Tensor, counts: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean, sample-weighted mean, 10th percentile and minimum of per-client accuracies."""
    if len(accuracy) == 0:
        return {}
    acc = accuracy.double()
    w = counts.double() / counts.double().sum()
    return {
        f"{prefix}_mean": float(acc.mean()),
        f"{prefix}_weighted": float((acc * w).sum()),
        f"{prefix}_p10": float(np.percentile(acc.numpy(), 10)),
        f"{prefix}_min": float(acc.min()),
    }


@torch.no_grad()
def per_client_accuracy(module: torch.nn.Module, layout: Layout, models: torch.Tensor, x: torch.Tensor,
                        y: torch.Tensor, held: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy of row k of `models` (`[K, P]`) on the samples `held[k]`, and their counts."""
    acc = torch.zeros(len(held))
    counts = torch.tensor([len(ix) for ix in held], dtype=torch.float32)
    module.eval()
    for k, ix in enumerate(held):
        if len(ix):
            out = functional_call(module, layout.views(models[k]), (x[ix],))
            acc[k] = (out.argmax(dim=-1) == y[ix]).float().mean()  # per sample, or per position of a sequence
    module.train()
    return acc, counts


def split_new_clients(data: FederatedData, holdout_clients: float, seed: int
                      ) -> tuple[FederatedData, FederatedData | None]:
    """A seeded choice of clients set aside from training: `holdout_clients` >= 1 is a count,
    in (0, 1) a share of the population. Returns (training clients, new clients)."""
    n = data.num_clients
    if holdout_clients <= 0:
        return data, None
    count = int(holdout_clients) if holdout_clients >= 1 else int(round(holdout_clients * n))
    if holdout_clients >= 1 and holdout_clients != int(holdout_clients):
        raise ValueError(f"data.holdout_clients = {holdout_clients}: a count (integer >= 1) or a share in (0, 1)")
    if not 1 <= count < n:
        raise ValueError(f"data.holdout_clients = {holdout_clients} sets {count} of {n} clients aside; "
                         f"need between 1 and {n - 1}")
    rng = np.random.default_rng([seed, 0x4E3C])
    new = set(int(c) for c in rng.choice(n, count, replace=False))
    keep = [ix for c, ix in enumerate(data.client_indices) if c not in new]
    gone = [data.client_indices[c] for c in sorted(new)]
    return FederatedData(data.dataset, keep), FederatedData(data.dataset, gone)


def with_steps(trainer: CohortTrainer, steps: int | None = None, data: FederatedData | None = None
               ) -> CohortTrainer:
    """A view of `trainer` that runs exactly `steps` local steps (None: as the trainer does) on
    `data` (None: the trainer's): the trainer's model, hyperparameters and algorithm otherwise."""
    other = copy.copy(trainer)
    if steps is not None:
        other.local = dataclasses.replace(trainer.local, steps=steps, lr_schedule="constant", lr_warmup=0)
        other.optimizer = other.local.build_optimizer()
    if data is not None:
        other.data = data
        other._flat = None
        other.x_train = data.dataset.x_train.to(trainer.device)
        other.y_train = data.dataset.y_train.to(trainer.device)
    return other


def personal_models(algorithm: ClientAlgorithm, trainer: CohortTrainer, client_ids: list[int],
                    global_params: torch.Tensor, server_state: State, client_states: list[State],
                    seed: int, round_index: int) -> torch.Tensor:
    """`[K, P]`: each client's personalized model, by the algorithm's `personalize` hook (the
    global model for algorithms without one)."""
    hook = getattr(algorithm, "personalize", None)
    if hook is None:
        return global_params.unsqueeze(0).repeat(len(client_ids), 1)
    dev = trainer.device  # on a GPU runtime: the inputs cross once, the models come back once
    if dev.type != "cpu":
        global_params = global_params.to(dev)
        server_state = {k: v.to(dev) for k, v in server_state.items()}
        client_states = [{k: v.to(dev) for k, v in st.items()} for st in client_states]
    with trainer._on_device():
        models = hook(trainer, client_ids, global_params, server_state, client_states,
                      mix_seed(seed, PERSONAL_STREAM), round_index)
    return models.cpu()


class PersonalEvaluation:
    """Scores personalized models on each client's held-out split (see the module docstring)."""

    def __init__(self, trainer: CohortTrainer, held: list[torch.Tensor],
                 new_clients: tuple[FederatedData, list[torch.Tensor]] | None, seed: int) -> None:
        """`held`: each training client's held-out indices; `new_clients`: the clients kept out
        of training, as (their training split, their held-out indices)."""
        self.trainer = trainer
        self.held = held
        self.seed = seed
        self.new_train: CohortTrainer | None = None
        self.new_held: list[torch.Tensor] = []
        if new_clients is not None:
            # New clients get ids after the training population's (they are other clients: no
            # state, no cluster membership, their own seeds).
            data, held_new = new_clients
            none = [torch.zeros(0, dtype=torch.long)] * trainer.data.num_clients
            self.new_train = with_steps(trainer, data=FederatedData(data.dataset, none + list(data.client_indices)))
            self.new_held = none + list(held_new)

    def metrics(self, params: torch.Tensor, server_state: State, client_states: dict[int, State],
                round_index: int) -> dict[str, float]:
        t = self.trainer
        alg = t.algorithm
        out: dict[str, float] = {}
        ids = [c for c in range(t.data.num_clients) if len(self.held[c])]
        if ids:
            acc, counts = self._scores(alg, t, ids, params, server_state, [client_states.get(c, {}) for c in ids],
                                       self.seed, round_index, [self.held[c] for c in ids])
            out.update(summarize(acc, counts, "personal_accuracy"))
        if self.new_train is not None:
            new_ids = [c for c in range(t.data.num_clients, self.new_train.data.num_clients) if len(self.new_held[c])]
            if new_ids:
                acc, counts = self._scores(alg, self.new_train, new_ids, params, server_state, [{} for _ in new_ids],
                                           self.seed + 1, round_index, [self.new_held[c] for c in new_ids])
                summary = summarize(acc, counts, "new_client_accuracy")
                summary.pop("new_client_accuracy_weighted", None)
                out.update(summary)
        return out

    @staticmethod
    def _scores(alg: ClientAlgorithm, trainer: CohortTrainer, ids: list[int], params: torch.Tensor,
                server_state: State, states: list[State], seed: int, round_index: int,
                held: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-client accuracies: of the `personalize` models, or of the algorithm's optional
        `personal_predictors` (one inputs -> logits function per client: a personalized model that
        is not one vector of the global layout, e.g. a gated or a narrower sub-model)."""
        ds = trainer.data.dataset
        predictors = getattr(alg, "personal_predictors", None)
        if predictors is not None:
            from koinon.personal.hetero import predictor_accuracy

            fns = predictors(trainer, ids, params, server_state, states, mix_seed(seed, PERSONAL_STREAM), round_index)
            return predictor_accuracy(fns, ds.x_train, ds.y_train, held)
        models = personal_models(alg, trainer, ids, params, server_state, states, seed, round_index)
        return per_client_accuracy(trainer.module, trainer.layout, models, ds.x_train, ds.y_train, held)


__all__ = ["PersonalEvaluation", "per_client_accuracy", "personal_models",
           "split_new_clients", "summarize", "with_steps"]
