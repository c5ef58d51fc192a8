"""The one interface every method is written against (DESIGN §2).

``Denoiser.x0(x_t, t, cond, guidance)`` is the only network call a method makes; eps, score and velocity are
derived from it here and nowhere else. Classifier-free guidance runs cond and uncond in ONE batched call.
"""
from __future__ import annotations

import torch
from torch import nn

from . import batch_split
from .prediction import (check_prediction_type, edm_coefficients, eps_from_x0, score_from_x0, target_for,
                         velocity_from_x0, x0_from_output)
from .schedules import NoiseSchedule, VPSchedule, _bcast


class Denoiser(nn.Module):
    """Base class: subclasses implement ``_x0_single`` (one network evaluation, no guidance)."""

    schedule: NoiseSchedule
    conditional: bool = False

    def coeffs(self, t: torch.Tensor, like: torch.Tensor, alpha_sigma=None, dtype: torch.dtype | None = None):
        """(alpha, sigma) at t broadcast against `like`, in `dtype` (default: like's); `alpha_sigma` (two (N,)
        tensors) replaces the schedule's."""
        a, s = alpha_sigma if alpha_sigma is not None else self.schedule.alpha_sigma(t)
        return _bcast(a, like, dtype), _bcast(s, like, dtype)

    def _x0_single(self, x_t, t, cond, alpha_sigma=None):
        raise NotImplementedError

    def uncond(self, cond):
        """The 'no condition' counterpart of ``cond`` (null class / empty prompt)."""
        raise ValueError("this teacher is unconditional: set guidance to 1.0 (classifier-free guidance needs a "
                         "conditional teacher)")

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond=None, guidance: float = 1.0,
           alpha_sigma: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """`alpha_sigma`: per-sample (alpha, sigma), shape (N,), used instead of the schedule's values at t, for
        continuous-time methods (sCM) that evaluate between a discrete schedule's grid points; t is then only
        the backbone's time input."""
        t = self._as_batch_t(t, x_t)
        if guidance != 1.0 and not self.conditional:
            self.uncond(cond)  # raises the clear error
        if guidance != 1.0 and cond is None:
            raise ValueError(f"guidance={guidance} needs a condition: pass cond (labels / prompt embeddings)")
        extra = {} if alpha_sigma is None else {"alpha_sigma": alpha_sigma}
        if guidance == 1.0:
            return self._x0_single(x_t, t, cond, **extra)
        # CFG (Ho & Salimans 2022) on the x0-prediction, cond and uncond batched together.
        if alpha_sigma is not None:
            extra = {"alpha_sigma": tuple(torch.cat([v, v]) for v in alpha_sigma)}
        both = self._x0_single(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, self.uncond(cond)]),
                               **extra)
        x0_c, x0_u = both.chunk(2)
        return x0_u + guidance * (x0_c - x0_u)

    def eps(self, x_t, t, cond=None, guidance=1.0):
        a, s = self.coeffs(self._as_batch_t(t, x_t), x_t)
        return eps_from_x0(self.x0(x_t, t, cond, guidance), x_t, a, s)

    def score(self, x_t, t, cond=None, guidance=1.0):
        a, s = self.coeffs(self._as_batch_t(t, x_t), x_t)
        return score_from_x0(self.x0(x_t, t, cond, guidance), x_t, a, s)

    def velocity(self, x_t, t, cond=None, guidance=1.0):
        a, s = self.coeffs(self._as_batch_t(t, x_t), x_t)
        return velocity_from_x0(self.x0(x_t, t, cond, guidance), x_t, a, s)

    @staticmethod
    def _as_batch_t(t, x):
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        # one time for the whole batch (0-d or shape (1,)) is expanded, so CFG's doubled batch gets one per row
        return t.expand(x.shape[0]) if t.numel() == 1 else t


