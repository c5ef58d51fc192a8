"""A small time-conditioned MLP backbone for low-dimensional benchmarks (the GMM's fake score and generator).

Called as ``net(x, t_net, cond)`` like any backbone behind ``NetworkDenoiser``. The middle activation is the
``mid`` submodule so a GAN head can read the critic's bottleneck features, as DMD2 does on a UNet's mid-block.
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017), as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h, emb):
        return h + self.fc2(torch.nn.functional.silu(self.fc1(torch.nn.functional.silu(self.norm(h) + emb))))


class TimeMLP(ModelMixin, ConfigMixin):
    """A diffusers model (save_pretrained / from_pretrained) so MLP students export like UNets do."""

    @register_to_config
    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, emb_dim: int = 64,
                 num_classes: int | None = None, fourier_features: int = 0, fourier_scale: float = 1.0,
                 time_scale: float = 1.0):
        super().__init__()
        self.emb_dim = emb_dim
        # the time input is t_net * time_scale before its sinusoidal embedding. 1 keeps the DDPM convention (the
        # VP timestep index); pi/2000 turns a cosine schedule's index into its angle in [0, pi/2], the slow time
        # input sCM's continuous-time tangent needs (Lu & Song 2024 §4.1: c_noise(t) = t, not 1000 t)
        self.time_scale = float(time_scale)
        # Random Fourier features of the input (Tancik et al. 2020): MLPs on 2-D inputs learn sharp, multi-mode
        # maps (e.g. noise -> 8 separated modes) far faster with them than from raw coordinates (spectral bias).
        g = torch.Generator().manual_seed(0)
        self.register_buffer("fourier", torch.randn(dim, fourier_features, generator=g) * fourier_scale)
        self.inp = nn.Linear(dim + 2 * fourier_features, width)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None  # +1: the null class
        half = depth // 2
        self.down = nn.ModuleList(ResidualBlock(width) for _ in range(half))
        self.mid = nn.Identity()  # bottleneck tap point for GAN heads
        self.up = nn.ModuleList(ResidualBlock(width) for _ in range(depth - half))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t_net, cond=None):
        t = t_net.expand(x.shape[0])
        if self.time_scale != 1.0:   # no extra op on the default path: gmm steps are dispatch-bound
            t = t * self.time_scale
        # the embedding is computed in fp32 (indices up to 1000 need it), then takes the weights' dtype
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(self.inp.weight.dtype))
        if self.label is not None and cond is not None:
            emb = emb + self.label(cond)
        if self.fourier.shape[1]:
            proj = 2 * math.pi * x @ self.fourier.to(x.dtype)
            x = torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=-1)
        h = self.inp(x)
        for blk in self.down:
            h = blk(h, emb)
        h = self.mid(h)
        for blk in self.up:
            h = blk(h, emb)
        return self.out(h)
