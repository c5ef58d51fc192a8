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
