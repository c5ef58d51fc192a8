"""Fréchet distances through torchmetrics' `FrechetInceptionDistance` (DESIGN §7).

The Fréchet distance between Gaussians fitted to features of real (r) and generated (g) images (Heusel et al.
2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium"):

    FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})

with sample means mu and unbiased (N - 1) covariances S.

- `frechet_distance`: any feature network (an ``nn.Module`` with an int ``num_features`` mapping [0, 1] images
  to (N, num_features) features). The digits benchmark uses its shipped feature net: "FD".
- `inception_fid`: real FID with InceptionV3 weights from a local file (config key ``eval.fid.inception_weights``);
  nothing is downloaded. Needs torch-fidelity, which torchmetrics uses for the InceptionV3 definition.

How torchmetrics 1.9 treats the inputs (torchmetrics/image/fid.py): with a custom module and ``normalize=True``,
``update`` passes the images to the module unchanged (the ``(imgs * 255).byte()`` cast is applied only to the
built-in Inception); feature sums and covariance sums are accumulated in float64 whatever the features' dtype,
and ``compute`` returns the result cast to the features' dtype. With ``feature=int`` torchmetrics builds
``NoTrainInceptionV3``, a torch-fidelity ``FeatureExtractorInceptionV3`` that ``torch.load``s
``feature_extractor_weights_path`` (a state_dict: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``),
takes uint8 images, resizes them to 299 x 299 itself and returns the requested layer's features. We pass
``antialias=False``: torchmetrics' default (True) resizes with an anti-aliased bilinear filter instead of
torch-fidelity's TF1-style bilinear one, the standard FID's (same weights and images: 629510 against 885793).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

INCEPTION_CONFIG_KEY = "eval.fid.inception_weights"
INCEPTION_FEATURES = (64, 192, 768, 2048)


class _FeatureAdapter(nn.Module):
    """What torchmetrics calls: runs the caller's feature net on the [0, 1] images as given, returns float64.

    The net is deliberately kept out of the module tree (not a registered submodule): the metric's
    ``set_dtype(torch.float64)`` and ``.to()`` act on registered submodules, and converting the caller's (often
    shared, e.g. the benchmark's cached) feature net to float64 in place would be a silent side effect. The
    features are cast to float64, so torchmetrics computes and returns the distance in float64.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        num = getattr(net, "num_features", None)
        if isinstance(num, torch.Tensor) and num.numel() == 1:
            num = int(num.item())
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"feature_net ({type(net).__name__}) needs a positive int attribute `num_features` "
                             f"(the width of its (N, num_features) output); got {num!r}")
        self.num_features = num
        object.__setattr__(self, "_net", net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self._net(x)
        if feats.dim() != 2 or feats.shape[1] != self.num_features:
            raise ValueError(f"feature_net returned shape {tuple(feats.shape)}, expected (N, {self.num_features})")
        return feats.double()


def _fid_module():
    # Looked up at call time (not `from ... import`) so tests can monkeypatch the torch-fidelity pieces.
    import torchmetrics.image.fid as tm_fid
    return tm_fid


def check_inception_weights(inception_weights: str | Path) -> Path:
    """The weights file, with torch-fidelity there to read it: checked when a run is built, not after training."""
    path = Path(inception_weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"InceptionV3 weights file not found: {path}. Set {INCEPTION_CONFIG_KEY} to a local copy of "
            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (nothing is downloaded).")
    if not _fid_module()._TORCH_FIDELITY_AVAILABLE:
        raise ImportError("Inception FID needs torch-fidelity (torchmetrics' InceptionV3): "
                          "pip install torch-fidelity   (or: pip install 'torchmetrics[image]')")
    return path


def build_fid_metric(feature_net: nn.Module | None = None, inception_weights: str | Path | None = None, *,
                     inception_feature: int = 2048, dtype: torch.dtype | None = torch.float64,
                     reset_real_features: bool = True):
    """A fresh torchmetrics ``FrechetInceptionDistance`` taking float images in [0, 1] (``normalize=True``).

    Exactly one of:
    - ``feature_net``: any module with an int ``num_features`` (see `_FeatureAdapter`); it sees the images
      unchanged and is not modified.
    - ``inception_weights``: path to a local InceptionV3 state_dict (torch-fidelity's FID weights); features from
      layer ``inception_feature`` (64, 192, 768 or 2048 = standard FID). Raises FileNotFoundError if the file is
      missing and ImportError if torch-fidelity is not installed.

    ``dtype`` goes to ``metric.set_dtype`` (torchmetrics' advice: float64, as FID is numerically touchy). With a
    feature net it only affects the metric's states; with Inception it also runs the network in that dtype (about
    2x slower on CPU than float32; pass ``dtype=None`` to keep float32 there).
    """
    tm_fid = _fid_module()
    if (feature_net is None) == (inception_weights is None or inception_weights == ""):
        raise ValueError("build_fid_metric needs exactly one of feature_net=<module with num_features> or "
                         f"inception_weights=<local file> (config key {INCEPTION_CONFIG_KEY})")
    if feature_net is not None:
        metric = tm_fid.FrechetInceptionDistance(feature=_FeatureAdapter(feature_net), normalize=True)
    else:
        if int(inception_feature) not in INCEPTION_FEATURES:
            raise ValueError(f"inception_feature must be one of {INCEPTION_FEATURES}, got {inception_feature}")
        path = check_inception_weights(inception_weights)
        metric = tm_fid.FrechetInceptionDistance(feature=int(inception_feature), normalize=True,
                                                 feature_extractor_weights_path=str(path), antialias=False,
                                                 reset_real_features=reset_real_features)
    if dtype is not None and hasattr(metric, "set_dtype"):
        metric.set_dtype(dtype)
    return metric


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name} images must be a float N x C x H x W tensor, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 {name} images (a covariance), got {x.shape[0]}")
    finite = x[torch.isfinite(x)]
    if finite.numel() and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
        raise ValueError(f"{name} images must lie in [0, 1], got range [{float(finite.min()):.3g}, "
                         f"{float(finite.max()):.3g}] (map [-1, 1] model outputs with (x + 1) / 2 first)")


def _check_inception_images(x: torch.Tensor, name: str) -> None:
    _check_images(x, name)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"Inception FID takes 1- or 3-channel images, got {x.shape[1]} channels")


