"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes; shipped with scikit-learn, no download)."""
from __future__ import annotations

import torch


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """Images N x 1 x 8 x 8 scaled from 0..16 to [-1, 1] (float32) and labels (int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.tensor(d.target, dtype=torch.int64)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) / 2).clamp(0, 1)


def from_unit(images01: torch.Tensor) -> torch.Tensor:
    return images01 * 2 - 1


def split_indices(n: int, held_out: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic train / held-out split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * held_out)
    return perm[k:], perm[:k]
