"""Sample-level DP-SGD inside each client (Abadi et al. 2016, https://arxiv.org/abs/1607.00133).

Every local step a client Poisson-samples its data (each sample with probability q = B / n,
B the batch size, n its samples), computes one gradient *per sample*, clips each to L2 norm
<= C, sums them, adds N(0, (z C)^2) and divides by the expected batch size B. Its update is then
(epsilon, delta)-DP with respect to any one of its samples, whatever the server does.

Why not Opacus: koinon trains a cohort as one `[K, P]` stack through `torch.func`
(`functional_call` under `vmap`, or hand-batched kernels), while Opacus computes per-sample
gradients with hooks on an `nn.Module` it wraps and steps that module's own optimizer: it would
need a separate per-client training loop. The same per-sample gradients come from
`torch.func.vmap(grad(...))` over the samples of every client at once (Opacus' own "functorch"
mode does this). The sampling uses the noise source (secure by default): amplification by
subsampling needs the adversary not to know which samples a step used.

Accounting (dp-accounting): a client spends one Poisson-sampled Gaussian event per local step;
the reported epsilon is the worst client's (largest q, most steps, times the rounds it took part
in), an upper bound for everyone. Models with buffers (BatchNorm) are refused: a batch
statistic mixes samples, so per-sample gradients are not defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from koinon.privacy.accounting import epsilon_for
from koinon.privacy.dp import PrivacyBudgetExceeded
from koinon.privacy.noise import NoiseSource
from koinon.update import CohortResult, State

__all__ = ["SampleDP"]


@dataclass
class SampleDP:
    """Wraps a client algorithm (fedavg): its local loop becomes DP-SGD."""

    inner: Any
    noise_multiplier: float
    clip: float
    sizes: torch.Tensor  # every client's number of samples
    batch_size: int
    epochs: int
    delta: float
    kind: str = "rdp"
    target_epsilon: float = 0.0
    seed: int | None = None
    participations: dict[int, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # begin, end, server_update, uploads, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return f"dpsgd({self.inner.name})"

    def rate_and_steps(self, num_samples: int) -> tuple[float, int]:
        """A client's sampling rate and local steps a round."""
        n = max(num_samples, 1)
        return min(1.0, self.batch_size / n), self.epochs * math.ceil(n / self.batch_size)

    def worst_epsilon(self, rounds: int) -> float:
        """epsilon after `rounds` rounds of the client with the largest q and the most steps."""
        present = self.sizes[self.sizes > 0]
        q = self.rate_and_steps(int(present.min()))[0]
        steps = self.rate_and_steps(int(present.max()))[1]
        return epsilon_for(self.noise_multiplier, q, steps * rounds, self.delta, self.kind)

    def check_budget(self, cohort: list[int]) -> None:
        if not self.target_epsilon:
            return
        worst = max((self.participations.get(c, 0) for c in cohort), default=0) + 1
        eps = self.worst_epsilon(worst)
        if eps > self.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetExceeded(f"privacy budget exhausted: a sampled client's round {worst} would "
                                        f"reach epsilon = {eps:.4g} > privacy.target_epsilon = {self.target_epsilon:g}")

    def record(self, cohort: list[int]) -> None:
        for c in cohort:
            self.participations[c] = self.participations.get(c, 0) + 1
        self.metrics = {"dp_epsilon": self.worst_epsilon(max(self.participations.values(), default=0)),
                        "dp_clip": self.clip, "dp_noise_std": self.noise_multiplier * self.clip}

    def train_cohort(self, trainer: Any, client_ids: list[int], global_params: torch.Tensor,
                     server_state: State, client_states: list[State], idx: torch.Tensor, steps: torch.Tensor,
                     seed: int, round_index: int) -> CohortResult:
        """DP-SGD for the cohort in lock-step (the trainer's batches are not used: Poisson sampling)."""
        from koinon.seeding import mix_seed

        k, pt = len(client_ids), trainer.num_trainable
        theta = global_params.unsqueeze(0).repeat(k, 1)[:, :pt].clone()
        ctx = self.inner.begin(global_params, server_state, client_states)
        opt_state = trainer.optimizer.init(k, pt)
        noise = [NoiseSource(None if self.seed is None else mix_seed(self.seed, round_index, c)) for c in client_ids]
        own = [trainer.data.client_indices[c].to(torch.long) for c in client_ids]
        plan = [self.rate_and_steps(len(ix)) for ix in own]
        num_steps = max((s for _, s in plan), default=0)
        module, loss_fn = trainer.module, trainer.loss_fn

        def sample_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(module, params, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

        per_sample = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
        loss_sum, seen = torch.zeros(k), torch.zeros(k)
        module.train()
        for s in range(num_steps):
            picks = []
            for i, ix in enumerate(own):
                q, n_steps = plan[i]
                if s >= n_steps or not len(ix):
                    picks.append(ix[:0])
                    continue
                u = torch.from_numpy(noise[i].uniform(len(ix)))
                picks.append(ix[u < q])
            width = max((len(p) for p in picks), default=0)
            # Every client's Poisson batch may be empty: the step still happens (noise only), as
            # the accounted mechanism (a sampled Gaussian) adds its noise whatever was sampled.
            g = torch.zeros(k, pt)
            if width:
                batch = torch.zeros(k, width, dtype=torch.long)
                weight = torch.zeros(k, width)
                for i, p in enumerate(picks):
                    batch[i, :len(p)] = p
                    weight[i, :len(p)] = 1.0
                x, y = trainer.x_train[batch], trainer.y_train[batch]
                params = {n: v.detach() for n, v in trainer.stack_params(theta, theta[:, :0]).items()}
                grads = per_sample(params, x, y)
                flat = torch.cat([grads[e.name].reshape(k, width, -1) for e in trainer.layout.entries
                                  if e.trainable], dim=2)
                norms = flat.norm(dim=2)
                flat = flat * (self.clip / norms.clamp_min(self.clip) * weight).unsqueeze(2)
                g = flat.sum(dim=1)
                with torch.no_grad():
                    out = trainer.forward_stack(theta, theta[:, :0], x)
                    losses = loss_fn(out.flatten(0, 1), y.flatten()).view(k, width)
                    loss_sum += (losses * weight).sum(dim=1)
                    seen += weight.sum(dim=1)
            active = torch.tensor([s < n for _, n in plan], dtype=torch.float32)
            for i in range(k):
                if active[i]:
                    g[i] += noise[i].normal(pt, self.noise_multiplier * self.clip)
            g = g / self.batch_size * active.unsqueeze(1)
            with torch.no_grad():
                before = theta.clone()
                trainer.optimizer.step(theta, g, opt_state, s, trainer.local.lr, None)
                theta = torch.where(active.bool().unsqueeze(1), theta, before)  # finished clients stay
        final = torch.cat([theta, global_params[pt:].unsqueeze(0).repeat(k, 1)], dim=1)
        uploads, new_states = self.inner.end(global_params, final, steps, trainer.local.lr, ctx)
        return CohortResult(list(client_ids), final - global_params, uploads, trainer.sizes(client_ids),
                            torch.tensor([n for _, n in plan]), loss_sum / seen.clamp_min(1.0), new_states)
