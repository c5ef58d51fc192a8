"""A fake score that starts as the teacher: x0_fake(x_t, t) = x0_teacher(x_t, t) + c_out(t) F(c_in x_t, t).

DMD and its descendants initialise the fake score from the teacher's weights, so the critic begins at the real
score and only has to learn how the generator's distribution differs from the data. An analytic teacher (the
exact GMM) has no weights to copy; this parametrisation is the same start for it: F's output layer is zero at
initialisation, so the fake x0 is exactly the teacher's, and training fits only the residual. Its denoising loss
is the EDM loss of the MLP students (x0 error weighted by 1 / c_out^2), written for the residual's output.
"""
from __future__ import annotations

import torch

from ..denoiser import Denoiser, NetworkDenoiser


class TeacherResidualDenoiser(NetworkDenoiser):
    def __init__(self, net: torch.nn.Module, teacher: Denoiser, sigma_data: float):
        super().__init__(net, teacher.schedule, "edm", sigma_data=sigma_data)
        # a plain attribute, not a submodule: the teacher is frozen, shared with the teacher role and not saved
        # with the critic's weights
        self._teacher = (teacher,)
        last = _last_linear(net)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)

    @property
    def teacher(self) -> Denoiser:
        return self._teacher[0]

    def _edm_skip(self, x_t, t, cond, c_skip, alpha_sigma=None):
        return self.teacher._x0_single(x_t, t, cond, alpha_sigma).to(c_skip.dtype)

    def denoising_loss(self, x0, t, cond=None, noise=None, guidance: float = 1.0):
        if guidance != 1.0:
            raise ValueError("a teacher-residual fake score supports guidance 1 only (its teacher is unconditional)")
        return super().denoising_loss(x0, t, cond, noise)


def _last_linear(net: torch.nn.Module) -> torch.nn.Linear:
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if not last:
        raise ValueError(f"{type(net).__name__} has no Linear layer to zero: a teacher-residual fake score needs one")
    return last[-1]
