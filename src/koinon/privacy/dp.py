"""User-level differential privacy for federated averaging.

- `CentralDP`: DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963). Every
  update is clipped to L2 norm <= C, the clipped updates are summed with equal weights, Gaussian
  noise of std z * C is added to the sum, and the sum is divided by the *expected* cohort size m
  (a fixed denominator: dividing by the number that arrived would leak it). Under secure
  aggregation the clients clip and the server noises the unmasked sum (`release`).
- `AdaptiveClip`: the clip bound follows a target quantile of the update norms (Andrew et al.
  2021, https://arxiv.org/abs/1905.03871). Each client reports b = 1 when its norm is <= C (it was
  NOT clipped); the server releases the *centred* count sum(b - 1/2) + N(0, sigma_b^2) (as their
  Algorithm 1 and TF Privacy do: adding or removing one client moves it by 1/2, not 1), takes
  b_bar = released / m + 1/2 and sets C <- C * exp(-eta * (b_bar - gamma)): too many unclipped
  updates shrink C, too few grow it. The round's noise uses the C that clipped the round's
  updates, never the updated one. Releasing b_bar costs privacy too: the update noise multiplier
  is raised so that both together are a Gaussian mechanism of multiplier z (their Theorem 1,
  sensitivity 1/2 of the centred count: z_update = (z^-2 - (2 sigma_b)^-2)^-1/2).
- `LocalDP`: each client clips its own update and adds the noise before it leaves the client.

A zero update has norm 0 and is kept as it is (the clipping factor is C / max(norm, C)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from koinon.errors import KoinonError
from koinon.privacy.accounting import Accountant, epsilon_for
from koinon.privacy.noise import NoiseSource

__all__ = ["AdaptiveClip", "CentralDP", "LocalDP", "PrivacyBudgetExceeded", "clip_rows",
           "update_noise_multiplier"]


class PrivacyBudgetExceeded(KoinonError):
    """Another round would spend more than `privacy.target_epsilon`."""


def clip_rows(stack: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `stack` scaled to L2 norm <= `clip`, and the rows' norms (float64)."""
    norms = stack.double().norm(dim=1)
    scale = clip / norms.clamp_min(clip)  # 1 for norm <= clip, zero rows included (no 0/0)
    return stack * scale.to(stack.dtype).unsqueeze(1), norms


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """The multiplier of the update's noise when the unclipped count is released with noise
    std `count_stddev` and both together must be a Gaussian mechanism of multiplier `z`."""
    if count_stddev <= 0:
        return z
    rest = z**-2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"clip_count_stddev = {count_stddev:g} is too small for noise multiplier "
                         f"{z:g}: adaptive clipping needs clip_count_stddev > noise_multiplier / 2")
    return rest**-0.5


@dataclass
class AdaptiveClip:
    """Andrew et al.'s geometric update of the clip bound towards the `target_quantile` of the norms."""

    clip: float
    target_quantile: float
    lr: float
    count_stddev: float

    def update(self, unclipped: float, summed: float, denominator: float, noise: NoiseSource) -> float:
        """Move the clip bound; returns the noised fraction of unclipped updates b_bar.
        `unclipped` of the `summed` updates were not clipped; `denominator` is the expected
        cohort m. The released query is the centred count sum(b - 1/2) (sensitivity 1/2)."""
        centred = unclipped - summed / 2
        noised = centred + float(noise.normal(1, self.count_stddev)[0]) if self.count_stddev else centred
        fraction = noised / denominator + 0.5
        self.clip *= math.exp(-self.lr * (fraction - self.target_quantile))
        return fraction


