"""The one/few-step student (DESIGN §3): shared by DMD2, SiD and the phased methods.

Sampling follows diffusers' ``LCMScheduler`` step exactly, so an exported student sampled by stock diffusers
gives the same images for the same noise:
  x0_k   = c_skip(t_k) x_k + c_out(t_k) x0_net(x_k, t_k)        (LCM boundary condition; VP teachers only)
  x_k+1  = alpha(t_k+1) x0_k + sigma(t_k+1) z_k,  z_k ~ N(0, I)   (fresh noise between steps)
Training uses backward simulation (DMD2 §4.5): each sample draws k uniformly in 1..K, runs k-1 steps without
gradient on the generator's own outputs, and trains step k, so the student learns from the inputs it will
actually see.

Step experts (`generator.step_experts`): one network per step instead of one shared by all K (Phased DMD's
mixture of experts), so step k's updates cannot move the other steps. On digits every step ended worse than
with one shared network, which learns each step from the others' updates too (docs/results.md).
`denoiser` is step 1's network; `later_experts[i]` serves step i+2.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from . import batch_split
from .denoiser import NetworkDenoiser

log = logging.getLogger("stepdistill")

LCM_SIGMA_DATA = 0.5  # fixed in diffusers' LCMScheduler
LCM_ORIGINAL_STEPS = 50   # LCMScheduler's default original_inference_steps


def lcm_original_steps(num_train_timesteps: int) -> int:
    """The original_inference_steps of the LCMScheduler a student samples and exports with: diffusers' 50, or every
    timestep of a schedule with fewer (LCMScheduler refuses more than it has, even for given timesteps)."""
    return min(LCM_ORIGINAL_STEPS, int(num_train_timesteps))


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps diffusers' LCMScheduler.set_timesteps(steps) picks, asked of LCMScheduler itself so an
    exported student sampled by stock diffusers runs at exactly the timesteps it was trained at."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=num_train_timesteps,
                         original_inference_steps=lcm_original_steps(num_train_timesteps))
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def nearest_index(timesteps, t: float) -> int:
    """The index of the timestep nearest t: which step expert serves time t."""
    return min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - float(t)))


class FewStepGenerator(nn.Module):
    def __init__(self, denoiser: NetworkDenoiser, timesteps: list[float] | None = None, steps: int = 1,
                 lcm_boundary: bool | None = None, timestep_scaling: float = 10.0, per_sample_step: bool = True,
                 train_steps: list[int] | None = None, later_experts: list[nn.Module] | None = None):
        super().__init__()
        self.per_sample_step = per_sample_step
        self.denoiser = denoiser
        sched = denoiser.schedule
        self.lcm_boundary = sched.discrete if lcm_boundary is None else lcm_boundary
        self.timestep_scaling = timestep_scaling
        self._boundary_cache: dict = {}   # (t, timestep_scaling) -> (c_skip, c_out), see _boundary_at
        if timesteps is None:
            try:
                timesteps = self.default_timesteps(steps)
            except ValueError as e:   # "steps=60: ...": here it is the generator's setting
                raise ValueError(f"generator.{e}") from None
        ts = [float(t) for t in timesteps]
        if any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"generator.timesteps must be strictly decreasing, got {ts}")
        # outside the teacher's range the schedule's tables would be read past their ends (VP clamps silently)
        lo, hi = float(sched.final_t()), sched.t_max
        slack = 1e-6 * max(1.0, abs(hi))
        if any(not lo - slack <= t <= hi + slack for t in ts):
            raise ValueError(f"generator.timesteps={ts}: each must lie in the schedule's range [{lo:g}, {hi:g}]")
        if sched.discrete and any(t != round(t) for t in ts):
            # the schedule reads alpha and sigma at the rounded index while the network would see the fraction, and
            # the export (LCMScheduler) truncates it: three different times for one step
            raise ValueError(f"generator.timesteps={ts}: a discrete (VP) schedule takes integer timesteps, the rows "
                             f"of its alphas_cumprod table: use {[round(t) for t in ts]}")
        if self.lcm_boundary and 0 in ts:   # c_skip(0) = 1, c_out(0) = 0: that step returns its input noise
            raise ValueError(f"generator.timesteps={ts}: at timestep 0 the consistency boundary condition makes the "
                             "step return its input unchanged (nothing to train): use timesteps of at least 1")
        self.timesteps = ts
        # the steps k backward simulation trains (1-based); DMD2 draws all of 1..K
        self.train_steps = list(range(1, len(ts) + 1)) if not train_steps else [int(k) for k in train_steps]
        if any(k < 1 or k > len(ts) for k in self.train_steps):
            raise ValueError(f"generator.train_steps={self.train_steps}: each must be in 1..{len(ts)}")
        # kept apart from `denoiser` (not one list holding it too): shared tensors would be saved twice
        self.later_experts = nn.ModuleList(later_experts or [])
        if self.later_experts and len(self.later_experts) != len(ts) - 1:
            raise ValueError(f"step experts: {len(self.later_experts) + 1} networks for {len(ts)} steps")
        untrained = [k for k in range(1, len(ts) + 1) if k not in self.train_steps]
        if self.later_experts and untrained:   # a network per step: those of steps never trained keep their init
            log.warning("generator.step_experts with generator.train_steps=%s: the networks of steps %s are never "
                        "trained and stay their initial weights (the teacher's copy where the student starts from it)",
                        self.train_steps, ", ".join(map(str, untrained)))

    @property
    def step_experts(self) -> bool:
        return len(self.later_experts) > 0

    @property
    def step_denoisers(self) -> list[NetworkDenoiser]:
        """Every network of the generator: step 1's, then the later steps' experts (just one without experts)."""
        return [self.denoiser, *self.later_experts]

    def denoiser_at(self, t: float) -> NetworkDenoiser:
        """The network that denoises at time t: the shared one, or the expert of the trained step nearest t
        (sampling at other timesteps than the trained ones picks the closest expert)."""
        if not self.step_experts:
            return self.denoiser
        return self.step_denoisers[nearest_index(self.timesteps, t)]

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def default_timesteps(self, steps: int) -> list[float]:
        """The schedule's own `steps`-step timesteps: LCMScheduler's on a discrete schedule, else the ODE grid's."""
        if int(steps) < 1:
            raise ValueError(f"steps={steps}: a student samples in at least 1 step")
        sched = self.denoiser.schedule
        if sched.discrete:
            most = lcm_original_steps(sched.num_train_timesteps)   # LCMScheduler picks its K timesteps among these
            if int(steps) > most:
                raise ValueError(f"steps={steps}: a student on a discrete schedule samples in at most "
                                 f"{most} steps (LCMScheduler's original_inference_steps)")
            return [float(t) for t in lcm_timesteps(steps, sched.num_train_timesteps)]
        return sched.ode_timesteps(steps).tolist()

    def sampling_timesteps(self, steps: int | None = None) -> list[float]:
        """The timesteps of a `steps`-step sampling: the trained ones at the trained count (or None), which need
        not be the schedule's default ones (SiD's one step at sigma 2.5, `generator.timesteps`); else the default's."""
        if steps is None or int(steps) == self.num_steps:
            return list(self.timesteps)
        return self.default_timesteps(steps)

    def boundary_scalings(self, t: torch.Tensor):
        """LCMScheduler.get_scalings_for_boundary_condition_discrete."""
        st = t * self.timestep_scaling
        c_skip = LCM_SIGMA_DATA**2 / (st**2 + LCM_SIGMA_DATA**2)
        c_out = st / (st**2 + LCM_SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def denoise(self, x_t: torch.Tensor, t: float, cond=None) -> torch.Tensor:
        tt = torch.full((x_t.shape[0],), float(t), device=x_t.device)
        x0 = self.denoiser_at(t).x0(x_t, tt, cond)
        if self.lcm_boundary:
            c_skip, c_out = self._boundary_at(float(t))
            x0 = c_skip * x_t.to(x0.dtype) + c_out * x0
        return x0

    def _boundary_at(self, t: float) -> tuple[float, float]:
        """`boundary_scalings` at one timestep, as Python numbers: computed once per timestep in float32 as a batch
        of them would be (the same values), not as a dozen small tensor ops per step."""
        key = (t, self.timestep_scaling)
        if key not in self._boundary_cache:
            self._boundary_cache[key] = tuple(float(c) for c in self.boundary_scalings(torch.tensor([t])))
        return self._boundary_cache[key]

    def start(self, noise: torch.Tensor, t0: float | None = None) -> torch.Tensor:
        """Pure noise -> the input of a first step at `t0` (None: the trained first timestep). EDM scales unit noise
        by that sigma: sampled at other timesteps than the trained ones, by the sampled first one."""
        if self.schedule.kind == "edm":
            return noise * float(self.timesteps[0] if t0 is None else t0)
        return noise

    def renoise(self, x0, t_next: float, noise):
        tt = torch.full((x0.shape[0],), float(t_next), device=x0.device)
        return self.schedule.add_noise(x0, noise, tt)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond=None, timesteps: list[float] | None = None,
               generator: torch.Generator | None = None, every_step: bool = False,
               step_noise: list[torch.Tensor] | None = None):
        """K-step sampling; `generator` draws the between-step noise in the order LCMScheduler does.
        `every_step`: return the list of every step's x0 output (the last is the sample), same draws.
        `step_noise`: the K-1 between-step noises (each shaped like `noise`), given instead of drawn."""
        ts = self.timesteps if timesteps is None else [float(t) for t in timesteps]
        x, outs = self.start(noise, ts[0]), []
        for k, t in enumerate(ts):
            x0 = self.denoise(x, t, cond)
            if every_step:
                outs.append(x0)
            if k + 1 < len(ts):
                if step_noise is not None:
                    z = step_noise[k].to(x0.device, x0.dtype)
                else:   # drawn on the generator's device, then moved, as diffusers' randn_tensor (LCMScheduler)
                    # does: a CPU generator with a GPU student, and the same draws
                    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                                    device=x0.device if generator is None else generator.device).to(x0.device)
                x = self.renoise(x0, ts[k + 1], z)
        return outs if every_step else x0

    def forward(self, noise: torch.Tensor, cond=None, step: int | None = None, return_steps: bool = False):
        """Training sample with backward simulation: sample i is the output of step k_i, drawn uniformly from
        `train_steps` (1..K unless configured). `return_steps` also returns k (1-based, shape (N,)).

        `step` (1-based) fixes k for the whole batch. With `per_sample_step` each sample draws its own k, so
        every batch (and so every critic update) sees outputs of all K steps; otherwise one k is drawn per
        batch, as DMD2's reference code does (one k per iteration, shared by all GPUs). On digits the two gave
        the same 4-step FD within the spread between runs (docs/results.md).
        """
        n, allowed = noise.shape[0], torch.tensor(self.train_steps, device=noise.device)
        if step is not None:
            ks = torch.full((n,), int(step), device=noise.device)
        elif self.per_sample_step:
            ks = allowed[batch_split.randint(0, len(allowed), n, device=noise.device)]
        else:
            ks = allowed[torch.randint(0, len(allowed), (), device=noise.device)].expand(n)
        if step is not None or not self.per_sample_step or len(allowed) == 1:
            return self._run_to_step(noise, cond, ks, return_steps)
        x, idx = self.start(noise), torch.arange(noise.shape[0], device=noise.device)
        outs, out_idx = [], []
        last = max(self.train_steps)
        for i, t in enumerate(self.timesteps[:last]):
            here = ks[idx] == i + 1
            if here.any():  # these samples stop at step i+1: the trained step, with gradient
                outs.append(self.denoise(x[here], t, _take(cond, here)))
                out_idx.append(idx[here])
            idx, x, cond = idx[~here], x[~here], _take(cond, ~here)
            if i + 1 == last:
                break
            # the rest run this step without gradient and are re-noised with fresh noise, drawn for the whole batch
            # and taken at their rows: a sample's noise does not depend on which of its neighbours stopped earlier,
            # or on how the batch is split over processes. Drawn even where none of this process's rows go on, so
            # every process (and every micro-batch) makes the draws one process makes for the global batch.
            z = batch_split.randn_like(noise)
            if idx.numel():
                with torch.no_grad():
                    x0 = self.denoise(x, t, cond)
                    x = self.renoise(x0, self.timesteps[i + 1], z[idx])
        out, order = torch.cat(outs), torch.cat(out_idx)
        out = out[torch.argsort(order)]
        return (out, ks) if return_steps else out

    def _run_to_step(self, noise, cond, ks, return_steps: bool):
        """The whole batch exits at the same step k: the same computation and random draws as the masked loop
        above, without its gathers and scatters (the one-step student's only path)."""
        k = int(ks[0]) if ks.numel() else 1
        x = self.start(noise)
        with torch.no_grad():
            for i in range(k - 1):
                x0 = self.denoise(x, self.timesteps[i], cond)
                x = self.renoise(x0, self.timesteps[i + 1], batch_split.randn_like(noise))
        out = self.denoise(x, self.timesteps[k - 1], cond)
        return (out, ks) if return_steps else out


def _take(cond, mask):
    return None if cond is None else cond[mask]
