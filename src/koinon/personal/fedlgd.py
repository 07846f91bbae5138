"""FedLGD: federated learning on virtual heterogeneous data with local-global dataset
distillation (Huang et al. 2023, https://arxiv.org/abs/2303.02278).

Clients train on small distilled ("virtual") data instead of their real samples:

1. local virtual data: each client keeps `ipc` virtual samples per class it holds labels of
   (client state `virtual_x`, `virtual_y`: it never leaves the client; in a deployment it lives
   in `--state`). They start as `ipc` real samples of the class (a seeded choice) and, every
   round, take `dm_steps` steps of iterative distribution matching against the client's real
   samples in the embedding of the model it received (the input of the output layer): for each
   class c, || mean phi(virtual_c) - mean phi(real_c) ||^2 - the global model "inpaints" global
   information into the local virtual data;
2. federated gradient matching: each client uploads the gradient of the loss on its virtual data
   at the received model (stream `vgrad`, encoded and counted by the uplink codec); the server
   moves its global virtual data (`ipc` samples per class, state `global_x`) for `match_steps`
   steps so that the gradient on it matches the clients' weighted mean gradient, by the layer-wise
   cosine distance of gradient matching (sum over layers of 1 - cos);
3. local training: the round's local steps run on the client's local virtual data together with
   the global virtual data (the anchor that pulls heterogeneous clients together), which every
   sampled client downloads each round through the downlink codec: its bytes are counted as any
   model payload's (`downlink_bytes`). The codecs are built for the model's layout, so the
   virtual data travels as the first ipc * C * D values of a model-sized vector (`ipc` is
   refused where it does not fit); the zero padding is sent and counted too (a sparse downlink
   codec sends less).

Where the paper leaves a detail open or ties it to its setup, our choices: the global virtual
data starts as Gaussian noise (seeded) and the local as real samples; the embedding is the
received model's own penultimate layer (the paper's distribution matching uses randomly
initialized networks in part); the global virtual data regularizes local training by joining its
batches (the paper adds it through a contrastive regularizer); the FedAvg weight stays the
client's real sample count. The defaults (`dm_lr` = 0.1, `match_lr` = 3.0) are the best of a few tried on digits,
Dirichlet(0.1), seed 0. Flattened inputs only (the model's first layer with parameters is
`Linear`), so virtual samples are vectors reshaped to the input shape.

The server's gradient matching needs the model's forward: in simulation the algorithm takes the
module from the trainer; `koinon server`, which builds the run's model to evaluate it, hands it
over before round 1 (`serve_with`), and the global virtual data goes to the clients as a download
of the server state, its bytes counted, as in simulation.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.data.federated import FederatedData
from koinon.params import Layout
from koinon.personal.base import module_prefixes
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def _shape(layout: Layout) -> tuple[int, int]:
    """(input features, classes) of a model whose first layer is Linear (`[out, in]` weight)."""
    weights = [e for e in layout.entries if len(e.shape) == 2]
    if not weights or len([e for e in layout.entries if len(e.shape) > 2]):
        raise ValueError("client.algorithm = 'fedlgd' needs a model of Linear layers on flattened inputs "
                         "(its virtual samples are vectors)")
    return int(weights[0].shape[1]), int(weights[-1].shape[0])


def embed(module: torch.nn.Module, layout: Layout, params: torch.Tensor, x: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input of the output layer `[n, F]`, the logits `[n, C]`) of `x` under `params`."""
    head = module.get_submodule(module_prefixes(layout)[-1])
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        logits = functional_call(module, layout.views(params), (x,))
    finally:
        handle.remove()
    return seen[-1].flatten(1), logits


def dm_loss(features_virtual: torch.Tensor, y_virtual: torch.Tensor, features_real: torch.Tensor,
            y_real: torch.Tensor) -> torch.Tensor:
    """Distribution matching: sum over the virtual data's classes of the squared distance
    between the mean embedding of its virtual and of its real samples."""
    loss = features_virtual.new_zeros(())
    for c in y_virtual.unique().tolist():
        real = features_real[y_real == c]
        if len(real):
            loss = loss + (features_virtual[y_virtual == c].mean(0) - real.mean(0)).pow(2).sum()
    return loss


