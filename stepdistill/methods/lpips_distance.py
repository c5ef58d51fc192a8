"""LPIPS (Zhang et al. 2018) for DMD's regression loss, offline: the lpips wheel ships its linear heads, and the
AlexNet backbone comes from a local torchvision `alexnet` state dict (`method.regression.lpips_weights=PATH`).
Images smaller than `resize` (`method.regression.lpips_resize`) are upsampled to it, bilinearly, as DMD upsamples
to 224 before LPIPS; 1-channel images are repeated to RGB. AlexNet's pooling needs at least 32 pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import at_least


class LPIPSDistance(nn.Module):
    def __init__(self, backbone_weights: str | None, resize: int = 224):
        super().__init__()
        self.resize = at_least("method.regression.lpips_resize", resize, 32)
        if not backbone_weights:
            raise ValueError("method.regression.distance=lpips needs local AlexNet weights: set "
                             "method.regression.lpips_weights=PATH (a torchvision alexnet state dict), or use l2")
        path = Path(backbone_weights)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights {path} not found (method.regression.lpips_weights)")
        import lpips

        self.lpips = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")} or state
        net = self.lpips.net
        mapped = {}
        for name, _ in net.named_parameters():  # slice{j}.{i}.weight <- features.{i}.weight
            _, idx, kind = name.split(".")
            mapped[name] = feats[f"{idx}.{kind}"]
        net.load_state_dict(mapped, strict=True)
        self.lpips.requires_grad_(False).eval()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample distance for images in [-1, 1]."""
        def prep(x):
            x = x.float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            if x.shape[-1] < self.resize:
                x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            return x
        return self.lpips(prep(pred), prep(target)).flatten()
