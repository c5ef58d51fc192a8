"""Improved precision and recall (Kynkäänniemi et al. 2019) between two sets of feature vectors.

Each set spans a manifold: the union of balls around its points, each ball reaching the point's k-th nearest
neighbour in the same set (the point itself not counted; the paper's k = 3). Precision is the share of generated
points inside the real manifold (how many samples look real); recall is the share of real points inside the
generated manifold (how much of the data the samples cover). A Fréchet distance mixes the two; a student that
collapses onto class prototypes keeps a high precision and loses recall.

Both depend on the set sizes (a bigger set spans tighter balls), so compare values computed with the same counts;
each result records them.
"""
from __future__ import annotations

import torch


def _distance_blocks(a: torch.Tensor, b: torch.Tensor, block: int = 1024):
    """Euclidean distances from `a` to `b`, a block of `a`'s rows at a time (never the whole matrix)."""
    for i in range(0, a.shape[0], block):
        yield torch.cdist(a[i:i + block], b)


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour among the others."""
    if points.shape[0] <= k:
        raise ValueError(f"a manifold with k={k} needs more than {k} points, got {points.shape[0]}")
    # the point itself is the smallest (0); a duplicate of it counts as a neighbour at distance 0
    return torch.cat([d.kthvalue(k + 1, dim=1).values for d in _distance_blocks(points, points)])


def coverage_of(manifold: torch.Tensor, queries: torch.Tensor, k: int) -> float:
    """Share of `queries` inside the union of the balls around `manifold`'s points (radius: k-NN in `manifold`)."""
    radii = knn_radii(manifold, k)
    inside = torch.cat([(d <= radii).any(dim=1) for d in _distance_blocks(queries, manifold)])
    return float(inside.double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """`real`, `fake`: (N, D) features. Returns precision, recall and the counts behind them."""
    real, fake = (x.reshape(x.shape[0], -1).double().cpu() for x in (real, fake))
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real.shape[1]} vs {fake.shape[1]}")
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        nan = float("nan")
        return {"precision": nan, "recall": nan, "num_real": real.shape[0], "num_fake": fake.shape[0], "k": k}
    return {"precision": coverage_of(real, fake, k), "recall": coverage_of(fake, real, k),
            "num_real": real.shape[0], "num_fake": fake.shape[0], "k": k}
