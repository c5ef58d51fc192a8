"""Write the student as a diffusers folder (DESIGN §5): stock `DDPMPipeline` + `LCMScheduler` for an
unconditional UNet2DModel trained at LCMScheduler's K-step timesteps (`UnconditionalFewStepPipeline` for one
trained at others: DDPMPipeline takes no timesteps), `ClassConditionalFewStepPipeline` for a class-conditional
one, `PointsFewStepPipeline` for MLP students (on any schedule), and a stock `StableDiffusionPipeline` /
`StableDiffusionXLPipeline` (the teacher's VAE, text encoders and tokenizers, the student's UNet, an LCMScheduler)
for text-to-image students. A step-experts student's networks go in as one `StepExpertsModel` where the single
network would. The folder is written beside its target and renamed into place; it replaces only an earlier export
or an empty folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffusers import DDPMPipeline, LCMScheduler

from ..generator import lcm_original_steps, lcm_timesteps
from ..networks.lora import diffusers_unet, has_lora, lora_state_dict, merged_copy
from ..networks.mlp import TimeMLP
from ..networks.shared_base import AdapterView
from ..networks.text_unet import TextConditionedUNet
from ..pipelines import ClassConditionalFewStepPipeline, PointsFewStepPipeline, UnconditionalFewStepPipeline
from ..pipelines.step_experts import StepExpertsModel

STUDENT_JSON = "stepdistill_student.json"   # in every export: what export_folder may replace


def lcm_scheduler_for(student, prediction_type: str) -> LCMScheduler:
    """The exported LCMScheduler, with the student's alphas_cumprod: its betas (named, or `trained_betas`) and the
    zero-terminal-SNR rescale where the schedule has them (LCMScheduler builds both as DDPMScheduler does)."""
    sched = student.schedule
    if not sched.discrete:
        raise ValueError(f"export to an LCMScheduler needs a discrete VP schedule, not {sched.kind!r}")
    extra = {}   # only where set: the scheduler_config.json of other exports stays as it was
    if getattr(sched, "trained_betas", None) is not None:
        extra["trained_betas"] = list(sched.trained_betas)
    if getattr(sched, "rescale_betas_zero_snr", False):
        extra["rescale_betas_zero_snr"] = True
    return LCMScheduler(num_train_timesteps=sched.num_train_timesteps, beta_schedule=sched.beta_schedule,
                        beta_start=sched.beta_start, beta_end=sched.beta_end, prediction_type=prediction_type,
                        timestep_scaling=student.timestep_scaling, clip_sample=False, set_alpha_to_one=True,
                        original_inference_steps=lcm_original_steps(sched.num_train_timesteps),
                        steps_offset=1, **extra)  # steps_offset: LCM ignores it; stock SD pipelines warn unless 1


def plain_unet(unet):
    """A LoRA student's UNet with its adapter merged (stock pipelines load it as a plain UNet)."""
    if isinstance(unet, AdapterView):          # shared-base mode: the role's adapter on the shared network
        return unet.shared.merged_unet(unet.adapter)
    return merged_copy(unet) if has_lora(unet) else unet


def student_lora(unet) -> tuple[dict, int, dict] | None:
    """The student's adapter weights (diffusers keys), rank and peft config (as a dict), or None for a full-weight
    student."""
    if isinstance(unet, AdapterView):
        base, name = unet.shared.unet, unet.adapter
    elif has_lora(unet):
        base, name = unet, "default"
    else:
        return None
    config = base.peft_config[name]
    return lora_state_dict(base, name), int(config.r), config.to_dict()


LCM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")   # what LCMScheduler.step converts to x0


def check_exportable(student) -> None:
    """Refuse a student `build_pipeline` cannot write, with what to change: `stepdistill-train` asks before it
    trains (the export runs after training)."""
    net, prediction = student.denoiser.net, student.denoiser.prediction_type
    if isinstance(net, TextConditionedUNet) and student.step_experts:
        raise ValueError("text-to-image students export to stock SD pipelines, which take one UNet: "
                         "generator.step_experts has no export there yet (or set trainer.export=false)")
    if not isinstance(net, TimeMLP) and prediction not in LCM_PREDICTION_TYPES:
        # an MLP's pipeline converts its network's output itself; an image student's steps are LCMScheduler's
        raise ValueError(f"a {type(net).__name__} student exports with an LCMScheduler, which takes prediction_type "
                         f"{', '.join(LCM_PREDICTION_TYPES)}, not the teacher's {prediction!r}: set "
                         "trainer.export=false (stepdistill-sample samples the checkpoint)")


