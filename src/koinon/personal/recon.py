"""Federated reconnaissance: class-incremental learning by averaging class prototypes.

"Federated Reconnaissance: Efficient, Distributed, Class-Incremental Learning" (2021). Each
client learns the classes it sees and sends their *prototypes* (the mean embedding of a class's samples); the server merges prototypes by
averaging them weighted by their sample counts, and every client then classifies a sample by
its nearest prototype (Euclidean) among all classes any client has seen: a client that held
two classes can tell apart all ten once the others' prototypes arrive.

A round of client k: local SGD of the model (FedAvg; the cross-entropy head trains the embedding,
the body: every layer but the last), then with its trained model, for each class c of its
training data, the sum S_kc of its samples' embeddings and their count N_kc (an extra upload,
`prototypes`: one vector of the model's size, sums then counts, zero-padded, the shape C and
D in its last values). The server's
prototype of class c is sum_k S_kc / sum_k N_kc over the cohort (the uniform cohort means of the
sums and counts have that ratio); a class no client of the cohort holds keeps its prototype from
an earlier round (the online merge of the paper: knowledge of a class, once learnt, stays). The
merged prototypes (`prototypes`, `seen`) are a download every sampled client receives.

Choices of ours where the paper leaves room: in the paper prototypes are averaged online over
all updates, with a fixed embedding (a prototypical network); here the embedding itself trains
by FedAvg, so a prototype is replaced by the current cohort's average
(old prototypes were computed with an older embedding) and kept only for classes the cohort does
not hold. Every client and a new client serve the same model (the global body and the merged
prototypes): there is no client state. Needs an `nn.Sequential` whose last layer is a Linear,
and classes x embedding + classes <= the model's parameter count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.personal.hetero import Predictor
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer
    from koinon.params import Layout


def body_of(module: nn.Module) -> tuple[nn.Sequential, str]:
    """The embedding network (every layer but the last Linear) and the head's name."""
    children = list(module.named_children()) if isinstance(module, nn.Sequential) else []
    if not children or not isinstance(children[-1][1], nn.Linear):
        raise ValueError("client.algorithm = 'reconnaissance' needs an nn.Sequential whose last layer is a Linear "
                         "(its input is the embedding; models mlp, mlp_norm, cnn, cnn1d)")
    return nn.Sequential(*[m for _, m in children[:-1]]), children[-1][0]


