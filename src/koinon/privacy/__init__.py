"""Privacy: secure aggregation (SecAgg+) and differential privacy with accounting.

`Privacy` is what a federation's server holds when `[privacy]` asks for anything (None
otherwise, and nothing changes): central DP replaces the mean with DP-FedAvg (`dp.CentralDP`),
local DP noises each client's update before it is encoded (`dp.LocalDP`), secure aggregation
replaces the upload of updates by a SecAgg+ session whose sum the server optimizer steps with
(`secure.SecureAggregation`). `build_privacy` turns a config into one, checking every key and
every combination with a one-line `ConfigError` before anything trains.

Central DP's epsilon is amplified by sampling: it assumes a uniformly sampled cohort that is
secret from the adversary. The run records (and the server's logs) list each round's cohort;
whoever reads them gets no amplification, and against them the guarantee is that of an
unsampled Gaussian mechanism per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from koinon.config import Config, PrivacyConfig
from koinon.errors import ConfigError
from koinon.privacy.accounting import Accountant, calibrate_noise, epsilon_for
from koinon.privacy.dp import (
    AdaptiveClip,
    CentralDP,
    LocalDP,
    PrivacyBudgetExceeded,
    clip_rows,
    update_noise_multiplier,
)
from koinon.privacy.dpsgd import SampleDP
from koinon.privacy.noise import NoiseSource
from koinon.privacy.secagg import FixedPoint, ProtocolError
from koinon.privacy.secure import SecureAggregation, SecureSum
from koinon.server.samplers import Poisson

__all__ = ["AdaptiveClip", "CentralDP", "LocalDP", "NoiseSource", "Privacy", "PrivacyBudgetExceeded",
           "ProtocolError", "SampleDP", "SecureAggregation", "SecureSum", "build_privacy", "check_privacy", "clip_rows"]

DP_MODES = ("none", "central", "local", "sample")


@dataclass
class Privacy:
    """The privacy mechanisms of one federation (any of the three may be None)."""

    central: CentralDP | None = None
    local: LocalDP | None = None
    secure: SecureAggregation | None = None
    sample: SampleDP | None = None  # the client algorithm, wrapped: its local loop is DP-SGD
    sampler: Poisson | None = None  # central DP: the cohort sampling its accountant assumes

    def open(self, cohort: list[int]) -> None:
        """Before a round trains: refuse it if it would pass the privacy budget."""
        if self.central is not None:
            self.central.check_budget()
        if self.local is not None:
            self.local.check_budget(cohort)
        if self.sample is not None:
            self.sample.check_budget(cohort)

    def aggregate(self, aggregator: Any, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The round's aggregate of plainly received updates: DP-FedAvg under central DP."""
        if self.central is not None:
            return self.central.aggregate(updates, weights)
        return aggregator.aggregate(updates, weights)

    def client_clip(self) -> float:
        """The L2 bound clients clip to before secure aggregation (0: none)."""
        return self.central.current_clip if self.central is not None else 0.0

    def finish_secure(self, secure: SecureSum) -> torch.Tensor:
        """The aggregate from a secure sum: noised and over the expected cohort (central DP), or
        divided by the sum of the weights (FedAvg)."""
        assert secure.total is not None
        if self.central is not None:
            return self.central.release(secure.total, float(secure.count), secure.clip, len(secure.survivors))
        return (secure.total / max(secure.weight, 1)).to(torch.float32)

    def close(self, cohort: list[int]) -> dict[str, float]:
        """After a round: what it spent (for the round's metrics)."""
        out: dict[str, float] = {}
        if self.local is not None:
            self.local.record(cohort)
            out.update(self.local.metrics)
        if self.sample is not None:
            self.sample.record(cohort)
            out.update(self.sample.metrics)
        if self.central is not None:
            out.update(self.central.metrics)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.central is not None:
            out.update({f"central/{k}": v for k, v in self.central.state_dict().items()})
        for name, part in (("local", self.local), ("sample", self.sample)):
            if part is not None and part.participations:
                items = sorted(part.participations.items())
                out[f"{name}/participations"] = torch.tensor(items, dtype=torch.long)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.central is not None:
            self.central.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("central/")})
        for name, part in (("local", self.local), ("sample", self.sample)):
            if part is not None:
                rows = tensors.get(f"{name}/participations", torch.zeros(0, 2, dtype=torch.long)).tolist()
                part.participations = {int(c): int(n) for c, n in rows}


