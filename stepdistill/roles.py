"""The named registry of networks a run trains or consults (DESIGN §1, §10).

Roles are looked up by name (``roles["fake_score"]``), so later method families add their own (an EMA target,
phase experts, several students) without the trainer learning about them. ``train_only`` flips requires_grad so
a phase's backward pass reaches exactly the roles that phase updates and nothing else.
"""
from __future__ import annotations

from torch import nn


class Roles(nn.ModuleDict):
    FROZEN = ("teacher",)  # never trained, whatever a method asks

    def parameters_of(self, names) -> list[nn.Parameter]:
        return [p for n in names for p in self[n].parameters()]

    def train_only(self, names) -> None:
        names = set(names)
        for n, mod in self.items():
            flag = n in names and n not in self.FROZEN
            for p in mod.parameters():
                p.requires_grad_(flag)

    def missing(self, names) -> list[str]:
        return [n for n in names if n not in self]