def _nan_fd(num_real: int, num_fake: int) -> dict:
    warnings.warn("non-finite pixels in the images: Fréchet distance reported as nan", RuntimeWarning, stacklevel=4)
    return {"fd": math.nan, "num_real": int(num_real), "num_fake": int(num_fake)}


def _nan_result(real, fake) -> dict | None:
    """A diverged generator gives nan/inf pixels: report fd = nan (the honest value) instead of crashing a run."""
    if torch.isfinite(real).all() and torch.isfinite(fake).all():
        return None
    return _nan_fd(real.shape[0], fake.shape[0])


def _run(metric, real, fake, batch_size: int, prep) -> dict:
    with torch.no_grad():
        for flag, images in ((True, real), (False, fake)):
            for chunk in images.split(int(batch_size)):
                metric.update(prep(chunk), real=flag)
        fd = float(metric.compute())
    return {"fd": fd, "num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, feature_net: nn.Module, batch_size: int = 500) -> dict:
    """Fréchet distance between feature Gaussians of ``real`` and ``fake`` (float N x C x H x W in [0, 1]).

    ``feature_net`` receives the images unchanged (moved to its device and parameter dtype), in eval mode (its
    training flag is restored afterwards), under no_grad, ``batch_size`` images at a time; the statistics and the
    distance are float64. Returns ``{"fd": float, "num_real": int, "num_fake": int}``; fd is nan (with a warning)
    if any pixel is non-finite. Raises ValueError for fewer than 2 images per side or values outside [0, 1].
    Note the estimate is biased upward at small N; compare FDs computed with the same sample counts.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    bad = _nan_result(real, fake)
    if bad is not None:
        return bad
    metric = build_fid_metric(feature_net=feature_net)
    param = next(iter(feature_net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    metric.to(device)
    was_training = feature_net.training
    feature_net.eval()
    try:
        return _run(metric, real, fake, batch_size, lambda x: x.to(device=device, dtype=dtype))
    finally:
        feature_net.train(was_training)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, weights_path: str | Path, batch_size: int = 50, *,
                  inception_feature: int = 2048, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = torch.float64) -> dict:
    """FID with InceptionV3 weights from the local file ``weights_path`` (config ``eval.fid.inception_weights``).

    Images: float N x C x H x W in [0, 1], C = 1 (repeated to RGB) or 3, any size: torchmetrics quantises them to
    uint8 (``(x * 255).byte()``, its ``normalize=True`` convention, so numbers match other torchmetrics FIDs) and
    Inception resizes to 299 x 299. Slow on CPU (~0.2 s per image in float32). Same return value and checks as
    `frechet_distance`; FileNotFoundError for a missing weights file, ImportError without torch-fidelity.
    """
    return InceptionReference(weights_path, lambda: real, batch_size, inception_feature=inception_feature,
                              device=device, dtype=dtype)(fake)


def _inception_prep(device):
    def prep(x):
        # clamp: values a hair outside [0, 1] would wrap around in torchmetrics' uint8 cast
        x = x.to(device=device, dtype=torch.float32).clamp(0, 1)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return prep


class InceptionReference:
    """Inception FID of sample sets against one fixed set of reference images, whose features are computed at the
    first call only: a run's evaluations all compare with the same images (the 1797 digits, or a text-to-image
    run's decoded real latents), which went through Inception (~0.2 s per image on the CPU) at every evaluation.
    `reference()` makes the images when first needed. The same numbers as `inception_fid` on the same images."""

    def __init__(self, weights_path: str | Path, reference, batch_size: int = 50, *, inception_feature: int = 2048,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = torch.float64):
        self.weights_path, self.reference, self.batch_size = weights_path, reference, int(batch_size)
        self.inception_feature, self.dtype = inception_feature, dtype
        self.device = torch.device(device or "cpu")
        self.metric, self.num_real = None, 0

    def __call__(self, fake: torch.Tensor) -> dict:
        _check_inception_images(fake, "fake")
        prep = _inception_prep(self.device)
        if self.metric is None:
            real = self.reference()
            _check_inception_images(real, "real")
            bad = _nan_result(real, fake)
            if bad is not None:   # nothing kept: a later call reads the reference again
                return bad
            metric = build_fid_metric(inception_weights=self.weights_path, inception_feature=self.inception_feature,
                                      dtype=self.dtype, reset_real_features=False).to(self.device)
            with torch.no_grad():
                for chunk in real.split(self.batch_size):
                    metric.update(prep(chunk), real=True)
            self.metric, self.num_real = metric, int(real.shape[0])
        elif not torch.isfinite(fake).all():
            return _nan_fd(self.num_real, fake.shape[0])
        self.metric.reset()   # the generated set's sums only: reset_real_features=False keeps the reference's
        with torch.no_grad():
            for chunk in fake.split(self.batch_size):
                self.metric.update(prep(chunk), real=False)
            fd = float(self.metric.compute())
        return {"fd": fd, "num_real": self.num_real, "num_fake": int(fake.shape[0])}


__all__ = ["build_fid_metric", "frechet_distance", "inception_fid", "InceptionReference", "INCEPTION_CONFIG_KEY"]
