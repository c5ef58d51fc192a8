"""Few-step pipelines: a class-conditional UNet2DModel student and a low-dimensional (MLP) student."""
from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, LCMScheduler, ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from ..prediction import edm_coefficients, x0_from_output


class _FewStep(DiffusionPipeline):
    def _timesteps(self, num_inference_steps, timesteps):
        if timesteps is None and num_inference_steps is None:
            timesteps = list(self.config.trained_timesteps)  # the student's own training timesteps
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=[int(t) for t in timesteps])
        else:
            self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps

    def _loop(self, x, model_fn, timesteps, generator):
        for t in self.progress_bar(timesteps):
            x = self.scheduler.step(model_fn(x, t), t, x, generator=generator).prev_sample
        return x


class ClassConditionalFewStepPipeline(_FewStep):
    """`pipe(class_labels=[...], num_inference_steps=K or timesteps=[...])` -> images in [0, 1] (N, C, H, W)."""

    def __init__(self, unet: ModelMixin, scheduler: LCMScheduler, trained_timesteps: list[int] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(trained_timesteps=list(trained_timesteps or [999]))

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int | None = None, timesteps=None,
                 generator: torch.Generator | None = None, output_type: str = "pt"):
        labels = torch.as_tensor(class_labels, device=self.device).long().reshape(-1)
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        x = randn_tensor((labels.numel(), cfg.in_channels, *size), generator=generator, device=self.device,
                         dtype=self.unet.dtype)
        ts = self._timesteps(num_inference_steps, timesteps)
        x = self._loop(x, lambda x, t: self.unet(x, t, class_labels=labels).sample, ts, generator)
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        return images.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else images


class PointsFewStepPipeline(_FewStep):
    """A few-step student on vectors (e.g. the GMM benchmark): `pipe(batch_size=N)` -> (N, dim) samples.

    The scheduler is an LCMScheduler with prediction_type="sample": the network's native output is turned into
    x0 here (stepdistill's prediction types, e.g. EDM preconditioning), then LCM's boundary condition applies.
    """

    def __init__(self, net: ModelMixin, scheduler: LCMScheduler, trained_timesteps: list[int] | None = None,
                 prediction_type: str = "edm", sigma_data: float = 0.5):
        super().__init__()
        self.register_modules(net=net, scheduler=scheduler)
        self.register_to_config(trained_timesteps=list(trained_timesteps or [999]), prediction_type=prediction_type,
                                sigma_data=sigma_data)

    def _x0(self, x, t):
        ac = self.scheduler.alphas_cumprod.to(x.device)[int(t)]
        a, s = ac.sqrt().float(), (1 - ac).sqrt().float()
        x_in = x * edm_coefficients(a, s, self.config.sigma_data)[0] if self.config.prediction_type == "edm" else x
        t_in = torch.full((x.shape[0],), float(t), device=x.device)
        out = self.net(x_in, t_in).float()
        return x0_from_output(out, x.float(), a, s, self.config.prediction_type, self.config.sigma_data)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, timesteps=None,
                 generator: torch.Generator | None = None):
        x = randn_tensor((batch_size, self.net.config.dim), generator=generator, device=self.device)
        return self._loop(x, self._x0, self._timesteps(num_inference_steps, timesteps), generator)
