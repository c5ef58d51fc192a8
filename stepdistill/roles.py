"""The named registry of networks a run trains or consults (DESIGN §1, §10).

Roles are looked up by name (``roles["fake_score"]``), so later method families add their own (an EMA target,
phase experts, several students) without the trainer learning about them. ``train_only`` flips requires_grad so
a phase's backward pass reaches exactly the roles that phase updates and nothing else.
"""
from __future__ import annotations

from torch import nn


class Roles(nn.ModuleDict):
    FROZEN = ("teacher",)  # never trained, whatever a method asks

    @staticmethod
    def _trainable(module: nn.Module) -> list[nn.Parameter]:
        # a LoRA student's frozen base weights (networks/lora.py) are never trained
        return [p for p in module.parameters() if not getattr(p, "frozen_base", False)]

    def parameters_of(self, names) -> list[nn.Parameter]:
        return [p for n in names for p in self._trainable(self[n])]

    def parameter_lists(self) -> dict[str, list[nn.Parameter]]:
        """Each role's trainable parameters, for callers that flip requires_grad every step: walking the module
        tree each time was ~5% of a gmm iteration. Frozen roles list none: in shared-base mode the teacher's
        network also carries the other roles' adapters, whose flags belong to those roles."""
        return {n: [] if n in self.FROZEN else self._trainable(mod) for n, mod in self.items()}

    def train_only(self, names, parameter_lists: dict[str, list[nn.Parameter]] | None = None) -> None:
        names = set(names)
        lists = parameter_lists if parameter_lists is not None else self.parameter_lists()
        for n, params in lists.items():
            flag = n in names and n not in self.FROZEN
            for p in params:
                p.requires_grad_(flag)

    def missing(self, names) -> list[str]:
        return [n for n in names if n not in self]