@dataclass
class CentralDP:
    """DP-FedAvg at the server: clip, sum, noise, divide by the expected cohort size."""

    noise_multiplier: float  # z of the whole round (update and, with adaptive clipping, count)
    clip: float
    expected_clients: int  # the fixed denominator m
    accountant: Accountant
    noise: NoiseSource
    target_epsilon: float = 0.0  # 0: no budget
    adaptive: AdaptiveClip | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def update_multiplier(self) -> float:
        stddev = self.adaptive.count_stddev if self.adaptive else 0.0
        return update_noise_multiplier(self.noise_multiplier, stddev)

    @property
    def current_clip(self) -> float:
        return self.adaptive.clip if self.adaptive else self.clip

    def check_budget(self) -> None:
        """Refuse, before anything is released, a round that would pass the budget."""
        if not self.target_epsilon:
            return
        after = self.accountant.epsilon([self.noise_multiplier])
        if after > self.target_epsilon * (1 + 1e-6):
            spent = self.accountant.epsilon()
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: {len(self.accountant.noise)} rounds spent epsilon = {spent:.4g}, "
                f"one more would reach {after:.4g} > privacy.target_epsilon = {self.target_epsilon:g}")

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The noised mean of the clipped `updates` [n, P] (equal weights: `weights` is ignored,
        sample counts would change the sensitivity)."""
        clip = self.current_clip
        clipped, norms = clip_rows(updates, clip)
        return self.release(clipped.double().sum(dim=0), float((norms <= clip).sum()), clip, updates.shape[0])

    def release(self, total: torch.Tensor, unclipped: float, clip: float, summed: int) -> torch.Tensor:
        """Noise the sum of `summed` updates clipped to `clip` (computed here or under secure
        aggregation; `unclipped` of them were not clipped), account the round and move an
        adaptive bound. Returns the mean [P]."""
        self.check_budget()
        std = self.update_multiplier * clip
        noised = total.double() + self.noise.normal(total.numel(), std).double()
        mean = (noised / self.expected_clients).to(torch.float32)
        self.accountant.spend(self.noise_multiplier)
        self.metrics = {"dp_epsilon": self.accountant.epsilon(), "dp_clip": clip, "dp_noise_std": std}
        if self.adaptive is not None:
            self.metrics["dp_unclipped"] = self.adaptive.update(unclipped, summed, self.expected_clients,
                                                                     self.noise)
        return mean

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"clip": torch.tensor([self.current_clip], dtype=torch.float64),
                "noise": torch.tensor(self.accountant.noise, dtype=torch.float64)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if "clip" in tensors and self.adaptive is not None:
            self.adaptive.clip = float(tensors["clip"][0])
        self.accountant.noise = [float(z) for z in tensors.get("noise", torch.zeros(0)).tolist()]


@dataclass
class LocalDP:
    """Clip each client's update and add N(0, (z C)^2) on the client, before it is encoded.

    Accounting is per client: its releases are Gaussian mechanisms with no amplification (the
    server sees every one), counted over the rounds the client was sampled in."""

    noise_multiplier: float
    clip: float
    delta: float
    kind: str = "rdp"
    target_epsilon: float = 0.0
    seed: int | None = None  # reproducible, NOT private noise (tests)
    participations: dict[int, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def privatize(self, updates: torch.Tensor, clients: list[int], round_index: int) -> torch.Tensor:
        """What the clients `clients` release: their clipped, noised updates [K, P]."""
        clipped, _ = clip_rows(updates, self.clip)
        from koinon.seeding import mix_seed

        out = torch.empty_like(clipped)
        for i, client in enumerate(clients):
            noise = NoiseSource(None if self.seed is None else mix_seed(self.seed, round_index, client))
            out[i] = clipped[i] + noise.normal(clipped.shape[1], self.noise_multiplier * self.clip)
        return out

    def record(self, cohort: list[int]) -> None:
        """The cohort released its updates this round: the worst-off client's epsilon."""
        for c in cohort:
            self.participations[c] = self.participations.get(c, 0) + 1
        worst = max(self.participations.values(), default=0)
        eps = epsilon_for(self.noise_multiplier, 1.0, worst, self.delta, self.kind)
        self.metrics = {"dp_epsilon": eps, "dp_clip": self.clip,
                        "dp_noise_std": self.noise_multiplier * self.clip}

    def check_budget(self, cohort: list[int]) -> None:
        if not self.target_epsilon:
            return
        worst = max((self.participations.get(c, 0) for c in cohort), default=0) + 1
        eps = epsilon_for(self.noise_multiplier, 1.0, worst, self.delta, self.kind)
        if eps > self.target_epsilon * (1 + 1e-6):
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: a sampled client's release {worst} would reach epsilon = "
                f"{eps:.4g} > privacy.target_epsilon = {self.target_epsilon:g}")
