"""Write the student as a diffusers folder (DESIGN §5): stock `DDPMPipeline` + `LCMScheduler` for an
unconditional UNet2DModel, `ClassConditionalFewStepPipeline` for a class-conditional one, and
`PointsFewStepPipeline` for MLP students. The folder is written beside its target and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffusers import DDPMPipeline, LCMScheduler

from ..networks.mlp import TimeMLP
from ..pipelines import ClassConditionalFewStepPipeline, PointsFewStepPipeline


def lcm_scheduler_for(student, prediction_type: str) -> LCMScheduler:
    sched = student.schedule
    if not sched.discrete:
        raise ValueError(f"export to an LCMScheduler needs a discrete VP schedule, not {sched.kind!r}")
    return LCMScheduler(num_train_timesteps=sched.num_train_timesteps, beta_schedule=sched.beta_schedule,
                        beta_start=sched.beta_start, beta_end=sched.beta_end, prediction_type=prediction_type,
                        timestep_scaling=student.timestep_scaling, clip_sample=False, set_alpha_to_one=True)


def build_pipeline(student):
    den = student.denoiser
    net = den.net
    ts = [int(t) for t in student.timesteps]
    if isinstance(net, TimeMLP):
        return PointsFewStepPipeline(net, lcm_scheduler_for(student, "sample"), ts, den.prediction_type,
                                     den.sigma_data)
    if type(net).__name__ != "UNet2DModel":
        raise ValueError(f"no diffusers export for a {type(net).__name__} student yet")
    scheduler = lcm_scheduler_for(student, den.prediction_type)
    if net.config.num_class_embeds:
        return ClassConditionalFewStepPipeline(net, scheduler, ts)
    return DDPMPipeline(unet=net, scheduler=scheduler)


def export_run(run, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    student = run.student()
    pipe = build_pipeline(student)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {"pipeline": type(pipe).__name__, "trained_timesteps": [int(t) for t in student.timesteps],
            "benchmark": run.cfg.benchmark.name, "method": run.cfg.method.name,
            "load": ("from diffusers import DDPMPipeline" if isinstance(pipe, DDPMPipeline)
                     else f"from stepdistill.pipelines import {type(pipe).__name__}")}
    (tmp / "stepdistill_student.json").write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
