"""Pictures people would rather look at than read: image grids (PNG) and GMM scatter plots over the density."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def save_image_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 4) -> str:
    """images: N x C x H x W in [0, 1]; nearest-neighbour upscaling keeps 8x8 digits crisp; 1-px separators."""
    from PIL import Image

    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def save_gmm_scatter(path, student: torch.Tensor, mixture, teacher: torch.Tensor | None = None, title=None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in (teacher, student) if p is not None]
    lim = float(max(mixture.means.abs().max() + 4 * mixture.stds.max(), *(p.abs().quantile(0.99) for p in pts)))
    g = torch.linspace(-lim, lim, 160)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    logp = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(160, 160).clamp(min=-15)
    panels = [("teacher", teacher), ("student", student)] if teacher is not None else [("student", student)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, p) in zip(axes[0], panels):
        ax.contourf(xx.numpy(), yy.numpy(), logp.numpy(), levels=25, cmap="Blues")
        p = p.detach().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1.5, c="crimson", alpha=0.5)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=f"{title + ': ' if title else ''}{name}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
