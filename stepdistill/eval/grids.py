"""Figures people would rather look at than read: image grids and GMM scatter plots over the mixture density.

Both write PNGs, create the parent directories and return the path as a string. Matplotlib is used through
``matplotlib.figure.Figure`` (rendered by the Agg canvas) rather than pyplot, so no global backend is switched and
no figure is left open, also inside notebooks or training loops.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

SEPARATOR = 0.5  # grey 1-px lines: visible against both black and white backgrounds


def save_image_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 4) -> str:
    """Tile ``images`` (float N x C x H x W in [0, 1], C = 1 or 3) into one PNG at ``path``.

    ``nrow`` images per row (default ceil(sqrt(N)), at most N). Each image is upscaled ``scale`` times with
    nearest-neighbour (so 8 x 8 digits stay crisp pixels), and tiles are separated and framed by 1-px grey lines:
    the PNG is ``nrow * (W*scale + 1) + 1`` pixels wide and ``rows * (H*scale + 1) + 1`` high. Values are clamped to
    [0, 1]; nan shows as black. 1-channel images give a greyscale PNG, 3-channel an RGB one.
    """
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"save_image_grid needs N x C x H x W images with N >= 1 and C in (1, 3), "
                         f"got {tuple(images.shape)}")
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    x = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0).clamp(0, 1)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest-neighbour upscale
    n, c, h, w = x.shape
    nrow = max(1, min(int(nrow or math.ceil(math.sqrt(n))), n))
    rows = math.ceil(n / nrow)
    canvas = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), SEPARATOR)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = 1 + r * (h + 1), 1 + q * (w + 1)
        canvas[:, top:top + h, left:left + w] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)  # uint8 H x W -> "L", H x W x 3 -> "RGB"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return str(path)


def teacher_above_student(teacher: torch.Tensor, student: torch.Tensor, nrow: int) -> torch.Tensor:
    """The tiles of a teacher-over-student grid of `nrow` columns: the teacher's rows (the last filled out with
    grey), one grey row, the student's rows, so student tile i sits under teacher tile i (same noise and cond).
    The grey row alone wrapped across two rows when the count was not a multiple of `nrow`."""
    grey = torch.full_like(teacher[:1], 0.5)
    pad = -teacher.shape[0] % nrow + nrow
    return torch.cat([teacher, grey.expand(pad, *teacher.shape[1:]), student])


def _plot_extent(mixture, clouds: list[torch.Tensor], reach: float | None = None) -> tuple[float, float, float, float]:
    """Box holding every mean +- 4 std and the central 99% of each sample cloud (outliers don't squash the plot).
    `reach`: the box grows past the mixture's own by at most that many of its widths on each side, so one
    diverged cloud in a comparison does not shrink every other panel to a dot."""
    lo = (mixture.means - 4 * mixture.stds[:, None]).min(0).values
    hi = (mixture.means + 4 * mixture.stds[:, None]).max(0).values
    own_lo, own_hi = lo, hi
    for p in clouds:
        if p.shape[0]:
            lo = torch.minimum(lo, torch.quantile(p, 0.005, dim=0))
            hi = torch.maximum(hi, torch.quantile(p, 0.995, dim=0))
    if reach is not None:
        width = own_hi - own_lo
        lo, hi = torch.maximum(lo, own_lo - reach * width), torch.minimum(hi, own_hi + reach * width)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if lo.numel() == 1:   # a 1-D mixture: no second axis
        return float(lo[0]), float(hi[0]), 0.0, 0.0
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def _density_grid(mixture, extent, grid: int):
    x0, x1, y0, y1 = extent
    gx = torch.linspace(x0, x1, grid, dtype=torch.float64)
    gy = torch.linspace(y0, y1, grid, dtype=torch.float64)
    xx, yy = torch.meshgrid(gx, gy, indexing="xy")
    logp = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(grid, grid)
    return xx, yy, logp.clamp(min=float(logp.max()) - 12.0)


def _plane(mixture):
    """The mixture the figure draws, and a note for the titles. Above 2 dimensions: its exact marginal on the first
    two coordinates (an isotropic mixture's marginal is the mixture of its components' marginals), over which the
    samples' first two coordinates are scattered. A 1-D mixture is drawn as a density curve instead."""
    d = mixture.means.shape[1]
    if d <= 2:
        return mixture, ""
    from ..networks.gmm import GaussianMixture
    return GaussianMixture(mixture.means[:, :2], mixture.stds, mixture.weights), f" [x1, x2 of {d}-D]"


def _finite_points(name: str, p: torch.Tensor, dim: int = 2) -> tuple[torch.Tensor, int]:
    p = p.detach().to("cpu", torch.float64)
    if p.dim() != 2 or p.shape[1] != dim:
        raise ValueError(f"{name} samples must be (N, {dim}), got {tuple(p.shape)}")
    ok = torch.isfinite(p).all(dim=1)
    return p[ok][:, :2], int((~ok).sum())


def _draw_panel(ax, mixture, points: torch.Tensor, n_bad: int, extent, title: str, grid: int) -> None:
    if mixture.means.shape[1] == 1:
        return _draw_line_panel(ax, mixture, points, n_bad, extent, title, grid)
    xx, yy, logp = _density_grid(mixture, extent, grid)
    ax.contourf(xx.numpy(), yy.numpy(), logp.numpy(), levels=24, cmap="Blues")
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=2, c="crimson", alpha=0.5, linewidths=0)
    if n_bad:
        title += f" ({n_bad} non-finite dropped)"
    outside = _count_outside(points, extent)
    if outside:
        title += f"\n({outside} of {points.shape[0]} outside the view)"
    ax.set(xlim=extent[:2], ylim=extent[2:], aspect="equal", title=title)


