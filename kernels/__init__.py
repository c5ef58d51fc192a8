"""Fused attention for stepdistill: Triton flash attention (forward, backward, forward-mode JVP), a dispatch
over Triton / xformers / SDPA, and a diffusers attention processor that routes every attention through it.

The Triton kernels load lazily: importing this package never needs triton or a GPU.
"""
from .dispatch import BACKENDS, flash_attention, math_attention, resolve_backend
from .processor import CONFIG_BACKENDS, FlashAttnProcessor, set_attention_backend

__all__ = ["BACKENDS", "CONFIG_BACKENDS", "FlashAttnProcessor", "flash_attention", "math_attention",
           "resolve_backend", "set_attention_backend"]
