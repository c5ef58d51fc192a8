"""Fréchet distances through torchmetrics' FrechetInceptionDistance.

`frechet_distance` uses any feature network with a `num_features` attribute (the digits benchmark's shipped
one: "FD"); `inception_fid` is real FID with InceptionV3 weights from a local file (no download).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class _Features(nn.Module):
    """Adapter so torchmetrics calls the feature net on the [0, 1] floats unchanged."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_features = int(net.num_features)

    def forward(self, x):
        return self.net(x.float())


def build_fid_metric(feature_net: nn.Module | None = None, inception_weights: str | None = None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_net is not None:
        metric = FrechetInceptionDistance(feature=_Features(feature_net), normalize=True)
    else:
        if not inception_weights:
            raise ValueError("FID needs a feature network or eval.fid.inception_weights=PATH (local weights)")
        if not Path(inception_weights).is_file():
            raise FileNotFoundError(f"Inception weights {inception_weights} not found: set eval.fid.inception_weights "
                                    "to a local FID InceptionV3 weights file")
        metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                          feature_extractor_weights_path=str(inception_weights))
    metric.set_dtype(torch.float64)
    return metric


def _fd(metric, real, fake, batch_size: int) -> dict:
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError("a Fréchet distance needs at least 2 real and 2 generated samples")
    with torch.no_grad():
        for i in range(0, real.shape[0], batch_size):
            metric.update(real[i:i + batch_size], real=True)
        for i in range(0, fake.shape[0], batch_size):
            metric.update(fake[i:i + batch_size], real=False)
        return {"fd": float(metric.compute()), "num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature_net: nn.Module, batch_size: int = 500) -> dict:
    """Images in [0, 1], N x C x H x W."""
    return _fd(build_fid_metric(feature_net=feature_net), real.float(), fake.float(), batch_size)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str, batch_size: int = 100) -> dict:
    rep = (lambda x: x.repeat(1, 3, 1, 1)) if real.shape[1] == 1 else (lambda x: x)
    return _fd(build_fid_metric(inception_weights=weights_path), rep(real.float()), rep(fake.float()), batch_size)
