"""Teacher ODE samplers written against the Denoiser interface (so they serve VP, EDM and flow teachers alike).

``ddim_sample`` implements the deterministic DDIM update (Song et al. 2021, Eq. 12 with eta = 0), which is the
exact first-order (exponential-integrator) solver of the probability-flow ODE:
    x_{t'} = a' x0_hat + s' eps_hat,   eps_hat = (x_t - a x0_hat) / s.
``heun_sample`` is Karras et al. (2022) Algorithm 1 (Heun's 2nd-order method) applied to y = x / a over
tau = s / a; where tau_max is huge or infinite (cosine VP, flow, a zero-terminal-SNR VP) the first step is a DDIM
step.
"""
from __future__ import annotations

import torch

from .checks import at_least
from .denoiser import Denoiser


@torch.no_grad()
def ddim_step(denoiser: Denoiser, x, t, t_next, cond=None, guidance=1.0):
    a, s = denoiser.coeffs(Denoiser._as_batch_t(t, x), x)
    x0 = denoiser.x0(x, t, cond, guidance)
    eps = (x - a * x0) / s
    a2, s2 = denoiser.coeffs(Denoiser._as_batch_t(t_next, x), x)
    return a2 * x0 + s2 * eps, x0


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int, cond=None, guidance: float = 1.0,
                progress: bool = False) -> torch.Tensor:
    """Integrate the PF-ODE from pure noise at the schedule's noisiest time to data with `steps` DDIM steps.

    `noise` is a standard normal draw; it is scaled to the marginal at t_max (sigma(t_max) for EDM).
    """
    at_least("sampler steps", steps)
    sched = denoiser.schedule
    ts = sched.ode_timesteps(steps).to(noise.device)
    t0 = Denoiser._as_batch_t(ts[0], noise)
    x = noise * denoiser.coeffs(t0, noise)[1] if sched.kind == "edm" else noise
    x0 = x
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="teacher ODE", leave=False)
    for i in it:
        t = ts[i]
        if i + 1 < steps:
            x, x0 = ddim_step(denoiser, x, t, ts[i + 1], cond, guidance)
        else:  # last step: return the clean estimate
            x0 = denoiser.x0(x, t, cond, guidance)
    return x0


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int, cond=None, guidance: float = 1.0):
    """Karras Alg. 1 in (y = x/a, tau = s/a); final step to tau = 0 is a plain Euler step."""
    at_least("sampler steps", steps)
    sched = denoiser.schedule
    ts = sched.ode_timesteps(steps).to(noise.device)

    def coef(t):
        return denoiser.coeffs(Denoiser._as_batch_t(t, noise), noise)

    def d_dtau(y, t):  # dy/dtau = eps(x)
        a, s = coef(t)
        x = a * y
        return (x - a * denoiser.x0(x, t, cond, guidance)) / s

    a0, s0 = coef(ts[0])
    start = 0
    if bool((a0 <= 1e-3 * s0).any()):
        # tau = s/a is infinite (flow at t = 1, a zero-SNR VP at T-1) or huge (cosine VP: ~2e4): Heun's trapezoid
        # over that one giant interval is badly wrong, so the first step is the exact first-order DDIM update.
        if steps == 1:
            return denoiser.x0(noise * s0, ts[0], cond, guidance)
        x, _ = ddim_step(denoiser, noise * s0, ts[0], ts[1], cond, guidance)
        y, start = x / coef(ts[1])[0], 1
    else:
        y = noise * (s0 / a0)  # x_T / a_T with x_T ~ N(0, s^2) approximately (ignores the data's a x0 term)
    for i in range(start, steps):
        t = ts[i]
        a, s = coef(t)
        tau = s / a
        d = d_dtau(y, t)
        if i + 1 == steps:
            return y - tau * d  # Euler to tau = 0
        a2, s2 = coef(ts[i + 1])
        tau2 = s2 / a2
        y_e = y + (tau2 - tau) * d
        y = y + (tau2 - tau) * 0.5 * (d + d_dtau(y_e, ts[i + 1]))
    return y
