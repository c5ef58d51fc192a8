"""A fake score that starts as the teacher: x0_fake(x_t, t) = x0_teacher(x_t, t) + c_out(t) F(c_in x_t, t).

DMD and its descendants initialise the fake score from the teacher's weights, so the critic begins at the real
score and only has to learn how the generator's distribution differs from the data. An analytic teacher (the
exact GMM) has no weights to copy; this parametrisation is the same start for it: F's output layer is zero at
initialisation, so the fake x0 is exactly the teacher's, and training fits only the residual. Its denoising loss
is the EDM loss of the MLP students (x0 error weighted by 1 / c_out^2), written for the residual's output.
"""
from __future__ import annotations

import torch

from .. import batch_split
from ..denoiser import Denoiser, NetworkDenoiser
from ..prediction import edm_coefficients


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

    def _base(self, x_t, t, cond, alpha_sigma=None):
        return self.teacher._x0_single(x_t, t, cond, alpha_sigma)

    def _x0_single(self, x_t, t, cond, alpha_sigma=None):
        a, s = self.coeffs(t, x_t, alpha_sigma)
        dt = torch.promote_types(x_t.dtype, torch.float32)
        c_in, _, c_out = edm_coefficients(a.to(dt), s.to(dt), self.sigma_data)
        out = self.raw(x_t, t, cond, c_in=c_in.to(x_t.dtype)).to(dt)
        return self._base(x_t, t, cond, alpha_sigma).to(dt) + c_out * out

    def denoising_loss(self, x0, t, cond=None, noise=None, guidance: float = 1.0):
        if guidance != 1.0:
            raise ValueError("a teacher-residual fake score supports guidance 1 only (its teacher is unconditional)")
        t = self._as_batch_t(t, x0)
        noise = batch_split.randn_like(x0) if noise is None else noise
        a, s = self.coeffs(t, x0)
        x_t = a * x0 + s * noise
        c_in, _, c_out = edm_coefficients(a, s, self.sigma_data)
        with torch.no_grad():
            target = (x0 - self._base(x_t, t, cond).to(x0.dtype)) / c_out
        out = self.raw(x_t, t, cond, c_in=c_in).float()
        return ((out - target) ** 2).flatten(1).mean(1)


def _last_linear(net: torch.nn.Module) -> torch.nn.Linear:
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if not last:
        raise ValueError(f"{type(net).__name__} has no Linear layer to zero: a teacher-residual fake score needs one")
    return last[-1]
