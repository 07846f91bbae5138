"""SADE's test-time aggregation: weight the experts by self-supervision on unlabeled test data.

"Self-supervised Aggregation of Diverse Experts" (SADE, Zhang et al., NeurIPS 2022) adapts
the weights of a fixed set of experts to an unknown test distribution without labels: it
maximizes the *stability* of the aggregated prediction under two augmented views of the same
unlabeled test inputs (the cosine similarity of the two predictions), which the paper shows
favours the experts that suit the test distribution. Here the experts are the owners' (and
the public) experts of a mixture, and the learned weights replace the per-input router for a
batch that comes from one target domain (`Mixture.fixed`); opting owners out still applies.
SADE was made for test-time *label* shift; under feature shift a stable expert can be a wrong
one (an expert of another domain that is confidently, consistently wrong), which the
benchmark shows on the inverted-contrast domain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sade_weights(probs_a: torch.Tensor, probs_b: torch.Tensor, included: torch.Tensor | None = None,
                 steps: int = 100, lr: float = 10.0) -> torch.Tensor:
    """Expert weights `[E]` (a softmax, zero on excluded experts) that maximize the mean cosine
    similarity between the aggregated predictions of two views, given each expert's
    probabilities on them (`[E, N, C]` each). Gradient ascent from uniform weights; the
    cosine's gradients are small, hence the large default step."""
    if probs_a.shape != probs_b.shape or probs_a.dim() != 3:
        raise ValueError(f"expected two [experts, samples, classes] tensors, got {list(probs_a.shape)} "
                         f"and {list(probs_b.shape)}")
    if steps < 1 or lr <= 0:
        raise ValueError("sade needs steps >= 1 and lr > 0")
    e = probs_a.shape[0]
    mask = torch.ones(e, dtype=torch.bool) if included is None else included
    logits = torch.zeros(e, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=lr)
    for _ in range(steps):
        w = logits.masked_fill(~mask, float("-inf")).softmax(dim=0)
        a = torch.einsum("e,enc->nc", w, probs_a)
        b = torch.einsum("e,enc->nc", w, probs_b)
        loss = -F.cosine_similarity(a, b, dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits.detach().masked_fill(~mask, float("-inf")).softmax(dim=0)