def embed(module: nn.Module, views: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`[N, D]`: the embeddings of `x` under the model's parameters `views`."""
    body, head = body_of(module)
    return functional_call(body, {k: v for k, v in views.items() if not k.startswith(head + ".")}, (x,))


def class_sums(emb: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[C, D]` sums of each class's embeddings and `[C]` counts."""
    sums = torch.zeros(classes, emb.shape[1]).index_add_(0, y, emb)
    return sums, torch.bincount(y, minlength=classes).to(emb.dtype)


def merge(prototypes: torch.Tensor, seen: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """New prototypes `[C, D]` and seen flags `[C]`: sums / counts where the counts are positive,
    the old prototype elsewhere."""
    has = counts > 0
    out = prototypes.clone()
    out[has] = sums[has] / counts[has].unsqueeze(1)
    return out, seen.bool() | has


def head_shape(module: nn.Module, layout: Layout) -> tuple[int, int]:
    """(outputs C, embedding size D) of the model's last Linear layer."""
    _, head = body_of(module)
    c, d = layout.views(torch.zeros(layout.numel))[f"{head}.weight"].shape
    return int(c), int(d)


def table_shape(module: nn.Module, layout: Layout, size: Callable[[int, int], int]) -> tuple[int, int] | None:
    """(C, D) of the server's model (`head_shape`) when a table of `size(C, D)` values fits in
    one vector of the model's size; None when it does not or the model has no such head (its
    training then says why). Servers take their tables' shapes from this, never from uploads."""
    try:
        c, d = head_shape(module, layout)
    except ValueError:
        return None
    return (c, d) if size(c, d) <= layout.numel else None


def check_marked(stream: str, row: torch.Tensor, c: int, d: int, counts: list[torch.Tensor]) -> str:
    """Why one client's packed `stream` is refused ('' accepts it): its shape markers (C, D, 1
    in the last three values) must be the server's `c`, `d` (a stream of zeros: nothing sent),
    and its `counts` (views of `row`) must not be negative. The server reads the shape from the
    model, never from the markers, so a forged one only costs its sender the round."""
    if not bool(torch.isfinite(row).all()):
        return f"{stream} holds NaN or Inf values"
    if float(row[-1]) == 0 and not bool(row.any()):
        return ""
    marker = float(row[-1])
    if not marker > 0:
        return f"{stream} has marker {marker:g}, not 1"
    got = (float(row[-3]) / marker, float(row[-2]) / marker)
    if abs(got[0] - c) >= 0.5 or abs(got[1] - d) >= 0.5:
        return f"{stream} announces a {got[0]:g} x {got[1]:g} table, the model's is {c} x {d}"
    if any(bool((part < 0).any()) for part in counts):
        return f"{stream} holds negative counts"
    return ""


def nearest_logits(emb: torch.Tensor, prototypes: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """`[N, C]`: minus the squared distance to each seen class's prototype (-inf for unseen)."""
    d = torch.cdist(emb, prototypes).pow(2)
    return torch.where(seen.bool().unsqueeze(0), -d, torch.full_like(d, float("-inf")))


@CLIENT_ALGORITHMS.register("reconnaissance")
class Reconnaissance(LocalSGD):
    """Federated reconnaissance (2021): class prototypes, merged by averaging."""

    name = "reconnaissance"
    uploads: tuple[str, ...] = ("prototypes",)
    downloads: tuple[str, ...] = ("prototypes",)

    server_shape: tuple[int, int] | None = None  # (C, D) of the server's model (`attach`)

    def shape(self, trainer: CohortTrainer) -> tuple[int, int]:
        """(classes C, embedding size D), checked to fit in one vector of the model's size."""
        c, d = head_shape(trainer.module, trainer.layout)
        if c * d + c + 3 > trainer.layout.numel:
            raise ValueError(f"client.algorithm = 'reconnaissance': {c} classes x {d} embedding values do not fit "
                             f"in the model's {trainer.layout.numel} parameters")
        return c, d

    def attach(self, module: nn.Module, layout: Layout, *public: torch.Tensor) -> None:
        """The server's model: the prototype table's shape comes from it, not from uploads."""
        self.server_shape = table_shape(module, layout, lambda c, d: c * d + c + 3)

    def check_uploads(self, rows: dict[str, torch.Tensor]) -> str:
        """Refuse (one line) a client's prototype stream the server could not merge."""
        row = rows.get("prototypes")
        if row is None or self.server_shape is None:
            return ""
        c, d = self.server_shape
        return check_marked("prototypes", row, c, d, [row[c * d : c * d + c]])

    def init_server_state(self, numel: int) -> State:
        return {"prototypes": torch.zeros(numel)}  # prototypes [C * D], then seen flags [C]

    def unpack(self, packed: torch.Tensor, c: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        return packed[: c * d].view(c, d), packed[c * d : c * d + c]

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        c, d = self.shape(trainer)
        result = trainer.run_steps(client_ids, global_params, server_state, client_states, idx, steps,
                                   algorithm=LocalSGD())
        assert result.deltas is not None
        packed = torch.zeros(len(client_ids), trainer.layout.numel)
        for i, cid in enumerate(client_ids):
            ix = trainer.data.client_indices[cid]
            with torch.no_grad():
                emb = embed(trainer.module, trainer.layout.views(global_params + result.deltas[i]), trainer.x_train[ix])
            sums, counts = class_sums(emb, trainer.y_train[ix], c)
            packed[i, : c * d] = sums.reshape(-1)
            packed[i, c * d : c * d + c] = counts
        # The shape, for the server, as ratios to a marker 1 (an asynchronous schedule's weighted
        # single update scales all three alike; sums / counts are ratios too).
        packed[:, -3], packed[:, -2], packed[:, -1] = float(c), float(d), 1.0
        result.uploads = {"prototypes": packed}
        return result

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        if "prototypes" not in uploads:
            return server_state
        up = uploads["prototypes"]
        if not float(up[-1]) > 0:
            return server_state
        # The shape is the server's model's; only a server never attached to one reads the markers.
        c, d = self.server_shape or (int(round(float(up[-3] / up[-1]))), int(round(float(up[-2] / up[-1]))))
        if not (c > 0 and d > 0 and c * d + c + 3 <= len(up)):
            return server_state
        old, seen = self.unpack(server_state["prototypes"], c, d)
        sums, counts = self.unpack(uploads["prototypes"], c, d)
        protos, seen = merge(old, seen, sums, counts)
        out = server_state["prototypes"].clone()
        out[: c * d] = protos.reshape(-1)
        out[c * d : c * d + c] = seen.float()
        return {**server_state, "prototypes": out}

    def personal_predictors(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                            server_state: State, client_states: list[State], seed: int,
                            round_index: int) -> list[Predictor]:
        """Every client: the nearest merged prototype under the global embedding."""
        c, d = self.shape(trainer)
        protos, seen = self.unpack(server_state["prototypes"], c, d)
        views = trainer.layout.views(global_params)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return nearest_logits(embed(trainer.module, views, x), protos, seen)

        return [predict for _ in client_ids]


__all__ = ["Reconnaissance", "class_sums", "embed", "merge", "nearest_logits"]
