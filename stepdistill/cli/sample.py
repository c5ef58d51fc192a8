"""`stepdistill-sample`: samples of a trained student (run_dir=D) or of a benchmark's teacher (benchmark=NAME).

  stepdistill-sample run_dir=D num_samples=N out=F.npz [steps=K] [seed=S] [checkpoint=STEP]
  stepdistill-sample benchmark=digits|gmm [teacher_steps=K] num_samples=N out=F.npz
Writes `samples` (float32; images in [0, 1] as N x C x H x W, points in data space), and `labels` for
class-conditional or `prompts` for text-conditional benchmarks. A setting the mode does not use (benchmark= with
run_dir=, checkpoint= without it, eval.*) is refused rather than ignored.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from ..checks import at_least, make_folder, run_folder
from . import CONF_DIR, checked_groups, pick_device, refuse_unused, set_threads, user_errors

STUDENT_USES = ("run_dir", "checkpoint", "num_samples", "out", "steps", "seed", "device", "num_threads")
TEACHER_USES = ("benchmark", "num_samples", "out", "teacher_steps", "seed", "device", "num_threads")
# what stepdistill-sample does not use, and what to do instead; any other unused setting: leave it out
UNUSED = {
    "benchmark": "a run samples its own benchmark (run_dir=D's config.yaml): leave out benchmark= (or leave out "
                 "run_dir= for that benchmark's teacher samples)",
    "checkpoint": "checkpoint= picks a trained run's checkpoint (with run_dir=D): a teacher's samples take none",
    "eval": "eval.* settings are stepdistill-eval's: leave them out",
    "every_step": "every_step= is stepdistill-eval's: leave it out",
}


def write_npz(out: str | Path, samples, labels=None) -> Path:
    """`labels`: class labels (an integer tensor, written as `labels`) or prompts (a list, written as `prompts`)."""
    out = Path(out)
    make_folder(out.parent, "out")
    arrays = {"samples": samples.float().numpy().astype(np.float32)}
    if isinstance(labels, (list, tuple)):
        arrays["prompts"] = np.array(labels)
    elif labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    tmp = out.with_name(out.name + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(out)
    except BaseException:   # a full disk, or a folder of that name: no half-written file left beside it
        tmp.unlink(missing_ok=True)
        raise
    return out


def sample_student(run_dir, num_samples: int, steps=None, seed: int = 0, batch_size: int = 1000, checkpoint=None,
                   device: str | None = None):
    """`checkpoint`: a step number or a checkpoint folder; None = the run's latest. `device`: where the student
    runs (None: the CPU); the noise is drawn on the CPU, so the samples are the same up to the device's arithmetic."""
    from ..train.evaluation import eval_inputs, student_sample
    from ..train.setup import load_run

    run = load_run(run_dir, checkpoint=checkpoint, device=device)
    student = run.student()
    noise, cond, gen = eval_inputs(run.benchmark, num_samples, seed)
    ts = None if steps is None else student.sampling_timesteps(int(steps))   # the trained ones at the trained count
    x = student_sample(student, noise, cond, ts, gen, batch_size)
    return run.benchmark.to_output(x), run.benchmark.eval_labels(num_samples)


def sample_teacher(cfg: DictConfig, num_samples: int, steps=None, seed: int = 0, batch_size: int = 1000,
                   device: str | None = None, benchmark=None):
    """`benchmark`: `cfg.benchmark` already built (else it is built here)."""
    from ..benchmarks.registry import build_benchmark
    from ..train.evaluation import eval_inputs, teacher_sample_batched

    bm = benchmark if benchmark is not None else build_benchmark(cfg.benchmark)
    if device is not None:
        bm.teacher.to(device)
    noise, cond, _ = eval_inputs(bm, num_samples, seed)
    x = teacher_sample_batched(bm, noise, cond, steps, batch_size)
    return bm.to_output(x), bm.eval_labels(num_samples)


@checked_groups("stepdistill-sample", "sample")
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sample")
@user_errors("stepdistill-sample")
def main(cfg: DictConfig) -> None:
    # the input first, before torch and diffusers load: a wrong path or count fails at once
    if cfg.num_samples is None or cfg.out is None:
        raise ValueError("give num_samples=N and out=FILE.npz")
    if not str(cfg.out).strip() or Path(str(cfg.out)).expanduser().is_dir():   # found after sampling before
        raise ValueError(f"out={cfg.out}: give the file to write, e.g. out=samples.npz")
    n = at_least("num_samples", cfg.num_samples)
    key = "steps" if cfg.get("run_dir") else "teacher_steps"
    # the other count would be ignored: refused, naming the one that applies
    if cfg.get("run_dir") and cfg.get("teacher_steps") is not None:
        raise ValueError("teacher_steps= counts the teacher's ODE steps (benchmark=NAME, no run_dir=): "
                         "a student's sampling steps are steps=K")
    if not cfg.get("run_dir") and cfg.get("steps") is not None:
        raise ValueError("steps= counts a trained student's steps (with run_dir=D): "
                         "the teacher's ODE steps are teacher_steps=K")
    steps = None if cfg.get(key) is None else at_least(key, cfg[key])
    make_folder(Path(cfg.out).parent, "out")   # before sampling, not after it
    refuse_unused("stepdistill-sample", STUDENT_USES if cfg.get("run_dir") else TEACHER_USES, UNUSED)
    run_dir = run_folder(cfg.run_dir) if cfg.get("run_dir") else None
    set_threads(cfg.get("num_threads"))
    device = pick_device(cfg.get("device"))
    if run_dir:
        samples, labels = sample_student(run_dir, n, steps, int(cfg.seed), checkpoint=cfg.get("checkpoint"),
                                         device=device)
        what, source = "samples", ""
    else:   # no run_dir: the teacher of benchmark= (the default one, digits, if not given): said in the line
        from ..benchmarks.registry import build_benchmark
        bm = build_benchmark(cfg.benchmark)
        samples, labels = sample_teacher(cfg, n, steps, int(cfg.seed), device=device, benchmark=bm)
        what = "teacher samples"
        source = f"of benchmark {cfg.benchmark.name} ({steps or bm.teacher_steps} sampler steps) "
    path = write_npz(cfg.out, samples, labels)
    print(f"wrote {samples.shape[0]} {what} {tuple(samples.shape[1:])} {source}to {path}")
    if warning := nonfinite_warning(samples, student=bool(run_dir)):
        print(f"stepdistill-sample: warning: {warning}", file=sys.stderr)


def nonfinite_warning(samples, student: bool) -> str | None:
    """A line when some samples hold NaN or inf (written as they are: a diverged student's output is worth
    looking at), which a metric or a viewer downstream would otherwise meet without a word."""
    import torch
    bad = int((~torch.isfinite(samples.flatten(1))).any(1).sum())
    if not bad:
        return None
    who, hint = ("the student", ": an earlier checkpoint=STEP may not") if student else ("the teacher", "")
    return f"{bad} of {samples.shape[0]} samples hold NaN or inf: {who} diverged or overflowed{hint}"


if __name__ == "__main__":
    main()
