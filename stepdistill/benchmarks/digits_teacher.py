"""Training the shipped digits teacher: a class-conditional v-prediction UNet2DModel on a cosine VP schedule.

Label dropout to the null class (10) lets the teacher do classifier-free guidance. The saved weights are the EMA
weights, written as a diffusers folder: unet/ + scheduler/ (DDPMScheduler) + stepdistill_teacher.json.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ..denoiser import NetworkDenoiser
from ..schedules import VPSchedule
from ..train.ema import update_ema

NULL_CLASS = 10


def digits_schedule() -> VPSchedule:
    return VPSchedule(1000, "squaredcos_cap_v2")


def train_digits_teacher(out_dir, steps: int = 8000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                         label_dropout: float = 0.1, ema_decay: float = 0.999, progress: bool = True,
                         unet_overrides: dict | None = None) -> dict:
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ..data.digits import load_digits_tensor
    from ..networks.unet import build_digits_unet

    torch.manual_seed(seed)
    images, labels = load_digits_tensor()
    unet = build_digits_unet(**(unet_overrides or {}))
    ema = copy.deepcopy(unet).requires_grad_(False)
    den = NetworkDenoiser(unet, digits_schedule(), "v_prediction", null_class=NULL_CLASS)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    t0 = time.time()
    bar = tqdm(range(steps), desc="digits teacher", disable=not progress)
    for step in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,))
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch_size) < label_dropout] = NULL_CLASS  # so the teacher also learns p(x) for CFG
        t = den.schedule.sample_t(batch_size, 0.0, 1.0)
        loss = den.denoising_loss(x0, t, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        update_ema(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    out = Path(out_dir)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=False).save_pretrained(out / "scheduler")
    info = {"num_classes": 10, "null_class": NULL_CLASS, "prediction_type": "v_prediction",
            "schedule": digits_schedule().to_config(), "default_guidance": 1.0, "default_sampler_steps": 20,
            "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                         "label_dropout": label_dropout, "ema_decay": ema_decay,
                         "wall_seconds": round(time.time() - t0, 1), "final_loss": loss.item()}}
    (out / "stepdistill_teacher.json").write_text(json.dumps(info, indent=2))
    return info


def update_teacher_info(path, **fields) -> dict:
    f = Path(path) / "stepdistill_teacher.json"
    info = json.loads(f.read_text())
    info.update(fields)
    f.write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def measure_teacher_quality(path, guidances=(1.0, 1.5, 2.0, 3.0), steps: int = 20, seed: int = 0,
                            feature_net=None) -> dict:
    """Teacher FD vs the 1,797 real digits (as many samples, labels following the real label counts) for each
    guidance scale, the feature net's accuracy on the samples' labels, and a real-vs-real reference FD."""
    from ..data.digits import load_digits_tensor, split_indices, to_unit
    from ..eval.fid import frechet_distance
    from ..networks.digits_features import load_feature_net
    from ..samplers import ddim_sample
    from ..teachers import load_unet_teacher

    teacher = load_unet_teacher(path)
    feats = feature_net or load_feature_net()
    images, labels = load_digits_tensor()
    real01 = to_unit(images)
    a, b = split_indices(len(labels), 0.5, seed)
    report = {"real_vs_real_fd": frechet_distance(real01[a], real01[b], feats)["fd"], "num_samples": len(labels),
              "sampler": f"DDIM {steps} steps", "by_guidance": {}}
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, 8, 8, generator=gen)
    for g in guidances:
        x01 = to_unit(ddim_sample(teacher, noise, steps, labels, g))
        fd = frechet_distance(real01, x01, feats)["fd"]
        acc = (feats.classify(x01).argmax(-1) == labels).float().mean().item()
        report["by_guidance"][str(g)] = {"fd": fd, "class_accuracy": acc}
    best = min(report["by_guidance"], key=lambda k: report["by_guidance"][k]["fd"])
    report["best_guidance"] = float(best)
    return report