def _draw_line_panel(ax, mixture, points: torch.Tensor, n_bad: int, extent, title: str, grid: int) -> None:
    """A 1-D mixture: the samples' histogram over the mixture's density."""
    x0, x1 = extent[:2]
    xs = torch.linspace(x0, x1, 4 * grid, dtype=torch.float64)
    ax.plot(xs.numpy(), mixture.log_prob(xs[:, None]).exp().numpy(), color="tab:blue")
    inside = points[(points[:, 0] >= x0) & (points[:, 0] <= x1), 0]
    ax.hist(inside.numpy(), bins=min(grid, 120), range=(x0, x1), density=True, color="crimson", alpha=0.5)
    if n_bad:
        title += f" ({n_bad} non-finite dropped)"
    if inside.numel() < points.shape[0]:
        title += f"\n({points.shape[0] - inside.numel()} of {points.shape[0]} outside the view)"
    ax.set(xlim=(x0, x1), title=title)


def _count_outside(points: torch.Tensor, extent) -> int:
    x0, x1, y0, y1 = extent
    inside = (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)
    return int((~inside).sum())


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=80)
    return str(path)


def save_gmm_scatter(path, student: torch.Tensor, mixture, teacher: torch.Tensor | None = None,
                     title: str | None = None, grid: int = 160) -> str:
    """Scatter 2-D samples over the mixture's log-density (filled contours) and save a PNG at ``path``. A mixture of
    more dimensions is drawn on its first two coordinates (over its exact marginal there); a 1-D one as a histogram
    of the samples over its density curve.

    One panel (student), or teacher and student side by side on the same axes when ``teacher`` is given. The
    density grid spans the data's extent (`_plot_extent`); the colour scale is floored 12 nats below the peak so
    the tails don't wash out the modes. Non-finite samples are dropped from the plot (their count is shown in the
    panel title). Figure: 4.5 x 4.5 inches per panel at 80 dpi.
    """
    from matplotlib.figure import Figure

    dim = mixture.means.shape[1]
    mixture, note = _plane(mixture)
    panels = [("teacher", teacher), ("student", student)] if teacher is not None else [("student", student)]
    clean = [(name, *_finite_points(name, p, dim)) for name, p in panels]
    extent = _plot_extent(mixture, [p for _, p, _ in clean])
    fig = Figure(figsize=(4.5 * len(clean), 4.5), dpi=80, layout="constrained")
    axes = fig.subplots(1, len(clean), squeeze=False)[0]
    for ax, (name, p, n_bad) in zip(axes, clean):
        _draw_panel(ax, mixture, p, n_bad, extent, (f"{title}: {name}" if title else name) + note, grid)
    return _save(fig, path)


def save_gmm_scatter_grid(path, rows: list[list[tuple[str, torch.Tensor]]], mixtures: list, grid: int = 120,
                          size: float = 3.2, row_labels: list[str] | None = None) -> str:
    """A figure of scatter panels: row r holds (title, samples) pairs drawn over ``mixtures[r]``'s density, all
    panels of a row on the same axes (a comparison of methods per benchmark), labelled ``row_labels[r]`` on the
    left. Rows may differ in length. The axes reach at most one mixture width past the mixture on each side; a
    panel's title counts its samples outside them."""
    from matplotlib.figure import Figure

    if len(rows) != len(mixtures) or not rows:
        raise ValueError(f"give one mixture per row: {len(rows)} rows, {len(mixtures)} mixtures")
    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(size * ncols, size * len(rows)), dpi=80, layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (row, mixture) in enumerate(zip(rows, mixtures)):
        dim = mixture.means.shape[1]
        mixture, note = _plane(mixture)
        clean = [(title, *_finite_points(title, p, dim)) for title, p in row]
        extent = _plot_extent(mixture, [p for _, p, _ in clean], reach=1.0)
        for c in range(ncols):
            if c < len(clean):
                _draw_panel(axes[r][c], mixture, clean[c][1], clean[c][2], extent, clean[c][0] + note, grid)
            else:
                axes[r][c].set_axis_off()
        if row_labels:
            axes[r][0].set_ylabel(row_labels[r], fontsize="large")
    return _save(fig, path)


__all__ = ["save_image_grid", "save_gmm_scatter", "save_gmm_scatter_grid", "teacher_above_student"]