def match_distance(grad: torch.Tensor, target: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Gradient matching's distance: sum over the trainable layers of 1 - cos(grad, target)."""
    total = grad.new_zeros(())
    for e in layout.entries:
        if e.trainable:
            a, b = grad[e.offset : e.offset + e.numel], target[e.offset : e.offset + e.numel]
            if float(b.norm()) > 0:
                total = total + 1 - F.cosine_similarity(a, b, dim=0, eps=1e-12)
    return total


@CLIENT_ALGORITHMS.register("fedlgd")
class FedLGD(LocalSGD):
    """Training on distilled virtual data (see the module docstring). `ipc`: virtual samples per
    class; `dm_steps`, `dm_lr`: the clients' distribution matching; `match_steps`,
    `match_lr`: the server's gradient matching."""

    name = "fedlgd"
    uploads: tuple[str, ...] = ("vgrad",)
    downloads: tuple[str, ...] = ("global_x",)

    def __init__(self, ipc: int = 5, dm_steps: int = 10, dm_lr: float = 0.1, match_steps: int = 10,
                 match_lr: float = 3.0, seed: int = 0, layout: Layout | None = None) -> None:
        for key, value in (("ipc", ipc), ("dm_steps", dm_steps), ("match_steps", match_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "ipc" else 0):
                raise ValueError(f"client.{key} must be an integer >= {1 if key == 'ipc' else 0}, got {value!r}")
        for key, lr in (("dm_lr", dm_lr), ("match_lr", match_lr)):
            if not lr > 0:
                raise ValueError(f"client.{key} must be > 0, got {lr}")
        self.ipc, self.dm_steps, self.dm_lr = ipc, dm_steps, float(dm_lr)
        self.match_steps, self.match_lr = match_steps, float(match_lr)
        self.seed = seed
        self.layout = layout
        self.features, self.classes = _shape(layout) if layout is not None else (0, 0)
        self.module: torch.nn.Module | None = None

    def serve_with(self, module: torch.nn.Module) -> None:
        """A server that trains no client (`koinon server`) runs its gradient matching with
        `module`, the run's model (only its forward is used, at the parameters given)."""
        self.module = module

    def global_labels(self) -> torch.Tensor:
        return torch.arange(self.classes).repeat_interleave(self.ipc)

    def init_server_state(self, numel: int) -> State:
        if not self.classes:
            raise ValueError("FedLGD needs the model's layout: pass it by name, algorithm={'name': 'fedlgd', ...}, "
                             "or build FedLGD(layout=Layout.from_module(model))")
        size = self.classes * self.ipc * self.features
        if size > numel:
            raise ValueError(f"client.ipc = {self.ipc}: the global virtual data ({size} values) must fit the "
                             f"model-sized download ({numel} values): ipc <= {numel // (self.classes * self.features)}")
        g = generator(self.seed, 0x16D)
        out = torch.zeros(numel)
        out[:size] = torch.randn(size, generator=g)
        return {"global_x": out}

    def unpack(self, flat: torch.Tensor) -> torch.Tensor:
        """`[ipc * C, D]`: the global virtual data inside its model-sized vector."""
        return flat[: self.classes * self.ipc * self.features].view(self.classes * self.ipc, self.features)

    def pack(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(like)
        out[: x.numel()] = x.flatten()
        return out

    def _initial(self, trainer: CohortTrainer, client: int, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`ipc` real samples of each class the client has labels of (seeded), flattened."""
        y = trainer.y_train[real].cpu()
        g = generator(self.seed, client, 0x16E)
        picks, labels = [], []
        for c in y.unique().tolist():
            mine = real[y == c]
            chosen = mine[torch.randperm(len(mine), generator=g)[: self.ipc]]
            picks.append(chosen)
            labels.append(torch.full((len(chosen),), c, dtype=torch.long))
        ix = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
        return trainer.x_train[ix.to(trainer.x_train.device)].flatten(1).clone(), torch.cat(labels) if labels else ix

    def distill(self, trainer: CohortTrainer, params: torch.Tensor, virtual: torch.Tensor, y_virtual: torch.Tensor,
                x_real: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
        """`dm_steps` steps of gradient descent (`dm_lr`) on the virtual samples' distribution
        matching loss in the embedding of `params`."""
        shape = x_real.shape[1:]
        with torch.no_grad():
            real_features = embed(trainer.module, trainer.layout, params, x_real)[0]
        v = virtual.clone()
        for _ in range(self.dm_steps):
            v.requires_grad_(True)
            loss = dm_loss(embed(trainer.module, trainer.layout, params, v.view(-1, *shape))[0], y_virtual,
                           real_features, y_real)
            (g,) = torch.autograd.grad(loss, v)
            v = (v - self.dm_lr * g).detach()
        return v

    def virtual_grad(self, trainer: CohortTrainer, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     create_graph: bool = False) -> torch.Tensor:
        """`[P]`: the gradient of the mean cross-entropy on `(x, y)` at `params` (zero on buffers)."""
        leaf = params.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(functional_call(trainer.module, trainer.layout.views(leaf), (x,)), y)
        (g,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
        return g

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        from koinon.personal.evaluate import with_steps

        self.module = trainer.module
        data = trainer.data
        ds = data.dataset
        shape = tuple(trainer.x_train.shape[1:])
        x_global = self.unpack(server_state["global_x"]).to(trainer.x_train.device)
        y_global = self.global_labels().to(trainer.y_train.device)
        trainer.module.train()
        xs, ys, grads, states = [trainer.x_train], [trainer.y_train], [], []
        indices = [torch.zeros(0, dtype=torch.long)] * data.num_clients
        offset = len(trainer.x_train)
        for i, c in enumerate(client_ids):
            start = global_params if global_params.dim() == 1 else global_params[i]
            real = data.client_indices[c]
            st = client_states[i]
            if "virtual_x" in st:
                v, vy = st["virtual_x"], st["virtual_y"].long()
            else:
                v, vy = self._initial(trainer, c, real)
            x_real = trainer.x_train[real.to(trainer.x_train.device)]
            y_real = trainer.y_train[real.to(trainer.y_train.device)]
            v = self.distill(trainer, start, v, vy, x_real, y_real) if len(v) else v
            grads.append(self.virtual_grad(trainer, start, v.view(-1, *shape), vy) if len(v)
                         else torch.zeros_like(start))
            states.append({"virtual_x": v, "virtual_y": vy.float()})
            xs += [v.view(-1, *shape), x_global.view(-1, *shape)]
            ys += [vy, y_global]
            indices[c] = torch.arange(offset, offset + len(v) + len(y_global))
            offset += len(v) + len(y_global)
        virtual = dataclasses.replace(ds, x_train=torch.cat(xs).cpu(), y_train=torch.cat(ys).cpu())
        view = with_steps(trainer, data=FederatedData(virtual, indices))
        own_idx, own_steps = view.schedule(client_ids, seed, round_index)
        result = view.run_steps(client_ids, global_params, server_state, client_states, own_idx, own_steps,
                                algorithm=LocalSGD())
        result.num_samples = trainer.sizes(client_ids).to(result.num_samples.device)
        result.uploads = {"vgrad": torch.stack(grads)}
        result.client_states = states
        return result

    def server_update_rows(self, server_state: State, old: torch.Tensor, new: torch.Tensor,
                           rows: dict[str, torch.Tensor], weights: torch.Tensor, client_ids: list[int]) -> State:
        """Federated gradient matching of the global virtual data at the round's received model."""
        if self.module is None or self.layout is None or "vgrad" not in rows:
            return server_state
        w = weights.to(rows["vgrad"].dtype)
        target = (rows["vgrad"] * (w / w.sum()).unsqueeze(1)).sum(0)
        trainer = _ModuleView(self.module, self.layout)
        x = self.unpack(server_state["global_x"]).clone()
        y = self.global_labels()
        for _ in range(self.match_steps):
            x.requires_grad_(True)
            g = self.virtual_grad(trainer, old, x, y, create_graph=True)  # type: ignore[arg-type]
            (step,) = torch.autograd.grad(match_distance(g, target, self.layout), x)
            x = (x - self.match_lr * step).detach()
        return {**server_state, "global_x": self.pack(x, server_state["global_x"])}


class _ModuleView:
    """What `FedLGD.virtual_grad` needs of a trainer: the module and the layout."""

    def __init__(self, module: torch.nn.Module, layout: Layout) -> None:
        self.module = module
        self.layout = layout