class NetworkDenoiser(Denoiser):
    """Wraps a backbone (diffusers UNet2DModel or any ``net(x, t, cond)`` module) and its prediction type.

    ``null_class``: index of the 'no label' class embedding (label dropout) for class-conditional nets.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str = "epsilon",
                 sigma_data: float = 0.5, null_class: int | None = None):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        if self.prediction_type == "epsilon" and getattr(schedule, "zero_terminal_snr", False):
            raise ValueError("prediction_type 'epsilon' on a zero-terminal-SNR schedule (rescale_betas_zero_snr: "
                             "alpha = 0 at the last timestep), where x0 = (x_t - sigma eps) / alpha divides by 0: "
                             "use 'v_prediction' or 'sample', as zero-terminal-SNR teachers are trained")
        if self.prediction_type == "epsilon" and schedule.kind == "flow":
            raise ValueError("prediction_type 'epsilon' on a rectified-flow schedule (alpha = 1 - t = 0 at t = 1), "
                             "where x0 = (x_t - sigma eps) / alpha divides by 0: use 'flow_velocity', 'sample' or "
                             "'edm'")
        self.sigma_data = sigma_data
        self.null_class = null_class
        self.conditional = null_class is not None
        self._edm_tables: dict = {}   # (device, sigma_data) -> per-timestep EDM rows (see _edm_rows)

    def uncond(self, cond):
        if self.null_class is None:
            return super().uncond(cond)
        return torch.full_like(cond, self.null_class)

    def raw(self, x_t, t, cond=None, alpha_sigma=None, c_in=None):
        """The backbone's native output (eps / v / x0 / velocity / EDM's F). `c_in`: EDM's input scaling, where
        the caller has it already."""
        t = self._as_batch_t(t, x_t)
        x_in = x_t
        if self.prediction_type == "edm":
            if c_in is None:
                c_in = self._edm_rows(t, x_t, alpha_sigma)[2]
            x_in = (c_in * x_t).to(x_t.dtype)   # the network gets x_t's precision
        t_net = self.schedule.net_time(t)
        if _is_diffusers_unet(self.net):
            return self.net(x_in, t_net, class_labels=cond).sample
        return self.net(x_in, t_net, cond)

    def _edm_rows(self, t, like, alpha_sigma=None):
        """(alpha, sigma, c_in, c_skip, c_out) at t, broadcast against `like`, in fp32 or like's dtype if wider.

        For float32 on a VP schedule the five are read off a per-timestep table computed once, with the
        same float32 ops as below, so the values are the same: one lookup instead of ~15 small tensor ops per
        call, which on the gmm's small MLPs are a visible share of a training step."""
        if alpha_sigma is None and isinstance(self.schedule, VPSchedule) and like.dtype == torch.float32:
            key = (str(t.device), self.sigma_data)
            if key not in self._edm_tables:
                a, s = self.schedule.table(t.device).unbind(-1)
                self._edm_tables[key] = torch.stack([a, s, *edm_coefficients(a, s, self.sigma_data)], dim=1)
            rows = self._edm_tables[key][self.schedule.index(t)]
            return tuple(_bcast(c, like) for c in rows.unbind(-1))
        a, s = self.coeffs(t, like, alpha_sigma, dtype=torch.promote_types(like.dtype, torch.float32))
        return (a, s, *edm_coefficients(a, s, self.sigma_data))

    def _x0_single(self, x_t, t, cond, alpha_sigma=None):
        dt = torch.promote_types(x_t.dtype, torch.float32)  # at least fp32 math, float64 stays float64
        if self.prediction_type == "edm":  # the EDM coefficients once for the input and the output scaling
            a, s, c_in, c_skip, c_out = self._edm_rows(t, x_t, alpha_sigma)   # in dt
            out = self.raw(x_t, t, cond, c_in=c_in).to(dt)
            return self._edm_skip(x_t.to(dt), t, cond, c_skip, alpha_sigma) + c_out * out
        a, s = self.coeffs(t, x_t, alpha_sigma, dtype=dt)   # fp32 from the schedule: alpha(999) = 0.0064 has
        out = self.raw(x_t, t, cond, alpha_sigma).to(dt)     # three digits in fp16, and x0 divides by it
        return x0_from_output(out, x_t.to(dt), a, s, self.prediction_type, self.sigma_data)

    def _edm_skip(self, x_t, t, cond, c_skip, alpha_sigma=None):
        """The part of an EDM x0-prediction the backbone does not make: c_skip x_t (teacher_residual.py puts the
        analytic teacher's x0 here instead)."""
        return c_skip * x_t

    def denoising_loss(self, x0, t, cond=None, noise=None, guidance: float = 1.0):
        """Per-sample MSE in the network's native space: the loss the teacher was trained with.

        `guidance` != 1 regresses the network's *guided* output, uncond + w (cond - uncond) from one batched call,
        onto the target (SiD-LSG trains its fake score this way). Every prediction type is affine in the raw
        output at fixed x_t, so CFG on the raw output is CFG on the x0-prediction."""
        t = self._as_batch_t(t, x0)
        noise = batch_split.randn_like(x0) if noise is None else noise
        if self.prediction_type == "edm":   # target_for's EDM target, through the skip a subclass may replace
            a, s, _, c_skip, c_out = self._edm_rows(t, x0)
            x_t = a * x0 + s * noise
            target = (x0 - self._edm_skip(x_t, t, cond, c_skip)) / c_out
        else:
            a, s = self.coeffs(t, x0)
            x_t = a * x0 + s * noise
            target = target_for(x0, noise, x_t, a, s, self.prediction_type, self.sigma_data)
        if guidance == 1.0:
            out = self.raw(x_t, t, cond).float()
        else:
            if cond is None:
                raise ValueError(f"guidance={guidance} needs a condition: pass cond (labels / prompt embeddings)")
            both = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, self.uncond(cond)])).float()
            out_c, out_u = both.chunk(2)
            out = out_u + guidance * (out_c - out_u)
        return ((out - target) ** 2).flatten(1).mean(1)


def _is_diffusers_unet(net) -> bool:
    # by the class hierarchy, not the class's own name: FSDP2's fully_shard makes it a subclass (FSDPUNet2DModel),
    # and a UNet built in code has no config._class_name (saving adds it); without importing diffusers
    return (any(c.__name__ == "UNet2DModel" for c in type(net).__mro__)
            or (hasattr(net, "config") and getattr(net.config, "_class_name", "") == "UNet2DModel"))
