"""Text-conditioned diffusers UNets (SD-style) behind the Denoiser interface.

`cond` is the text encoder's hidden states (N, tokens, dim); classifier-free guidance's unconditional branch
is the empty prompt's embedding (stored as a buffer), so CFG stays one batched call (Denoiser.x0).
"""
from __future__ import annotations

import torch
from torch import nn

from ..denoiser import NetworkDenoiser


class TextConditionedUNet(nn.Module):
    """`net(x, t, cond)` over a UNet2DConditionModel; `unet` is what exports and LoRA adapters see."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def mid_block(self):        # the GAN head's default bottleneck, as on the bare UNet
        return self.unet.mid_block

    def forward(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


class TextDenoiser(NetworkDenoiser):
    def __init__(self, unet: nn.Module, schedule, prediction_type: str, null_embedding: torch.Tensor):
        net = unet if isinstance(unet, TextConditionedUNet) else TextConditionedUNet(unet)
        super().__init__(net, schedule, prediction_type)
        self.register_buffer("null_embedding", null_embedding.detach().clone().reshape(1, *null_embedding.shape[-2:]))
        self.conditional = True

    def uncond(self, cond):
        if cond is None:
            raise ValueError("a text-conditioned teacher needs prompt embeddings as cond")
        return self.null_embedding.to(cond.dtype).expand(cond.shape[0], -1, -1)


class SDXLConditionedUNet(TextConditionedUNet):
    """`net(x, t, cond)` over an SDXL-style UNet ("text_time" added conditioning).

    `cond` packs everything the UNet needs into one tensor, so batching, CFG's concatenation and caching treat it
    like SD1.x's hidden states: rows [:-1] are the two encoders' concatenated penultimate states, and the last
    row holds the pooled text embedding (`pooled_dim` values), then the six size/crop numbers, then zeros.
    """

    def __init__(self, unet: nn.Module, pooled_dim: int):
        super().__init__(unet)
        self.pooled_dim = int(pooled_dim)

    def forward(self, x, t, cond):
        extra = cond[:, -1]
        added = {"text_embeds": extra[:, :self.pooled_dim], "time_ids": extra[:, self.pooled_dim:self.pooled_dim + 6]}
        return self.unet(x, t, encoder_hidden_states=cond[:, :-1], added_cond_kwargs=added).sample


def pack_sdxl_cond(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """(N, L, D) states + (N, P) pooled + (N, 6) time ids -> (N, L + 1, D); needs P + 6 <= D (SDXL: 1286 <= 2048)."""
    n, _, d = hidden.shape
    p = pooled.shape[-1]
    if p + 6 > d:
        raise ValueError(f"cannot pack SDXL conditioning: pooled {p} + 6 time ids exceed the hidden width {d}")
    row = hidden.new_zeros(n, 1, d)
    row[:, 0, :p] = pooled
    row[:, 0, p:p + 6] = time_ids.to(hidden.dtype)
    return torch.cat([hidden, row], 1)
