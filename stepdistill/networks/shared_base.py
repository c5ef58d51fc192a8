"""Shared-base memory mode (`model.shared_base=true`): teacher, fake score and generator are one frozen network.

The trainable roles are LoRA adapters on that network (peft multi-adapter), switched per call: the teacher runs
with adapters off, the fake score with its adapter, the generator (and its EMA) with theirs. Parameter memory
is the base once plus the adapters, instead of three (four with EMA) full copies.

Each role holds an `AdapterView`: it activates its adapter and calls the shared network. Only the teacher's
view registers the network as a submodule (so `.to(device)` moves it once and checkpoints never see it); the
others register just their own adapter's parameters, which is what their optimizers and checkpoints get.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .lora import DEFAULT_TARGETS, mark_frozen


class SharedBase:
    def __init__(self, unet: nn.Module):
        if not hasattr(unet, "add_adapter"):
            # diffusers gives UNet2DConditionModel peft adapters (add_adapter), not UNet2DModel (the digits teacher)
            raise ValueError(f"model.shared_base needs a network with diffusers' adapter support (add_adapter: the "
                             f"text-to-image benchmarks' UNet2DConditionModel), not {type(unet).__name__}")
        self.unet = unet
        mark_frozen(unet)
        self.adapters: list[str] = []

    def add(self, name: str, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS) -> None:
        """A new trainable adapter; its B matrices start at zero, so the role starts as the teacher."""
        from peft import LoraConfig
        if rank < 1:
            raise ValueError(f"model.lora_rank={rank}: shared-base mode needs a positive adapter rank")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():   # init must not shift the run's RNG
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")   # several adapters: intended
            self.unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), init_lora_weights="gaussian",
                                             target_modules=list(targets)), adapter_name=name)
        self.adapters.append(name)
        for p in self.params(name):
            p.requires_grad_(True)

    def add_like(self, name: str, like: str) -> None:
        """A new adapter with `like`'s configuration and a copy of its weights (the generator's EMA)."""
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            self.unet.add_adapter(copy.deepcopy(self.unet.peft_config[like]), adapter_name=name)
        self.adapters.append(name)
        with torch.no_grad():
            for dst, src in zip(self.params(name), self.params(like)):
                dst.copy_(src)

    def params(self, name: str) -> list[nn.Parameter]:
        """Adapter `name`'s parameters, in module order (the same order for every adapter)."""
        # an Embedding's adapter weights end in the name (`lora_embedding_A.<name>`), a Linear's continue after it
        return [p for n, p in self.unet.named_parameters()
                if "lora_" in n and (f".{name}." in n or n.endswith(f".{name}"))]

    def _lora_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if "lora_" in n]

    def activate(self, name: str | None) -> None:
        """Route calls through adapter `name` (None: the bare base). peft's switches also flip requires_grad;
        the trainer owns those flags, so they are put back before any forward runs."""
        params = self._lora_params()
        flags = [p.requires_grad for p in params]
        if name is None:
            self.unet.disable_adapters()
        else:
            self.unet.enable_adapters()
            self.unet.set_adapter(name)
        for p, f in zip(params, flags):
            p.requires_grad_(f)

    def merged_unet(self, name: str) -> nn.Module:
        """A plain copy of the network with adapter `name` folded in (for a stock export)."""
        out = copy.deepcopy(self.unet)
        out.set_adapter(name)
        out.fuse_lora(lora_scale=1.0, adapter_names=[name])
        out.unload_lora()
        return out


class AdapterView(nn.Module):
    """A role's handle on the shared network: `forward` runs it with this role's adapter (None = teacher)."""

    def __init__(self, shared: SharedBase, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "shared", shared)      # not a submodule: one owner (the teacher's view)
        self.adapter = adapter
        if adapter is None:
            self.base = shared.unet
        else:
            self.adapter_params = nn.ParameterList(shared.params(adapter))

    def __getattr__(self, name):
        """The shared network's attributes as a full copy would have them: its `config` (the Denoiser calls the view
        like the diffusers model it stands for) and submodules (`mid_block`, `down_blocks`: the GAN head's
        `method.gan.feature_module`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get("shared")
            if shared is None or name.startswith("_"):   # mid-copy, or Python's own protocol lookups
                raise
            return getattr(shared.unet, name)

    def forward(self, *args, **kwargs):
        self.shared.activate(self.adapter)
        return self.shared.unet(*args, **kwargs)


def shared_ema(generator: nn.Module) -> nn.Module:
    """The generator's EMA as one more adapter on the shared base (a full copy would undo the saving)."""
    view = next(m for m in generator.modules() if isinstance(m, AdapterView))
    shared = view.shared
    shared.add_like("generator_ema", view.adapter)
    ema = copy.deepcopy(generator, {id(shared): shared})
    ema_view = next(m for m in ema.modules() if isinstance(m, AdapterView))
    ema_view.adapter = "generator_ema"
    ema_view.adapter_params = nn.ParameterList(shared.params("generator_ema"))
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def parameter_bytes(roles, optimizers=()) -> dict:
    """Bytes of distinct parameters across `roles` plus the optimizers' state tensors."""
    seen, params = set(), 0
    for p in roles.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            params += p.numel() * p.element_size()
    state = sum(t.numel() * t.element_size() for opt in optimizers for st in opt.state.values()
                for t in st.values() if torch.is_tensor(t))
    return {"parameters": params, "optimizer_state": state, "total": params + state}
