"""FLTrust: the server trusts its own update, computed on a small clean root dataset.

Cao et al., FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping (NDSS 2021),
https://arxiv.org/abs/2012.13995. The server computes that reference update itself, so the
caller passes it with `set_reference` before each `aggregate`. In a `Federation` the server sets
aside `root_samples` clean training examples and computes that update every round
(`koinon.server.root`).
"""

from __future__ import annotations

import torch

from koinon.aggregate import kernels
from koinon.aggregate.base import AGGREGATORS, check_stack


@AGGREGATORS.register("fltrust")
class FLTrust:
    """FLTrust: weight inputs by ReLU(cosine) to the server's root-data update, rescaled to it.

    Tolerates any number of Byzantine inputs as long as the root dataset is clean (so it takes
    no f). Call `set_reference(update)` with the server's update of the round before
    `aggregate`; without one, `aggregate` raises. If no input has positive cosine similarity
    the output is zero. https://arxiv.org/abs/2012.13995

    Read by the federation that computes the reference: `root_samples`, the size of the
    server's root dataset (the paper uses 100), and `root_steps`, the server's local SGD steps
    on it (0: the clients' own local steps or epochs, as in the paper). The output has the
    reference's norm, so more server steps also mean larger global steps.
    """

    name = "fltrust"

    def __init__(self, root_samples: int = 100, root_steps: int = 0) -> None:
        if isinstance(root_samples, bool) or not isinstance(root_samples, int) or root_samples < 1:
            raise ValueError(f"root_samples must be an integer >= 1 (the server's clean examples), got {root_samples!r}")
        if isinstance(root_steps, bool) or not isinstance(root_steps, int) or root_steps < 0:
            raise ValueError(f"root_steps must be an integer >= 0 (0 = the clients' local steps), got {root_steps!r}")
        self.root_samples = root_samples
        self.root_steps = root_steps
        self.reference: torch.Tensor | None = None

    def set_reference(self, update: torch.Tensor) -> None:
        """The server's own update on its root dataset for this round (`[P]`)."""
        self.reference = update.detach()

    def aggregate(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        check_stack(updates, weights)
        ref = self.reference
        if ref is None:
            raise ValueError("fltrust: call set_reference(server_update) before aggregate")
        if ref.shape != updates.shape[1:]:
            raise ValueError(
                f"fltrust: reference has shape {tuple(ref.shape)}, updates {tuple(updates.shape[1:])}"
            )
        ref_norm = torch.linalg.vector_norm(ref, dtype=torch.float64)
        norms = kernels.row_sq_norms(updates).sqrt().clamp_min(1e-300)
        cosine = (updates @ ref).double() / (norms * ref_norm.clamp_min(1e-300))
        trust = cosine.clamp_min(0)
        if float(trust.sum()) == 0.0:
            self.coefficients = torch.zeros_like(trust)
            return torch.zeros_like(updates[0])
        coefficients = trust * (ref_norm / norms) / trust.sum()
        self.coefficients = coefficients
        return kernels.combine(coefficients, updates)
