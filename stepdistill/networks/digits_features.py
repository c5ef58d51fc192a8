"""A small digits classifier whose penultimate layer is the feature space of the digits Fréchet distance (FD).

Like Inception for FID: trained once on real data (here scikit-learn's digits, 80% split), shipped, frozen.
`forward` gives the `num_features`-dim features of [0, 1] images; `classify` gives 10-class logits (used for the
conditional accuracy of class-conditional students).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "digits_features.safetensors"


class DigitsFeatureNet(nn.Module):
    def __init__(self, num_features: int = 64):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.SiLU(),   # 8x8 -> 4x4
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 16, num_features), nn.SiLU())
        self.head = nn.Linear(num_features, 10)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.body(images01.float() * 2 - 1)

    def classify(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self(images01))


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random +-1 px shifts (zero-filled) and light noise: handwriting varies by a pixel, not more."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,))
    x = padded[..., int(dy):int(dy) + 8, int(dx):int(dx) + 8]
    return (x + 0.03 * torch.randn_like(x)).clamp(0, 1)


def train_feature_net(steps: int = 3000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                      progress: bool = True) -> tuple[DigitsFeatureNet, dict]:
    from tqdm.auto import tqdm

    from ..data.digits import load_digits_tensor, split_indices, to_unit

    torch.manual_seed(seed)
    images, labels = load_digits_tensor()
    x01 = to_unit(images)
    train_idx, held_idx = split_indices(len(labels), 0.2, seed)
    net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="digits feature net", disable=not progress):
        idx = train_idx[torch.randint(0, len(train_idx), (batch_size,))]
        loss = F.cross_entropy(net.classify(_augment(x01[idx])), labels[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net.classify(x01[held_idx]).argmax(-1) == labels[held_idx]).float().mean().item()
    return net, {"held_out_accuracy": acc, "held_out_count": int(len(held_idx)), "steps": steps,
                 "batch_size": batch_size, "lr": lr, "seed": seed}


def save_feature_net(net: DigitsFeatureNet, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"num_features": str(net.num_features)})


def feature_net_path(path=None) -> Path:
    """The feature network's file (the shipped one by default), or a one-line error saying how to get one."""
    path = Path(path) if path else SHIPPED
    if not path.is_file():
        raise FileNotFoundError(f"digits feature network {path} not found: run `stepdistill-teacher benchmark=digits` "
                                "or set benchmark.feature_net=PATH")
    return path


def load_feature_net(path=None) -> DigitsFeatureNet:
    path = feature_net_path(path)
    state = load_file(str(path))
    net = DigitsFeatureNet(state["head.weight"].shape[1])
    net.load_state_dict(state)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
