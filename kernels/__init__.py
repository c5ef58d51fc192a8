"""Fused attention for stepdistill: Triton flash attention (forward, backward, forward-mode JVP), a dispatch
over Triton / xformers / SDPA, and a diffusers attention processor that routes every attention through it.

The Triton kernels load lazily: importing this package never needs triton or a GPU.
"""
if __name__ == "kernels":   # found as a top-level package from the repository root: see _hand_over.py
    from ._hand_over import hand_over
    hand_over()
else:
    from .dispatch import BACKENDS, flash_attention, math_attention, resolve_backend
    from .processor import CONFIG_BACKENDS, FlashAttnProcessor, set_attention_backend

__all__ = ["BACKENDS", "CONFIG_BACKENDS", "FlashAttnProcessor", "flash_attention", "math_attention",
           "resolve_backend", "set_attention_backend"]
