"""Few-step pipelines: UNet2DModel students (unconditional or class-conditional) and low-dimensional (MLP) ones."""
from __future__ import annotations

import contextlib
import logging

import torch
from diffusers import DiffusionPipeline, LCMScheduler, ModelMixin
from diffusers.schedulers import scheduling_lcm
from diffusers.utils.torch_utils import randn_tensor

from ..generator import nearest_index
from ..prediction import edm_coefficients, x0_from_output
from ..schedules import make_schedule
from .step_experts import StepExpertsModel

OUTPUT_TYPES = ("pt", "np", "pil")


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _FewStep(DiffusionPipeline):
    def _given_or_trained(self, num_inference_steps, timesteps) -> list | None:
        """`timesteps`, else the trained ones when no count or the trained count is asked for (a student need not be
        trained at the schedule's K-step timesteps, as FewStepGenerator.sampling_timesteps), else None: the
        schedule's own K-step ones."""
        if timesteps is None and num_inference_steps in (None, len(self.config.trained_timesteps)):
            return list(self.config.trained_timesteps)
        if timesteps is None:
            self._check_steps(num_inference_steps)
        return timesteps

    def _check_steps(self, num_inference_steps) -> None:
        """A count the scheduler cannot take, as one line (not LCMScheduler's ZeroDivisionError for 0, or its
        message about `strength` for more than its original_inference_steps); the same bound and wording as
        FewStepGenerator.default_timesteps (stepdistill-sample's steps=K)."""
        k = num_inference_steps
        try:
            whole = not isinstance(k, bool) and int(k) == k
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole or k < 1:
            raise ValueError(f"num_inference_steps={k}: a student samples in a whole number of steps, at least 1")
        most = None if self.scheduler is None else self.scheduler.config.get("original_inference_steps")
        if most is not None and k > most:   # LCMScheduler picks its K timesteps among these many
            raise ValueError(f"num_inference_steps={k}: a student on a discrete schedule samples in at most "
                             f"{most} steps (LCMScheduler's original_inference_steps)")

    def _timesteps(self, num_inference_steps, timesteps):
        """LCMScheduler's timesteps for the call: given, trained, or its own K-step ones."""
        timesteps = self._given_or_trained(num_inference_steps, timesteps)
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if timesteps == [int(t) for t in self.config.trained_timesteps]:
                # the student's own timesteps: LCMScheduler's warnings that a custom schedule (not starting at 999,
                # off its 50-step grid) "may give unexpected results" are about other timesteps than trained ones
                with _quiet(scheduling_lcm.logger):
                    self.scheduler.set_timesteps(timesteps=timesteps)
            else:
                self.scheduler.set_timesteps(timesteps=timesteps)
        else:
            self.scheduler.set_timesteps(int(num_inference_steps))
        return self.scheduler.timesteps

    def _loop(self, x, model_fn, timesteps, generator):
        for t in self.progress_bar(timesteps):
            x = self.scheduler.step(model_fn(x, t), t, x, generator=generator).prev_sample
        return x


class _ImageFewStep(_FewStep):
    def __init__(self, unet: ModelMixin, scheduler: LCMScheduler, trained_timesteps: list[int] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(trained_timesteps=list(trained_timesteps or [999]))

    def _images(self, n, labels, num_inference_steps, timesteps, generator, output_type):
        if output_type not in OUTPUT_TYPES:   # before sampling
            raise ValueError(f"output_type={output_type!r}: use one of {', '.join(OUTPUT_TYPES)}")
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        x = randn_tensor((n, cfg.in_channels, *size), generator=generator, device=self.device, dtype=self.unet.dtype)
        ts = self._timesteps(num_inference_steps, timesteps)
        x = self._loop(x, lambda x, t: self.unet(x, t, class_labels=labels).sample, ts, generator)
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return images if output_type == "np" else self.numpy_to_pil(images)


class ClassConditionalFewStepPipeline(_ImageFewStep):
    """`pipe(class_labels=[...], num_inference_steps=K or timesteps=[...])` -> images in [0, 1]: (N, C, H, W)
    (`output_type="pt"`), (N, H, W, C) numpy (`"np"`) or a list of PIL images (`"pil"`)."""

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int | None = None, timesteps=None,
                 generator: torch.Generator | None = None, output_type: str = "pt"):
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        cfg = self.unet.config   # a StepExpertsModel keeps its experts' config under expert_config
        n = cfg.get("num_class_embeds") or (cfg.get("expert_config") or {}).get("num_class_embeds")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < n):   # not a bare IndexError
            raise ValueError(f"class_labels must lie in 0..{n - 1} (the UNet's {n} class embeddings), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return self._images(labels.numel(), labels, num_inference_steps, timesteps, generator, output_type)


class UnconditionalFewStepPipeline(_ImageFewStep):
    """`pipe(batch_size=N, num_inference_steps=K or timesteps=[...])` -> images as ClassConditionalFewStepPipeline's.

    For an unconditional UNet2DModel trained at other timesteps than LCMScheduler's: stock `DDPMPipeline` (the
    export of the others) cannot be given timesteps."""

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, timesteps=None,
                 generator: torch.Generator | None = None, output_type: str = "pt"):
        return self._images(batch_size, None, num_inference_steps, timesteps, generator, output_type)