def _enabled(p: PrivacyConfig) -> bool:
    return p.secagg or p.dp != "none"


def check_privacy(cfg: Config) -> None:
    """Refuse `[privacy]` on a topology without a server (gossip, DiLoCo)."""
    if _enabled(cfg.privacy) and cfg.topology.name != "federated":
        raise ConfigError(f"[privacy] (secagg / dp) needs topology.name = 'federated' (a server), "
                          f"not {cfg.topology.name!r}")


def _check_keys(p: PrivacyConfig) -> None:
    if p.dp not in DP_MODES:
        raise ConfigError(f"privacy.dp = {p.dp!r}: allowed: {', '.join(DP_MODES)}")
    checks = [
        ("noise_multiplier", p.noise_multiplier >= 0, ">= 0"),
        ("clip", p.clip > 0, "> 0"),
        ("target_quantile", 0 <= p.target_quantile < 1, "in [0, 1) (0 = fixed clip)"),
        ("clip_lr", p.clip_lr > 0, "> 0"),
        ("clip_count_stddev", p.clip_count_stddev >= 0, ">= 0 (0 = clients_per_round / 20)"),
        ("target_epsilon", p.target_epsilon >= 0, ">= 0 (0 = no budget)"),
        ("delta", 0 < p.delta < 1, "in (0, 1)"),
        ("noise_seed", p.noise_seed >= -1, "-1 (secure noise) or a seed >= 0"),
        ("secagg_degree", p.secagg_degree >= 0, ">= 0 (0 = O(log n), sized for the dropout)"),
        ("secagg_threshold", 0.5 <= p.secagg_threshold < 1, "in [0.5, 1)"),
        ("secagg_modulus_bits", 8 <= p.secagg_modulus_bits <= 64, "between 8 and 64"),
        ("secagg_clip_range", p.secagg_clip_range > 0, "> 0"),
        ("secagg_max_weight", p.secagg_max_weight >= 1, ">= 1"),
        ("secagg_dropout", 0 <= p.secagg_dropout < 1, "in [0, 1)"),
        ("secagg_step_timeout_s", p.secagg_step_timeout_s > 0, "> 0"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"privacy.{key} = {getattr(p, key)!r}: must be {allowed}")
    if p.accountant not in ("rdp", "pld"):
        raise ConfigError(f"privacy.accountant = {p.accountant!r}: allowed: rdp, pld")
    if p.dp == "none":
        for key in ("noise_multiplier", "target_epsilon", "target_quantile"):
            if getattr(p, key):
                raise ConfigError(f"privacy.{key} = {getattr(p, key)!r} has no effect with privacy.dp = 'none' "
                                  "(set privacy.dp = 'central' or 'local')")
    elif not p.noise_multiplier and not p.target_epsilon:
        raise ConfigError(f"privacy.dp = {p.dp!r} needs privacy.noise_multiplier > 0 or privacy.target_epsilon > 0")
    if p.target_quantile and p.dp != "central":
        raise ConfigError("privacy.target_quantile (adaptive clipping) needs privacy.dp = 'central'")


def _unmaskable_codec(name: str, options: dict) -> bool:
    """Whether the codec (or one it wraps) sends what the cohort cannot sum in the field:
    increments of a per-client estimate (EF21, EControl) or zeroth-order scalars (SPSA)."""
    from koinon.compress.base import CODECS

    if name == "spsa" or (name in CODECS and getattr(CODECS.get(name), "decodes_increment", False)):
        return True
    inner = options.get("inner")
    if isinstance(inner, str):
        return _unmaskable_codec(inner, {})
    if isinstance(inner, dict):
        return _unmaskable_codec(str(inner.get("name", "")), inner)
    return False


def _check_secagg(cfg: Config, algorithm: Any) -> None:
    if _unmaskable_codec(cfg.codec.name, cfg.codec.options):
        raise ConfigError(f"codec.name = {cfg.codec.name!r} cannot be masked: its payloads are increments the "
                          "server sums per client (EF21, EControl) or scalars, not an update the cohort can sum; "
                          "use identity, a quantizer (int8, int4, qsgd, fp16, bf16, signsgd), a sparsifier or ef")
    if cfg.aggregator.name != "mean":
        raise ConfigError(f"aggregator.name = {cfg.aggregator.name!r} needs individual updates, which secure "
                          "aggregation hides (the server sees only the sum); use aggregator.name = 'mean'")
    if cfg.attack.name != "none":
        raise ConfigError(f"attack.name = {cfg.attack.name!r}: the simulated adversary forges individual "
                          "updates at the server, which secure aggregation hides")
    if getattr(algorithm, "uploads", ()) or hasattr(algorithm, "decode_update"):
        raise ConfigError(f"client.algorithm = {cfg.client.algorithm!r} uploads more than one model update; "
                          "secure aggregation sums the update only (use fedavg, fedprox or the like)")
    if hasattr(algorithm, "check_update"):
        raise ConfigError(f"client.algorithm = {cfg.client.algorithm!r} has the server check each update, which "
                          "secure aggregation hides (the server sees only the sum)")
    if hasattr(algorithm, "server_delta"):
        raise ConfigError(f"client.algorithm = {cfg.client.algorithm!r} corrects the aggregate at the server "
                          "(server_delta), which the secure-aggregation round does not apply")
    if getattr(algorithm, "needs_rows", False):
        raise ConfigError(f"client.algorithm = {cfg.client.algorithm!r} has the server transform each update "
                          "(FedConv's learnt dilation), which secure aggregation hides; set client.kernels = 'fixed'")


def _check_dp_algorithm(cfg: Config, algorithm: Any) -> None:
    """User-level DP noises the model delta only: refuse algorithms that release more of a
    client (other uploads, their own wire format, per-client rows or downlinks at the server).
    A correction of the released aggregate (FedDyn's `server_delta`) is post-processing: allowed."""
    name, dp = cfg.client.algorithm, cfg.privacy.dp
    why = ""
    if hasattr(algorithm, "decode_update"):
        why = "uploads its update in its own wire format, which is not clipped and noised"
    elif hasattr(algorithm, "server_update_rows"):
        why = "keeps per-client rows at the server, computed from un-noised updates"
    elif getattr(algorithm, "needs_rows", False):
        why = "has the server dilate each un-noised update with kernels learnt from them (client.kernels)"
    elif hasattr(algorithm, "downlink_for"):
        why = "sends each client a downlink built from its un-noised uploads"
    elif getattr(algorithm, "uploads", ()):
        why = f"uploads {', '.join(algorithm.uploads)} besides the model delta, unclipped and un-noised"
    if why:
        raise ConfigError(f"client.algorithm = {name!r} {why}: privacy.dp = {dp!r} noises the model delta only "
                          "(use fedavg, fedprox, feddyn or the like)")


def build_privacy(cfg: Config, num_clients: int, algorithm: Any = None, sizes: torch.Tensor | None = None,
                  model: torch.nn.Module | None = None) -> Privacy | None:
    """The federation's `Privacy` from `cfg.privacy` (None when everything is off). Resolves a
    noise multiplier from `target_epsilon` and records it in `cfg.privacy.noise_multiplier`.
    `sizes` (every client's samples) and `model` are needed by sample-level DP; with it the
    client algorithm to train with is `privacy.sample`."""
    p = cfg.privacy
    _check_keys(p)
    check_privacy(cfg)
    if not _enabled(p):
        return None
    k, rounds = cfg.server.clients_per_round, cfg.server.rounds
    out = Privacy()
    seed = None if p.noise_seed < 0 else p.noise_seed
    if p.dp in ("central", "local"):
        _check_dp_algorithm(cfg, algorithm)
    if p.dp == "central" and (cfg.server.sampler not in ("uniform", "poisson") or cfg.server.sampler_options):
        raise ConfigError(f"privacy.dp = 'central' accounts for a uniformly sampled cohort (amplification by "
                          f"sampling); server.sampler = {cfg.server.sampler!r} (options "
                          f"{cfg.server.sampler_options}) picks clients by other rules: use 'uniform' or 'poisson'")
    if p.dp == "central" and cfg.aggregator.name != "mean":
        raise ConfigError(f"privacy.dp = 'central' is DP-FedAvg, which replaces the mean; aggregator.name = "
                          f"{cfg.aggregator.name!r} is not composed with it (use aggregator.name = 'mean')")
    if p.dp == "sample":
        c = cfg.client
        if c.algorithm != "fedavg" or c.steps:
            raise ConfigError(f"privacy.dp = 'sample' runs its own DP-SGD local loop: it needs client.algorithm = "
                              f"'fedavg' with client.epochs (got {c.algorithm!r}, steps = {c.steps})")
        if sizes is None or model is None:
            raise ConfigError("privacy.dp = 'sample' needs the clients' data sizes and the model")
        if any(True for _ in model.buffers()):
            raise ConfigError(f"privacy.dp = 'sample': model {cfg.model.name!r} has buffers (e.g. BatchNorm), "
                              "whose batch statistics mix samples: per-sample gradients are not defined")
        out.sample = SampleDP(algorithm, p.noise_multiplier, p.clip, sizes.clone(), c.batch_size, c.epochs,
                              p.delta, p.accountant, p.target_epsilon, seed)
        present = sizes[sizes > 0]
        rate = out.sample.rate_and_steps(int(present.min()))[0]
        steps = out.sample.rate_and_steps(int(present.max()))[1] * rounds
    elif p.dp != "none":
        rate, steps = (k / num_clients, rounds) if p.dp == "central" else (1.0, rounds)
    if p.dp != "none":
        if not p.noise_multiplier:
            # Rounded up, so the recorded value (config.toml, a resumed run) stays within budget.
            p.noise_multiplier = math.ceil(calibrate_noise(p.target_epsilon, rate, steps, p.delta, p.accountant)
                                           * 1e6) / 1e6
        elif p.target_epsilon:
            planned = epsilon_for(p.noise_multiplier, rate, steps, p.delta, p.accountant)
            if planned > p.target_epsilon * (1 + 1e-6):
                raise ConfigError(
                    f"privacy.noise_multiplier = {p.noise_multiplier:g} spends epsilon = {planned:.3g} over "
                    f"server.rounds = {rounds}, over privacy.target_epsilon = {p.target_epsilon:g} (raise the "
                    "noise, lower the rounds, or leave noise_multiplier = 0 to calibrate it)")
    if p.dp == "central":
        adaptive = None
        if p.target_quantile:
            stddev = p.clip_count_stddev or k / 20
            try:
                update_noise_multiplier(p.noise_multiplier, stddev)
            except ValueError as exc:
                raise ConfigError(f"privacy.clip_count_stddev: {exc}") from None
            adaptive = AdaptiveClip(p.clip, p.target_quantile, p.clip_lr, stddev)
        # The accountant composes Poisson-subsampled Gaussians (add/remove-one adjacency): every
        # client joins a round independently with probability q, so the cohort's size varies
        # around clients_per_round. A fixed-size cohort accounted as Poisson is only an
        # approximation (and a correct fixed-size account, replace-one, doubles the sensitivity).
        out.sampler = Poisson(k / num_clients)
        out.central = CentralDP(p.noise_multiplier, p.clip, k, Accountant(k / num_clients, p.delta, p.accountant),
                                NoiseSource(seed), p.target_epsilon, adaptive)
    elif p.dp == "local":
        out.local = LocalDP(p.noise_multiplier, p.clip, p.delta, p.accountant, p.target_epsilon, seed)
    elif out.sample is not None:
        out.sample.noise_multiplier = p.noise_multiplier  # as calibrated
    if p.secagg:
        _check_secagg(cfg, algorithm)
        try:
            # A Poisson cohort (central DP's, or server.sampler = 'poisson') has no fixed size: the
            # sum is sized for every client.
            poisson = p.dp == "central" or cfg.server.sampler == "poisson"
            fp = FixedPoint(p.secagg_modulus_bits, p.secagg_clip_range,
                            1 if p.dp == "central" else p.secagg_max_weight, num_clients if poisson else k)
        except ValueError as exc:
            raise ConfigError(f"privacy.secagg_modulus_bits = {p.secagg_modulus_bits}: {exc}") from None
        out.secure = SecureAggregation(fp, p.secagg_degree, p.secagg_threshold, p.secagg_dropout, cfg.seed,
                                       consistency=p.secagg_consistency)
        if p.dp == "central" and model is not None:
            length = sum(t.numel() for t in model.state_dict().values())  # at least the update's length
            try:
                out.secure.encoded_clip(p.clip, length)
            except ValueError as exc:
                raise ConfigError(f"privacy.clip = {p.clip:g} with privacy.secagg_modulus_bits = "
                                  f"{p.secagg_modulus_bits}: {exc}") from None
    return out
