"""Client samplers that learn from feedback: power-of-choice, UCB (over clients or data sources)
and curriculum selection.

Each one keeps what `observe(Feedback)` told it (the last training loss of every client whose
update was taken, how often each arm was played) and picks the next cohort from that; before any
feedback they pick as `uniform` would. Their randomness comes only from the seeded generator the
server passes to `sample`, so a run stays reproducible.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

from koinon.server.samplers import SAMPLERS, Feedback, _check


def _pack(values: dict[int, float]) -> dict[str, torch.Tensor]:
    keys = sorted(values)
    return {"ids": torch.tensor(keys, dtype=torch.long),
            "values": torch.tensor([values[k] for k in keys], dtype=torch.float64)}


def _unpack(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[int, float]:
    ids, values = tensors.get(prefix + "ids"), tensors.get(prefix + "values")
    if ids is None or values is None:
        return {}
    return dict(zip((int(i) for i in ids.tolist()), (float(v) for v in values.tolist())))


class _LastLoss:
    """Checkpointing of a sampler that keeps every client's last loss (`losses`)."""

    losses: dict[int, float]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _pack(self.losses)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.losses = _unpack(tensors)


def _random_order(available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return available[rng.permutation(len(available))]


@SAMPLERS.register("power_of_choice")
class PowerOfChoice(_LastLoss):
    """Power-of-choice (Cho et al. 2020, arXiv:2010.01243): draw `d` candidates with probability
    proportional to data size, keep the `k` with the highest last training loss (a client never
    heard from counts as the highest)."""

    name = "power_of_choice"

    def __init__(self, d: int = 0) -> None:
        if d < 0:
            raise ValueError(f"power_of_choice d must be >= 0 (0 = twice the cohort), got {d}")
        self.d = d
        self.losses: dict[int, float] = {}

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        _check(available, k)
        d = min(len(available), max(k, self.d or 2 * k))
        w = sizes.astype(np.float64) + 1e-12
        candidates = rng.choice(available, size=d, replace=False, p=w / w.sum())
        loss = np.array([self.losses.get(int(c), math.inf) for c in candidates])
        order = np.argsort(-loss, kind="stable")  # candidates come in random order: ties are random
        return sorted(int(c) for c in candidates[order[:k]])

    def observe(self, feedback: Feedback) -> None:
        self.losses.update(zip(feedback.client_ids, feedback.losses))


@SAMPLERS.register("ucb")
class UCB:
    """UCB1 over arms: clients, or data sources when `sources` maps each client to one (the
    distribution-level curriculum of DUMP, Wang et al. 2025, arXiv:2504.09710, with the training
    loss as the learnability signal in place of the policy advantage).

    An arm's score is its mean reward over its last `window` plays (0: all of them) plus
    `c * sqrt(2 ln t / n_arm)`; rewards are the observed losses divided by the largest loss seen
    so far, so they lie in [0, 1] as UCB1 assumes. Clients as arms: the `k` best scores (arms
    never played first). Sources as arms (DUMP's scheme): a source never played gets the next
    slot; otherwise each slot draws a source with probability softmax(score / `temperature`)
    (`temperature` 0: the best score), and a client of that source is drawn uniformly."""

    name = "ucb"

    def __init__(self, c: float = 1.0, window: int = 0, sources: list[int] | None = None,
                 temperature: float = 0.1) -> None:
        if temperature < 0:
            raise ValueError(f"ucb temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        if c < 0:
            raise ValueError(f"ucb c must be >= 0, got {c}")
        if window < 0:
            raise ValueError(f"ucb window must be >= 0 (0 = every play), got {window}")
        self.c = c
        self.window = window
        self.sources = None if sources is None else np.asarray(sources, dtype=np.int64)
        self.rewards: dict[int, deque[float]] = {}
        self.plays: dict[int, int] = {}
        self.total = 0
        self.scale = 0.0

    def arm(self, client: int) -> int:
        return client if self.sources is None else int(self.sources[client])

    def scores(self, arms: np.ndarray, extra: dict[int, int] | None = None) -> np.ndarray:
        """UCB score of each arm (inf for arms never played)."""
        extra = extra or {}
        t = max(self.total + sum(extra.values()), 1)
        out = np.empty(len(arms))
        for i, a in enumerate(arms.tolist()):
            n = self.plays.get(a, 0) + extra.get(a, 0)
            history = self.rewards.get(a)
            if not n or not history:
                out[i] = math.inf
                continue
            out[i] = float(np.mean(history)) + self.c * math.sqrt(2 * math.log(t) / n)
        return out

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        _check(available, k)
        shuffled = _random_order(available, rng)  # ties between equal scores are broken at random
        if self.sources is None:
            score = self.scores(shuffled)
            return sorted(int(c) for c in shuffled[np.argsort(-score, kind="stable")[:k]])
        by_source: dict[int, list[int]] = {}
        for c in shuffled.tolist():
            by_source.setdefault(self.arm(c), []).append(c)
        chosen: list[int] = []
        given: dict[int, int] = {}
        for _ in range(k):
            arms = np.array([a for a, left in by_source.items() if left])
            score = self.scores(arms, given)
            if np.isinf(score).any() or self.temperature == 0:
                best = int(arms[int(np.argmax(score))])
            else:
                p = np.exp((score - score.max()) / self.temperature)
                best = int(rng.choice(arms, p=p / p.sum()))
            chosen.append(by_source[best].pop())
            given[best] = given.get(best, 0) + 1
        return sorted(chosen)

    def observe(self, feedback: Feedback) -> None:
        for client, loss in zip(feedback.client_ids, feedback.losses):
            if not math.isfinite(loss):
                continue
            self.scale = max(self.scale, abs(loss))
            self.reward(self.arm(client), abs(loss) / self.scale if self.scale else 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        arms = sorted(self.plays)
        out = {"arms": torch.tensor(arms, dtype=torch.long),
               "plays": torch.tensor([self.plays[a] for a in arms], dtype=torch.long),
               "scale": torch.tensor([self.scale], dtype=torch.float64)}
        out.update({f"rewards/{a}": torch.tensor(list(self.rewards.get(a, ())), dtype=torch.float64) for a in arms})
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        arms = tensors.get("arms", torch.zeros(0, dtype=torch.long)).tolist()
        plays = tensors.get("plays", torch.zeros(0, dtype=torch.long)).tolist()
        self.plays = dict(zip(arms, plays))
        self.total = sum(plays)
        self.scale = float(tensors["scale"][0]) if "scale" in tensors else 0.0
        self.rewards = {a: deque(tensors[f"rewards/{a}"].tolist(), maxlen=self.window or None) for a in arms}

    def reward(self, arm: int, value: float) -> None:
        """Record one play of `arm` that earned `value` (in [0, 1])."""
        history = self.rewards.setdefault(arm, deque(maxlen=self.window or None))
        history.append(value)
        self.plays[arm] = self.plays.get(arm, 0) + 1
        self.total += 1


@SAMPLERS.register("curriculum")
class Curriculum(_LastLoss):
    """Curriculum client selection (after Vahidian et al. 2023, "When do curricula work in
    federated learning?", arXiv:2212.12712): clients ranked by their last training loss, easiest
    first (`order = "easy"`; `"hard"`: anti-curriculum); round t draws its cohort uniformly from
    the easiest fraction g(t) of the population, with g growing linearly from `start` to 1 over
    `pace` rounds. A client not heard from yet ranks as the median of those that were."""

    name = "curriculum"

    def __init__(self, start: float = 0.3, pace: int = 20, order: str = "easy") -> None:
        if not 0.0 < start <= 1.0:
            raise ValueError(f"curriculum start must be in (0, 1], got {start}")
        if pace < 1:
            raise ValueError(f"curriculum pace must be >= 1, got {pace}")
        if order not in ("easy", "hard"):
            raise ValueError(f"curriculum order must be 'easy' or 'hard', got {order!r}")
        self.start, self.pace, self.order = start, pace, order
        self.losses: dict[int, float] = {}
        self.rounds = 0

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        _check(available, k)
        fraction = min(1.0, self.start + (1.0 - self.start) * self.rounds / self.pace)
        if not self.losses:
            return sorted(int(c) for c in rng.choice(available, size=k, replace=False))
        median = float(np.median(list(self.losses.values())))
        shuffled = _random_order(available, rng)
        loss = np.array([self.losses.get(int(c), median) for c in shuffled])
        ranked = shuffled[np.argsort(loss if self.order == "easy" else -loss, kind="stable")]
        pool = ranked[: max(k, math.ceil(fraction * len(ranked)))]
        return sorted(int(c) for c in rng.choice(pool, size=k, replace=False))

    def observe(self, feedback: Feedback) -> None:
        self.losses.update(zip(feedback.client_ids, feedback.losses))
        # The pace counts server steps, not sample() calls (an attack samples twice a round, an
        # asynchronous schedule once per dispatch); a step nobody finished is not observed.
        self.rounds = max(self.rounds, feedback.round_index + 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**_pack(self.losses), "rounds": torch.tensor([self.rounds])}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.losses = _unpack(tensors)
        self.rounds = int(tensors["rounds"][0]) if "rounds" in tensors else 0


@SAMPLERS.register("availability")
class Availability:
    """Availability-aware selection: clients expected to finish before they go offline.

    Before sampling, a clock-driven schedule tells it how long each client stays online
    (`remaining`, from the trace's availability windows); feedback tells it how long each
    client's last task took. It draws uniformly among the clients whose remaining time covers
    their last duration times `margin` (a client never heard from counts as able to finish);
    if fewer than `k` qualify, the rest are those that stay online longest. Without a clock it
    samples uniformly."""

    name = "availability"

    def __init__(self, margin: float = 1.0) -> None:
        if margin <= 0:
            raise ValueError(f"availability margin must be > 0, got {margin}")
        self.margin = margin
        self.durations: dict[int, float] = {}
        self.left: dict[int, float] = {}

    def remaining(self, seconds: dict[int, float]) -> None:
        """How long each available client stays online from now."""
        self.left = dict(seconds)

    def sample(self, available: np.ndarray, sizes: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
        _check(available, k)
        shuffled = _random_order(available, rng)
        left = np.array([self.left.get(int(c), math.inf) for c in shuffled])
        need = np.array([self.margin * self.durations.get(int(c), 0.0) for c in shuffled])
        fits = left >= need
        if fits.sum() >= k:
            return sorted(int(c) for c in rng.choice(shuffled[fits], size=k, replace=False))
        order = np.lexsort((-left, ~fits))  # those that fit, then the longest online
        return sorted(int(c) for c in shuffled[order[:k]])

    def observe(self, feedback: Feedback) -> None:
        for c, d in zip(feedback.client_ids, feedback.durations):
            if d is not None:
                self.durations[c] = d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return _pack(self.durations)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.durations = _unpack(tensors)
