"""Split learning with feature coding: clients run the first layers, the server the rest.

Vanilla split learning (Gupta & Raskar 2018, https://arxiv.org/abs/1810.06060): the model is an
`nn.Sequential` cut at layer `cut`. For each local step a client runs its part on a minibatch and
sends the features (the cut layer's activations) to the server, which runs the rest, computes
the loss and sends back the gradient with respect to those features; both sides step their own
parameters with the local optimizer of `LocalTraining`. The features go through a koinon codec
(`feature_codec`, e.g. `int8` or `topk`: the feature compression between model segments that
the seed paper on coded intermediate features studies) and so does the returned gradient
(`gradient_codec`); both byte counts are the real payload lengths. Clients take turns in a
round, each starting from the client part the previous one left (the relay of vanilla split
learning; those bytes are counted too, float32). A client's batches are the trainer's seeded
schedule, so with one client and `identity` codecs this is exactly centralized training of the
whole model on that client's data (tested).

Python API only (`SplitLearning(...).run_round()`); it is not a registered topology yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from koinon.clients import LocalSGD
from koinon.compress import CODECS
from koinon.data import FederatedData
from koinon.local.algorithm import LocalTraining
from koinon.local.losses import cross_entropy
from koinon.local.trainer import CohortTrainer
from koinon.params import Entry, Layout
from koinon.seeding import generator


@dataclass
class SplitRound:
    """What one round of split learning moved and how well it trained."""

    round: int
    feature_bytes: int = 0  # client -> server, coded features
    gradient_bytes: int = 0  # server -> client, coded feature gradients
    relay_bytes: int = 0  # client part handed to the next client (float32)
    steps: int = 0
    train_loss: float = 0.0
    clients: list[int] = field(default_factory=list)


def _layout(numel: int) -> Layout:
    return Layout((Entry("features", (numel,), torch.float32, 0, True),))


class SplitLearning:
    """Split learning of an `nn.Sequential` model cut after `cut` layers, over `data`'s clients."""

    def __init__(self, model: nn.Module, cut: int, data: FederatedData, local: LocalTraining, seed: int = 0,
                 feature_codec: str = "identity", gradient_codec: str = "identity",
                 feature_options: dict | None = None, gradient_options: dict | None = None) -> None:
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"split learning needs an nn.Sequential model, not {type(model).__name__}")
        if not 0 < cut < len(model):
            raise ValueError(f"the cut must fall inside the model (0 < cut < {len(model)}), got {cut}")
        self.model, self.data, self.local, self.seed = model, data, local, seed
        self.client_part, self.server_part = model[:cut], model[cut:]
        self.client_layout = Layout.from_module(self.client_part)
        self.server_layout = Layout.from_module(self.server_part)
        self.client_params = self.client_layout.flatten(self.client_part).unsqueeze(0)
        self.server_params = self.server_layout.flatten(self.server_part).unsqueeze(0)
        self.optimizer = local.build_optimizer()
        self.codecs = {"features": (feature_codec, feature_options or {}),
                       "gradient": (gradient_codec, gradient_options or {})}
        self._built: dict[tuple[str, int], object] = {}
        # The trainer only schedules batches here (the same seeded batches as local training).
        self.batches = CohortTrainer(model, Layout.from_module(model), data, LocalSGD(), local)
        self.round_index = 0

    def _code(self, kind: str, x: torch.Tensor, client: int, step: int) -> tuple[torch.Tensor, int]:
        """`x` through the `kind` codec: what arrives, and its payload length."""
        name, options = self.codecs[kind]
        key = (kind, x.numel())
        if key not in self._built:
            self._built[key] = CODECS.build(name, dict(options), kind, layout=_layout(x.numel()))
        codec = self._built[key]
        rng = generator(self.seed, self.round_index, client, step, 0x5B17 if kind == "features" else 0x5B18)
        payload, _ = codec.encode(x.detach().reshape(-1), codec.init_state(), rng)  # type: ignore[attr-defined]
        return codec.decode(payload).view_as(x), len(payload)  # type: ignore[attr-defined]

    def run_round(self, clients: list[int] | None = None) -> SplitRound:
        """Every client in `clients` (default: all) trains its epochs in turn with the server."""
        ds = self.data.dataset
        out = SplitRound(self.round_index + 1, clients=list(range(self.data.num_clients)) if clients is None else clients)
        loss_sum, seen = 0.0, 0
        for n, client in enumerate(out.clients):
            if n:
                out.relay_bytes += self.client_layout.numel * 4
            # Optimizer state lives for one client's turn, as in local training.
            self.client_state = self.optimizer.init(1, self.client_layout.numel)
            self.server_state = self.optimizer.init(1, self.server_layout.numel)
            for s, row in enumerate(self.batches.client_batches(client, self.seed, self.round_index)):
                ix = row[row >= 0]
                x, y = ds.x_train[ix], ds.y_train[ix]
                theta_c = self.client_params.detach().requires_grad_(True)
                h = functional_call(self.client_part, self.client_layout.views(theta_c[0]), (x,))
                received, nbytes = self._code("features", h, client, s)
                out.feature_bytes += nbytes
                features = received.detach().requires_grad_(True)
                theta_s = self.server_params.detach().requires_grad_(True)
                logits = functional_call(self.server_part, self.server_layout.views(theta_s[0]), (features,))
                per_sample = cross_entropy(logits, y)
                g_server, g_features = torch.autograd.grad(per_sample.mean(), (theta_s, features))
                back, nbytes = self._code("gradient", g_features, client, s)
                out.gradient_bytes += nbytes
                (g_client,) = torch.autograd.grad(h, theta_c, back)
                lr = self.local.lr_at(s)
                with torch.no_grad():
                    self.optimizer.step(self.server_params, g_server.clone(), self.server_state, s, lr)
                    self.optimizer.step(self.client_params, g_client.clone(), self.client_state, s, lr)
                loss_sum += float(per_sample.detach().sum())
                seen += len(ix)
                out.steps += 1
        self.round_index += 1
        out.train_loss = loss_sum / max(seen, 1)
        return out

    @property
    def params(self) -> torch.Tensor:
        """The whole model as one flat tensor (client part, then server part)."""
        return torch.cat([self.client_params[0], self.server_params[0]])

    def load_into_model(self) -> nn.Module:
        self.client_layout.load_into(self.client_part, self.client_params[0])
        self.server_layout.load_into(self.server_part, self.server_params[0])
        return self.model
