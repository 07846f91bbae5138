"""FRAug: a shared embedding generator and per-client transformation networks for feature shift.

"FRAug: Tackling Federated Learning with Non-IID Features via Representation Augmentation"
(2022). Under feature shift a client's
data is small and its own; FRAug augments it in the embedding space. A generator G(z, y),
shared by all clients (averaged by the server like the model), produces client-agnostic
embeddings of class y; each client's Representation Transformation Network (RTNet) R_k, which
never leaves the client, turns them into client-specific ones; the client's head trains on its
real embeddings and on the transformed synthetic ones, which regularize it.

A local step of client k on a batch (x, y), with z ~ N(0, I) drawn per sample from a seeded
stream, e = the body's embeddings of x, s = R_k(G(z, y)) = G(z, y) + A_k G(z, y) + b_k:

    loss = CE(head(e), y) + aug_weight * (CE(head(s), y) + ||mean(s) - mean(e)||^2 / D)

and the model, the generator and the RTNet all take an SGD step on it. The model's change is
the update; the generator's trained weights are an extra upload (`generator`, packed into one
vector of the model's size) that the server averages over the cohort and sends back.

Choices of ours where the paper leaves room or where we simplified: G is a two-layer MLP
(noise `noise` dims and the one-hot class in, `gen_hidden` ReLU units, D out); R_k a residual
linear map started at zero (the identity); the paper's training of the generator and the
RTNets has more parts than this; we take one joint step on the sum above, whose second term pulls the synthetic embeddings to the
batch's real ones; the server averages the generators uniformly over the cohort. A client
serves the global model after `adapt_steps` more steps of the same objective on its own data
(generator fixed), its RTNet continuing (a new client's starting at the identity): FRAug is
FedAvg + fine-tuning with representation augmentation, the baseline it is measured against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from koinon.clients.base import CLIENT_ALGORITHMS, LocalSGD, State
from koinon.personal.evaluate import with_steps
from koinon.personal.hetero import check_plain_sgd, mean_ce, sgd_loop
from koinon.personal.recon import body_of, embed
from koinon.seeding import generator
from koinon.update import CohortResult

if TYPE_CHECKING:
    from koinon.local.trainer import CohortTrainer


def generate(gen: list[torch.Tensor], z: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """G(z, y): `[B, D]` embeddings from noise `[B, n]` and labels `[B]`."""
    w1, b1, w2, b2 = gen
    inp = torch.cat([z, torch.nn.functional.one_hot(y, classes).to(z.dtype)], dim=1)
    return torch.relu(inp @ w1.T + b1) @ w2.T + b2


def transform(rt: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """R_k(s) = s + A s + b (a residual linear map)."""
    return s + s @ rt[0].T + rt[1]


@CLIENT_ALGORITHMS.register("fraug")
class FRAug(LocalSGD):
    """FRAug (2022): a shared embedding generator, a private RTNet, augmented heads."""

    name = "fraug"
    uploads: tuple[str, ...] = ("generator",)
    downloads: tuple[str, ...] = ("generator",)

    def __init__(self, aug_weight: float = 1.0, noise: int = 16, gen_hidden: int = 32, adapt_steps: int = 20) -> None:
        if not aug_weight >= 0:
            raise ValueError(f"client.aug_weight must be >= 0, got {aug_weight}")
        for key, v in (("noise", noise), ("gen_hidden", gen_hidden)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"client.{key} must be an integer >= 1, got {v!r}")
        if not isinstance(adapt_steps, int) or isinstance(adapt_steps, bool) or adapt_steps < 0:
            raise ValueError(f"client.adapt_steps must be an integer >= 0, got {adapt_steps!r}")
        self.aug_weight, self.noise, self.gen_hidden, self.adapt_steps = float(aug_weight), noise, gen_hidden, adapt_steps

    def init_server_state(self, numel: int) -> State:
        return {"generator": torch.zeros(numel)}  # w1, b1, w2, b2; the last value 1 once made

    def shapes(self, trainer: CohortTrainer) -> tuple[int, int, list[tuple[int, ...]]]:
        _, head = body_of(trainer.module)
        c, d = trainer.layout.views(torch.zeros(trainer.layout.numel))[f"{head}.weight"].shape
        h = self.gen_hidden
        shapes = [(h, self.noise + c), (h,), (d, h), (d,)]
        if sum(torch.Size(s).numel() for s in shapes) + 1 > trainer.layout.numel:
            raise ValueError(f"client.algorithm = 'fraug': the generator ({shapes}) does not fit the model's "
                             f"{trainer.layout.numel} parameters; lower client.gen_hidden or client.noise")
        return int(c), int(d), shapes

    def unpack(self, packed: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """The generator's tensors; one not yet made: a fixed-seed initialization (PyTorch's Linear default)."""
        if float(packed[-1]) < 0.5:
            gen = torch.Generator().manual_seed(0xF7A6)
            out = []
            for i, s in enumerate(shapes):
                bound = (shapes[0][1] if i < 2 else shapes[2][1]) ** -0.5
                out.append((torch.rand(s, generator=gen) * 2 - 1) * bound)
            return out
        out, at = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            out.append(packed[at : at + n].view(s))
            at += n
        return out

    def pack(self, gen: list[torch.Tensor], numel: int) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in gen])
        out = torch.zeros(numel)
        out[: len(flat)] = flat
        out[-1] = 1.0
        return out

    def _train(self, trainer: CohortTrainer, client: int, flat: torch.Tensor, gen: list[torch.Tensor], st: State,
               batches: torch.Tensor, steps: int, seed: int, round_index: int, gen_lr: float
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], float]:
        c, d, _ = self.shapes(trainer)
        module, layout, pt = trainer.module, trainer.layout, trainer.num_trainable
        _, head = body_of(module)
        frozen = flat[pt:]
        rt = [st["rt_weight"], st["rt_bias"]] if "rt_weight" in st else [torch.zeros(d, d), torch.zeros(d)]
        noise = torch.randn(max(steps, 1), batches.shape[1], self.noise,
                            generator=generator(seed, round_index, client, 0xF7A6))
        step = [0]

        def loss_of(ts: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            views = layout.views(torch.cat([ts[0], frozen]))
            hp = {"weight": views[f"{head}.weight"], "bias": views[f"{head}.bias"]}
            e = embed(module, views, x)
            loss = mean_ce(functional_call(module.get_submodule(head), hp, (e,)), y)
            z = noise[min(step[0], len(noise) - 1), : len(y)]
            step[0] += 1
            if not self.aug_weight:
                return loss
            s = transform(ts[5:7], generate(ts[1:5], z, y, c))
            aug = mean_ce(functional_call(module.get_submodule(head), hp, (s,)), y)
            return loss + self.aug_weight * (aug + (s.mean(dim=0) - e.mean(dim=0)).pow(2).sum() / d)

        trained, loss = sgd_loop(trainer.local, trainer.x_train, trainer.y_train, batches, steps,
                                 [flat[:pt], *gen, *rt], loss_of, [1.0] + [gen_lr] * 4 + [1.0, 1.0])
        return torch.cat([trained[0], frozen]), trained[1:5], trained[5:7], loss

    def train_cohort(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        check_plain_sgd(trainer.local, self.name)
        _, _, shapes = self.shapes(trainer)
        numel = trainer.layout.numel
        gen = self.unpack(server_state.get("generator", torch.zeros(numel)), shapes)
        deltas, losses, gens, states = [], [], [], []
        for i, c in enumerate(client_ids):
            model, g, rt, loss = self._train(trainer, c, global_params, gen, client_states[i], idx[i], int(steps[i]),
                                             seed, round_index, 1.0)
            deltas.append(model - global_params)
            gens.append(self.pack(g, numel))
            states.append({"rt_weight": rt[0], "rt_bias": rt[1]})
            losses.append(loss)
        return CohortResult(list(client_ids), torch.stack(deltas), {"generator": torch.stack(gens)},
                            trainer.sizes(client_ids), steps.clone(), torch.tensor(losses), states)

    def server_update(self, server_state: State, uploads: dict[str, torch.Tensor], cohort_fraction: float) -> State:
        if "generator" not in uploads:
            return server_state
        # The cohort's mean generator; divided by its flag (1 for a round's mean; an asynchronous
        # schedule's staleness-weighted single update scales the flag with the weights).
        gen = uploads["generator"] / uploads["generator"][-1].clamp_min(1e-12)
        return {**server_state, "generator": gen}

    def personalize(self, trainer: CohortTrainer, client_ids: list[int], global_params: torch.Tensor,
                    server_state: State, client_states: list[State], seed: int, round_index: int) -> torch.Tensor:
        """The global model after `adapt_steps` steps of the augmented objective on the client's
        data (generator fixed; its RTNet, a new client's from the identity)."""
        _, _, shapes = self.shapes(trainer)
        gen = self.unpack(server_state.get("generator", torch.zeros(trainer.layout.numel)), shapes)
        other = with_steps(trainer, self.adapt_steps)
        models = []
        for c, st in zip(client_ids, client_states):
            batches = other.client_batches(c, seed, round_index)
            model, _, _, _ = self._train(trainer, c, global_params, gen, st, batches, self.adapt_steps, seed,
                                         round_index, 0.0)
            models.append(model)
        return torch.stack(models)


__all__ = ["FRAug", "generate", "transform"]