class PointsFewStepPipeline(_FewStep):
    """A few-step student on vectors (e.g. the GMM benchmark): `pipe(batch_size=N)` -> (N, dim) samples.

    On a discrete VP schedule the scheduler is an LCMScheduler with prediction_type="sample": the network's native
    output is turned into x0 here (stepdistill's prediction types, e.g. EDM preconditioning), then LCM's boundary
    condition applies. On another schedule (EDM, flow; `schedule` holds its `to_config()`) there is no
    scheduler: the pipeline steps as `FewStepGenerator.sample` does.
    """

    _optional_components = ["scheduler"]   # None off a discrete schedule

    # `scheduler` has no default: diffusers loads only the arguments without one as components
    def __init__(self, net: ModelMixin, scheduler: LCMScheduler | None, trained_timesteps: list | None = None,
                 prediction_type: str = "edm", sigma_data: float = 0.5, schedule: dict | None = None):
        super().__init__()
        self.register_modules(net=net, scheduler=scheduler)
        self.register_to_config(trained_timesteps=list(trained_timesteps or [999]), prediction_type=prediction_type,
                                sigma_data=sigma_data, schedule=schedule)
        self._schedule = None if schedule is None else make_schedule(**schedule)   # built once, not per step

    def _x0(self, x, t):
        net, t_in = self.net, torch.full((x.shape[0],), float(t), device=x.device)
        if self.config.schedule is None:   # the LCMScheduler's discrete VP schedule: t indexes it
            ac = self.scheduler.alphas_cumprod.to(x.device)[int(t)]
            a, s = ac.sqrt().float(), (1 - ac).sqrt().float()
        else:
            sched = self._schedule
            a, s = (v.float()[:, None] for v in sched.alpha_sigma(t_in))
            t_in = sched.net_time(t_in)
            if isinstance(net, StepExpertsModel):   # routed by t itself: the network's time input is not t here
                net = net.experts[nearest_index(self.config.trained_timesteps, float(t))]
        x_in = x * edm_coefficients(a, s, self.config.sigma_data)[0] if self.config.prediction_type == "edm" else x
        out = net(x_in.to(net.dtype), t_in).float()   # the x0 arithmetic in float32 whatever the net's dtype
        return x0_from_output(out, x.float(), a, s, self.config.prediction_type, self.config.sigma_data)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, timesteps=None,
                 generator: torch.Generator | None = None):
        x = randn_tensor((batch_size, self.net.config.dim), generator=generator, device=self.device)
        if self.config.schedule is None:
            return self._loop(x, self._x0, self._timesteps(num_inference_steps, timesteps), generator)
        sched = self._schedule
        timesteps = self._given_or_trained(num_inference_steps, timesteps)
        if timesteps is None:   # the ODE grid's K steps, as FewStepGenerator.default_timesteps off a discrete schedule
            timesteps = sched.ode_timesteps(int(num_inference_steps)).tolist()
        ts = [float(t) for t in timesteps]
        if sched.kind == "edm":   # unit noise -> the first step's sigma, as FewStepGenerator.start
            x = x * ts[0]
        for k, t in enumerate(self.progress_bar(ts)):   # no LCM boundary condition off a discrete schedule
            x0 = self._x0(x, t)
            if k + 1 < len(ts):   # re-noised to the next timestep with fresh noise
                z = randn_tensor(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
                x = sched.add_noise(x0, z, torch.full((x0.shape[0],), ts[k + 1], device=self.device))
        return x0
