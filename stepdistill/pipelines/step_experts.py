"""A step-experts student as one diffusers model: K networks, each called at the timesteps nearest its own.

`generator.step_experts` trains one network per step. Exported as this model, the student drops into the same
pipelines as a single network (stock `DDPMPipeline`, `ClassConditionalFewStepPipeline`, `PointsFewStepPipeline`):
each call routes the batch to the expert whose trained timestep is nearest the one asked for, as
`FewStepGenerator.denoiser_at` does. The experts' class name and config are part of this model's config, so
`from_pretrained` rebuilds them before loading their weights.
"""
from __future__ import annotations

import importlib

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..generator import nearest_index

# where an expert's class is found when the model is loaded (the kinds of network a student can be)
_EXPERT_MODULES = {"UNet2DModel": "diffusers", "TimeMLP": "stepdistill.networks.mlp"}


def _expert_class(name: str):
    if name not in _EXPERT_MODULES:
        raise ValueError(f"step experts of kind {name!r} cannot be exported; known: {sorted(_EXPERT_MODULES)}")
    return getattr(importlib.import_module(_EXPERT_MODULES[name]), name)


class StepExpertsModel(ModelMixin, ConfigMixin):
    """`model(x, t, ...)` = `experts[i](x, t, ...)` with i the trained timestep nearest t.

    `sample_size`, `in_channels` and `dim` repeat the experts' own values at the top of the config, where the
    pipelines read them (`unet.config.sample_size`, `net.config.dim`)."""

    @register_to_config
    def __init__(self, expert_class: str = "UNet2DModel", expert_config: dict | None = None,
                 timesteps: list[float] | tuple = (999,), sample_size=None, in_channels: int | None = None,
                 dim: int | None = None):
        super().__init__()
        cls = _expert_class(expert_class)
        self.experts = nn.ModuleList(cls.from_config(dict(expert_config or {})) for _ in timesteps)

    @classmethod
    def from_experts(cls, experts: list[nn.Module], timesteps: list[float]) -> "StepExpertsModel":
        """Wrap trained networks (one per timestep, in sampling order); their weights are copied in."""
        if len(experts) != len(timesteps):
            raise ValueError(f"{len(experts)} experts for {len(timesteps)} timesteps")
        first = experts[0]
        cfg = {k: v for k, v in dict(first.config).items() if not k.startswith("_")}
        # timesteps as trained: VP indices stay integers, EDM sigmas and flow times floats (int() made a flow
        # student's [1.0, 0.75, 0.5, 0.25] into [1, 0, 0, 0] and routed every later step to the wrong expert)
        model = cls(type(first).__name__, cfg, [t if isinstance(t, int) else float(t) for t in timesteps],
                    cfg.get("sample_size"),
                    cfg.get("in_channels"), cfg.get("dim"))
        for mine, theirs in zip(model.experts, experts):
            mine.load_state_dict(theirs.state_dict())
        return model

    def expert_index(self, t) -> int:
        t = torch.as_tensor(t).reshape(-1)
        if (t != t[0]).any():   # the pipelines pass one time for the whole batch; mixed times need several calls
            raise ValueError("StepExpertsModel takes one timestep per call, not per-sample timesteps")
        return nearest_index(self.config.timesteps, float(t[0]))

    def forward(self, sample, timestep, *args, **kwargs):
        return self.experts[self.expert_index(timestep)](sample, timestep, *args, **kwargs)
