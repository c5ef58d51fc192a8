"""A diffusers attention processor that sends self- and cross-attention through `flash_attention`.

It follows diffusers' AttnProcessor2_0 step for step (spatial and group norms, 4-D inputs, cross-attention
norms, QK norms, residual and output rescaling) and differs only in the attention call, which honours
`attn.scale`. Masked attention (a padding mask from the caller) goes to SDPA: the kernels take no mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import BACKENDS, flash_attention, forward_ad_active, math_attention

# "diffusers" leaves a model's own processors alone (the config default); the others install this processor
CONFIG_BACKENDS = ("diffusers",) + BACKENDS


class FlashAttnProcessor:
    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, key_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is not None and (self.backend == "math" or forward_ad_active(query)):
            # SDPA's CPU kernels have no forward-mode AD: the masked call takes the math path there, as unmasked do
            hidden_states = math_attention(query, key, value, attn.scale, attention_mask)
        elif attention_mask is not None:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           scale=attn.scale)
        else:
            hidden_states = flash_attention(query, key, value, scale=attn.scale, backend=self.backend)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention_backend(module: torch.nn.Module, backend: str) -> int:
    """Install FlashAttnProcessor(backend) on every diffusers Attention inside `module`; returns how many.

    backend="diffusers" changes nothing (the models keep their own processors).
    """
    if backend not in CONFIG_BACKENDS:
        raise ValueError(f"attention.backend={backend!r} is not known: choose one of {', '.join(CONFIG_BACKENDS)}")
    if backend == "diffusers":
        return 0
    from diffusers.models.attention_processor import Attention
    processor = FlashAttnProcessor(backend)
    count = 0
    for sub in module.modules():
        # added key/value projections (the simple cross-attention blocks of IF / unCLIP UNets) are another
        # processor's layout (AttnAddedKVProcessor): those layers keep their own processor
        if isinstance(sub, Attention) and getattr(sub, "added_kv_proj_dim", None) is None:
            sub.set_processor(processor)
            count += 1
    return count


def routed_head_dims(module: torch.nn.Module) -> set[int]:
    """The head dims of the attention layers `set_attention_backend` routes in `module`."""
    from diffusers.models.attention_processor import Attention
    return {sub.to_q.out_features // sub.heads for sub in module.modules()
            if isinstance(sub, Attention) and isinstance(sub.processor, FlashAttnProcessor)}
