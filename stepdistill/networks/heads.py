"""GAN classifier heads read off the fake-score network's bottleneck (DMD2 §4.3, "the classifier shares the
fake diffusion model's encoder"), and the forward hook that taps those features without touching the backbone.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def find_feature_module(net: nn.Module, name: str | None = None) -> nn.Module:
    """The bottleneck module: `name` if given, else a diffusers UNet's `mid_block` or a TimeMLP's `mid`."""
    for candidate in ([name] if name else ["mid_block", "mid"]):
        mod = net
        try:
            for part in candidate.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"cannot find the bottleneck module {name or 'mid_block/mid'} in {type(net).__name__}: "
                     "set method.gan.feature_module to the name of a submodule")


class _StopForward(Exception):
    pass


def _sharded(net: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(net, FSDPModule)   # trainer=fsdp shards every backbone as a whole


def features_of(module: nn.Module, net: nn.Module, fn, *args, **kwargs) -> torch.Tensor:
    """The output of `module` (inside `net`) when `fn(*args)` runs `net`: the forward is cut right after it.

    A network sharded with FSDP (trainer=fsdp) runs in full instead, and its output stays in the graph with
    weight 0: FSDP gathers the weights for backward from hooks on the network's output, so features that
    bypass it would reach weights already freed, and a cut forward would skip FSDP's post-forward resharding."""
    if not _sharded(net):
        with tap_features(module) as tap:
            return tap["run"](fn, *args, **kwargs)
    with tap_features(module, stop=False) as tap:
        out = fn(*args, **kwargs)
    return tap["features"] + 0.0 * out.sum()


@contextmanager
def tap_features(module: nn.Module, stop: bool = True):
    """Records the module's forward output in ``store['features']`` while the context is open.

    With ``stop=True`` the backbone's forward is cut right after the tapped module (a classifier needs only
    the encoder, so the decoder half of the UNet is never run): call the backbone inside ``store.run(fn)``.
    """
    store: dict = {}

    def hook(_mod, _inp, out):
        store["features"] = out[0] if isinstance(out, tuple) else out
        if stop:
            raise _StopForward

    def run(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except _StopForward:
            pass
        return store["features"]

    store["run"] = run
    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


class ClassifierHead(nn.Module):
    """Features (N, C, H, W) or (N, C) -> one real/fake logit per sample."""

    def __init__(self, feature_shape: tuple[int, ...], width: int = 128):
        super().__init__()
        c = feature_shape[0]
        self.spatial = len(feature_shape) == 3
        if self.spatial:
            groups = 8 if c % 8 == 0 else 1
            self.body = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, width, 3, padding=1),
                                      nn.GroupNorm(8 if width % 8 == 0 else 1, width), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))
        else:
            self.body = nn.Sequential(nn.LayerNorm(c), nn.SiLU(), nn.Linear(c, width), nn.SiLU(), nn.Linear(width, 1))
        self.feature_shape = tuple(feature_shape)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        # half-precision backbone features meet the head in its own (fp32) dtype
        return self.body(feats.to(self.body[-1].weight.dtype)).squeeze(-1)