def build_pipeline(student, benchmark=None):
    check_exportable(student)
    den = student.denoiser
    net = den.net
    ts = trained_timesteps(student)
    if isinstance(net, TextConditionedUNet):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        if benchmark is None or not hasattr(benchmark, "vae"):
            raise ValueError("a text-to-image export needs the run's benchmark (its VAE, text encoder, tokenizer)")
        if benchmark.sdxl:
            return StableDiffusionXLPipeline(
                vae=benchmark.vae, text_encoder=benchmark.text_encoder, text_encoder_2=benchmark.text_encoder_2,
                tokenizer=benchmark.tokenizer, tokenizer_2=benchmark.tokenizer_2, unet=plain_unet(net.unet),
                scheduler=lcm_scheduler_for(student, den.prediction_type),
                force_zeros_for_empty_prompt=benchmark.force_zeros_for_empty_prompt)
        return StableDiffusionPipeline(vae=benchmark.vae, text_encoder=benchmark.text_encoder,
                                       tokenizer=benchmark.tokenizer, unet=plain_unet(net.unet),
                                       scheduler=lcm_scheduler_for(student, den.prediction_type), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if isinstance(net, TimeMLP):
        if not student.schedule.discrete:   # no LCMScheduler: the pipeline rebuilds the schedule and steps natively
            return PointsFewStepPipeline(step_experts_or(student, net), None, ts,
                                         den.prediction_type, den.sigma_data, student.schedule.to_config())
        return PointsFewStepPipeline(step_experts_or(student, net), lcm_scheduler_for(student, "sample"), ts,
                                     den.prediction_type, den.sigma_data)
    if type(net).__name__ != "UNet2DModel":
        raise ValueError(f"no diffusers export for a {type(net).__name__} student yet")
    scheduler = lcm_scheduler_for(student, den.prediction_type)
    if net.config.num_class_embeds:
        return ClassConditionalFewStepPipeline(step_experts_or(student, plain_unet(net)), scheduler, ts)
    unet = step_experts_or(student, plain_unet(net))
    if (len(ts) <= lcm_original_steps(student.schedule.num_train_timesteps)
            and ts == lcm_timesteps(len(ts), student.schedule.num_train_timesteps)):
        return DDPMPipeline(unet=unet, scheduler=scheduler)   # num_inference_steps=K samples the trained timesteps
    return UnconditionalFewStepPipeline(unet, scheduler, ts)


def trained_timesteps(student) -> list:
    """The student's timesteps as written to the export: integers on a discrete schedule, else floats (EDM sigmas)."""
    return [int(t) if student.schedule.discrete else float(t) for t in student.timesteps]


def step_experts_or(student, net):
    """`net` itself, or for a step-experts student every step's network wrapped as one StepExpertsModel."""
    if not student.step_experts:
        return net
    later = [d.net if isinstance(d.net, TimeMLP) else plain_unet(d.net) for d in student.later_experts]
    return StepExpertsModel.from_experts([net, *later], trained_timesteps(student))


def export_folder(out_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """`out_dir` resolved, if the export may replace it: not the run folder or one holding it, and either new, empty
    or an earlier export (everything in it is deleted)."""
    out, run = Path(out_dir).resolve(), None if run_dir is None else Path(run_dir).resolve()
    if run is not None and (out == run or out in run.parents):
        raise ValueError(f"out={out_dir} would replace the run folder {run}: export to a new folder, "
                         "or leave out= unset for its export/")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / STUDENT_JSON).is_file())):
        raise ValueError(f"out={out_dir} exists and is not an earlier export (no {STUDENT_JSON}): "
                         "pick an empty or new folder")
    return out


def export_run(run, out_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """Write `run`'s student to `out_dir` (see export_folder; `run_dir`: the run's folder, which is never replaced)."""
    out_dir = export_folder(out_dir, run_dir)
    student = run.student()
    pipe = build_pipeline(student, getattr(run, "benchmark", None))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    lora = student_lora(diffusers_unet(student.denoiser)) if hasattr(pipe, "save_lora_weights") else None
    if lora:  # also the adapter alone: teacher_pipe.load_lora_weights(export_dir) makes the student
        # with the adapter's config: without it load_lora_weights takes alpha = rank, and an adapter trained with
        # another lora_alpha loads at rank / alpha of its strength
        type(pipe).save_lora_weights(tmp, unet_lora_layers=lora[0], safe_serialization=True,
                                     unet_lora_adapter_metadata=lora[2])
    info = {"pipeline": type(pipe).__name__, "trained_timesteps": trained_timesteps(student),
            "benchmark": run.cfg.benchmark.name, "method": run.cfg.method.name,
            "load": (f"from diffusers import {type(pipe).__name__}" if type(pipe).__module__.startswith("diffusers")
                     else f"from stepdistill.pipelines import {type(pipe).__name__}")}
    if lora:
        info["lora"] = {"weights": "pytorch_lora_weights.safetensors", "rank": lora[1],
                        "apply": "teacher_pipe.load_lora_weights(export_dir) (optionally teacher_pipe.fuse_lora())"}
    if isinstance(pipe, DDPMPipeline):   # its own default, 1000 steps, is more than an LCMScheduler takes
        info["sample"] = f"pipe(num_inference_steps={len(info['trained_timesteps'])})  # the trained timesteps"
    if isinstance(student.denoiser.net, TextConditionedUNet):
        # a resolution other than the UNet's default must be passed: the pipeline would make its default size (and,
        # for SDXL, other size conditioning) otherwise
        res = getattr(getattr(run, "benchmark", None), "resolution", None)
        default = pipe.unet.config.sample_size * pipe.vae_scale_factor
        size = "" if res is None or res == default else f", height={res}, width={res}"
        info["sample"] = (f"pipe(prompt, timesteps={info['trained_timesteps']}, guidance_scale=1.0{size})  "
                          "# the trained timesteps; the student needs no CFG")
    (tmp / STUDENT_JSON).write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
