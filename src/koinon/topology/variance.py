"""The Vanishing Variance correction for decentralized averaging (https://arxiv.org/abs/2404.04616).

Averaging models shrinks the element variance of each layer (independent initializations and
drifts cancel), which slows training after many gossip steps. After each mixing step every node
rescales each of its layers to the variance its inputs had: `correct_mixed_variance` computes
that target over a node's closed neighbourhood and applies `correct_variance`.
"""

from __future__ import annotations

import torch

from koinon.params import Layout

VARIANCE_EPS = 1e-4  # the epsilon of the Vanishing Variance correction


def layer_variances(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Variance of each layer's elements, per row: `[N, P] -> [N, L]` (L = layout entries)."""
    return torch.stack(
        [x[:, e.offset : e.offset + e.numel].var(dim=1, unbiased=False) for e in layout.entries], dim=1
    )


def correct_variance(
    mixed: torch.Tensor, target: torch.Tensor, layout: Layout, eps: float = VARIANCE_EPS
) -> torch.Tensor:
    """Vanishing Variance correction (https://arxiv.org/abs/2404.04616), per row and layer.

    Each layer `w` of each row becomes `(w - mean(w)) * sqrt((v* + eps) / (var(w) + eps)) + mean(w)`
    with `v* = target[row, layer]`: the layer keeps its mean and gets (for eps -> 0) variance
    v*. Scalar layers (one element) and buffers are left alone.
    """
    out = mixed.clone()
    for k, e in enumerate(layout.entries):
        if e.numel < 2 or not e.trainable:  # scalars and buffers (running statistics) stay
            continue
        w = mixed[:, e.offset : e.offset + e.numel]
        mean = w.mean(dim=1, keepdim=True)
        var = w.var(dim=1, unbiased=False, keepdim=True)
        scale = ((target[:, k : k + 1] + eps) / (var + eps)).sqrt()
        out[:, e.offset : e.offset + e.numel] = (w - mean) * scale + mean
    return out


def correct_mixed_variance(
    stack: torch.Tensor, own: torch.Tensor, public: torch.Tensor, w: torch.Tensor,
    live_ids: list[int], layout: Layout,
) -> None:
    """Rescale each live node's mixed layers (rows of `stack`, in place) to the mean layer
    variance of the models it mixed.

    v*[i, l] is the mean, over node i's closed live neighbourhood, of the element variance
    of layer l in the models i received (its own exact model `own`, its neighbours' public
    copies): averaging shrinks the weights' variance, the correction restores it.
    """
    index = w.indices()
    off = index[0] != index[1]
    adjacency = torch.sparse_coo_tensor(
        index[:, off], torch.ones(int(off.sum())), w.shape, check_invariants=True
    ).coalesce()
    count = torch.sparse.sum(adjacency, dim=1).to_dense().unsqueeze(1) if off.any() else 0.0
    target = (torch.sparse.mm(adjacency, layer_variances(public, layout))
              + layer_variances(own, layout)) / (1.0 + count)
    rows = torch.tensor(live_ids)
    stack[rows] = correct_variance(stack[rows], target[rows], layout)
