"""Loading a diffusers UNet2DModel teacher from a local folder (no hub, no remote code).

Accepted layouts (what `save_pretrained` writes):
  DIR/unet/ + DIR/scheduler/        (a pipeline-style folder; the shipped digits teacher)
  DIR/ (config.json + weights) and DIR/scheduler/ or DIR/scheduler_config.json
An optional DIR/stepdistill_teacher.json holds what diffusers' configs cannot say: the null class used for
classifier-free guidance, the default guidance and sampler steps.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .denoiser import NetworkDenoiser
from .prediction import check_prediction_type
from .schedules import VPSchedule

log = logging.getLogger("stepdistill")
SUPPORTED_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")


def scheduler_config(root: Path) -> dict:
    for cand in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
                 root.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return json.loads(cand.read_text())
    raise FileNotFoundError(f"no scheduler config under {root}: expected {root}/scheduler/scheduler_config.json "
                            "(save the teacher's DDPMScheduler with save_pretrained)")


def vp_schedule(sched_cfg: dict) -> VPSchedule:
    """The VP schedule a diffusers scheduler config describes (DDPM/DDIM-style betas), with alphas_cumprod as
    diffusers builds them: `trained_betas` in place of the named beta_schedule, and `rescale_betas_zero_snr`'s
    zero terminal SNR. Settings that would give other alphas_cumprod than the ones built here are an error, not
    silently dropped; so is an epsilon-prediction teacher on a zero-terminal-SNR schedule (its x0 divides by
    alpha = 0 at the noisiest timestep)."""
    name = sched_cfg.get("_class_name", "the scheduler")
    trained = sched_cfg.get("trained_betas")
    if "beta_schedule" not in sched_cfg and trained is None:   # flow matching, EDM and consistency schedulers
        raise ValueError(f"teacher scheduler {name} has no beta_schedule: UNet teachers need a DDPM-style (betas) "
                         "VP scheduler config, e.g. DDPMScheduler's or DDIMScheduler's")
    beta = sched_cfg.get("beta_schedule", "linear")   # diffusers' default; ignored where trained_betas are given
    if trained is None and beta not in SUPPORTED_BETAS:
        raise ValueError(f"teacher scheduler beta_schedule {beta!r} is not supported: use one of {SUPPORTED_BETAS} "
                         "(or save the scheduler with its betas as trained_betas)")
    time_input = sched_cfg.get("timestep_type", "discrete")
    if time_input != "discrete":   # EulerDiscreteScheduler's "continuous" feeds the UNet 0.25 log sigma (CosXL)
        raise ValueError(f"teacher scheduler {name} sets timestep_type={time_input!r}: its UNet takes 0.25 log sigma "
                         "as its time input, not the timestep index stepdistill feeds VP teachers; only "
                         "timestep_type 'discrete' teachers are supported")
    zero_snr = bool(sched_cfg.get("rescale_betas_zero_snr", False))
    try:
        schedule = VPSchedule(sched_cfg.get("num_train_timesteps", 1000), beta, sched_cfg.get("beta_start", 0.0001),
                              sched_cfg.get("beta_end", 0.02), trained_betas=trained, rescale_betas_zero_snr=zero_snr)
    except ValueError as e:
        raise ValueError(f"teacher scheduler {name}: {e}") from None
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if schedule.zero_terminal_snr and prediction == "epsilon":
        why, plain = (("sets rescale_betas_zero_snr", "rescale_betas_zero_snr=false") if zero_snr else
                      ("has trained_betas ending in 1", "trained_betas whose last is below 1"))
        raise ValueError(f"teacher scheduler {name} {why} (zero terminal SNR: alpha = 0 at the last timestep) with "
                         "prediction_type 'epsilon', whose x0 = (x_t - sigma eps) / alpha divides by 0 there: "
                         "zero-terminal-SNR teachers are trained with v-prediction, so set the scheduler's "
                         "prediction_type to the one the UNet was trained with ('v_prediction' or 'sample'), or "
                         f"save it with {plain} if it was trained on those")
    return schedule


def teacher_info(path: str | Path) -> dict:
    """The teacher's record (null class, default guidance and sampler steps): in the teacher folder, or in its
    parent when the path names the folder's unet/ (whose scheduler the loader also finds there)."""
    root = Path(path).expanduser()
    for f in (root / "stepdistill_teacher.json", root.parent / "stepdistill_teacher.json"):
        if f.is_file() and (f.parent == root or (root / "config.json").is_file()):
            return json.loads(f.read_text())
    return {}


def load_unet_teacher(path: str | Path, prediction_type: str | None = None, null_class: int | None = None,
                      device="cpu") -> NetworkDenoiser:
    from diffusers import UNet2DModel

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"teacher path {root} does not exist: set benchmark.teacher.path to a local folder "
                                "holding a diffusers UNet2DModel (unet/ and scheduler/ from save_pretrained)")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"teacher path {root} has no unet/config.json or config.json: point "
                                "benchmark.teacher.path at a folder written by UNet2DModel.save_pretrained")
    sched_cfg = scheduler_config(root)
    schedule = vp_schedule(sched_cfg)
    native = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type is not None and check_prediction_type(prediction_type) != native:
        raise ValueError(f"benchmark.teacher.prediction_type={prediction_type!r} does not match the teacher's scheduler, "
                         f"which says {native!r}: remove the override or set it to {native!r}")
    unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True).to(device).eval()
    if unet.config.out_channels != unet.config.in_channels:   # e.g. a learned-variance head (2C outputs)
        raise ValueError(f"teacher UNet at {unet_dir} maps {unet.config.in_channels} input channels to "
                         f"{unet.config.out_channels}: only UNets whose output is one prediction per input channel "
                         "(epsilon, v or sample) are supported")
    info = teacher_info(root)
    if null_class is None:
        null_class = info.get("null_class")
    classes = unet.config.num_class_embeds
    if null_class is None and classes:
        null_class = classes - 1  # convention: the last class embedding is "no label"
        log.warning("teacher %s records no null class (stepdistill_teacher.json): CFG takes its last class embedding, "
                    "%d, as 'no label'; set benchmark.teacher.null_class if it was trained otherwise", root, null_class)
    elif null_class is not None and not (classes and 0 <= int(null_class) < classes):
        raise ValueError(f"benchmark.teacher.null_class={null_class}: the teacher UNet has "
                         f"{classes or 'no'} class embeddings" + (f", use 0..{classes - 1}" if classes else
                                                                  ", leave it null"))
    null_class = None if null_class is None else int(null_class)
    for p in unet.parameters():
        p.requires_grad_(False)
    return NetworkDenoiser(unet, schedule, native, null_class=null_class)

