"""LoRA students (peft through diffusers' adapter API): the generator trains low-rank adapters on a frozen copy
of the teacher's UNet. `generator.lora_rank=R` turns it on.

The frozen base weights are marked (`frozen_base`) so the trainer leaves them out of every optimizer and never
turns their gradients on, whatever phase runs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# SD-style attention projections: what diffusers' LoRA scripts adapt and `load_lora_weights` expects
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def mark_frozen(module: nn.Module) -> None:
    """Freeze every parameter of `module` for good: Roles (roles.py) leaves parameters marked `frozen_base`
    out of optimizers and requires_grad flips."""
    for p in module.parameters():
        p.requires_grad_(False)
        p.frozen_base = True


def diffusers_unet(denoiser) -> nn.Module:
    """The diffusers model inside a denoiser (text UNets sit one wrapper deeper)."""
    net = denoiser.net
    return getattr(net, "unet", net)


def set_backbone(denoiser, backbone: nn.Module) -> None:
    """Put `backbone` where diffusers_unet(denoiser) finds the diffusers model."""
    if hasattr(denoiser.net, "unet"):
        denoiser.net.unet = backbone
    else:
        denoiser.net = backbone


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
             dropout: float = 0.0) -> int:
    """Freeze `unet` and add a LoRA adapter of rank `rank` on `targets`; returns the number of trainable
    parameters. The adapter's B matrices start at zero, so the student starts as the teacher."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"generator.lora_rank={rank}: use a positive rank (or null for full fine-tuning)")
    if not hasattr(unet, "add_adapter"):
        raise ValueError(f"generator.lora_rank needs a diffusers model with adapter support, not {type(unet).__name__}")
    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {n for n, _ in unet.named_modules()}
    if not any(t in names or any(n.endswith(t) for n in names) for t in targets):
        raise ValueError(f"generator.lora_targets={list(targets)} match no module of {type(unet).__name__}: name "
                         "its attention projections or Linear/Conv layers")
    mark_frozen(unet)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), lora_dropout=float(dropout),
                                init_lora_weights="gaussian", target_modules=list(targets)))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable)


def has_lora(unet: nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_state_dict(unet: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """An adapter's weights under peft's keys, which `save_lora_weights` writes and `load_lora_weights` reads.
    Not converted to diffusers' older format: that renames only the attention projections, and `load_lora_weights`
    decides from the first key alone whether to convert back, so with other targets (proj_in, conv1, ...) it
    dropped the attention weights of a mixed file with a warning and loaded another student."""
    from peft.utils import get_peft_model_state_dict
    return get_peft_model_state_dict(unet, adapter_name=adapter)


def merged_copy(unet: nn.Module) -> nn.Module:
    """A plain copy of `unet` with the adapter folded into its weights (for a stock, adapter-free export)."""
    out = copy.deepcopy(unet)
    out.fuse_lora(lora_scale=1.0)
    out.unload_lora()
    return out
