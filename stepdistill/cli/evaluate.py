"""`stepdistill-eval run_dir=D [checkpoint=STEP] [steps=K] [num_samples=N] [every_step=true] [eval.*=...]`:
recompute the run's configured metrics on its latest checkpoint (or that step's), logged at the checkpoint's step.
`eval.*` overrides change the run's evaluation settings for this evaluation only (recorded with it as
`eval_overrides`), e.g. `eval.fid.inception_weights=PATH` adds Inception FID after training and `eval.seed=S`
draws another set of evaluation noise.

`every_step=true` scores each step's x0 output along the K-step sampling chain instead (the last is the sample),
prints them as a table and writes a sample figure per step: where a multi-step student gains or loses quality.

Each evaluation is appended to the run's metrics.jsonl as a `kind=eval` record with `source`: "stepdistill-eval"
("stepdistill-eval steps=K" at another step count than the trained one, "stepdistill-eval every_step"), and
`student_steps`, the count it sampled: curves.png and stepdistill-compare tell it from the training's own. Its sample
grid is samples/step_XXXXXXX_eval.png (steps=K: step_XXXXXXX_Ksteps_eval.png), beside the grid training wrote for
that step, and its path is printed (`figure`); a later evaluation of the same checkpoint writes _eval_2.png, _eval_3.png
and so on rather than replacing it. teacher_steps=, benchmark=, out= and seed= are refused: it would
ignore them, as are a training run's eval.every, eval.final and eval.final_num_samples. The teacher's reference
metrics follow the run's eval.teacher_reference (or this command's).
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..checks import at_least, eval_sample_count, run_folder
from . import CONF_DIR, checked_groups, pick_device, pipe_table, refuse_unused, set_threads, user_errors

# what stepdistill-eval does not use, and what to do instead; any other unused setting: leave it out
UNUSED = {
    "teacher_steps": "stepdistill-eval's teacher reference samples at the run's own benchmark.teacher_steps, as "
                     "training's evaluations do: leave it out (the student's steps are steps=K; "
                     "stepdistill-sample benchmark=NAME teacher_steps=K samples a teacher)",
    "benchmark": "stepdistill-eval evaluates the run on its own benchmark (run_dir=D's config.yaml): leave it out",
    "out": "stepdistill-eval writes into run_dir=D (metrics.jsonl and samples/): leave it out",
    "seed": "stepdistill-eval's noise seed is the run's eval.seed: use eval.seed=S",
}
EVAL_USES = ("run_dir", "checkpoint", "steps", "num_samples", "every_step", "eval", "device", "num_threads")


# the evaluation settings of a training run only: stepdistill-eval evaluates once, at num_samples=N (or eval.num_samples)
TRAINING_ONLY = ("eval.every", "eval.final", "eval.final_num_samples")


def evaluate_run(run_dir, steps=None, overrides=None, teacher_reference: bool | None = None,
                 every_step: bool = False, checkpoint=None, device: str | None = None) -> dict:
    """Evaluate the run's latest checkpoint (or `checkpoint`: a step number or one of its checkpoint folders),
    logged at its step; the networks on `device` (None: the CPU). `teacher_reference` None: the run's
    eval.teacher_reference (after `overrides`)."""
    from ..train.checkpoint import checkpoint_step
    from ..train.evaluation import Evaluator
    from ..train.loggers import MetricsLogger
    from ..train.setup import find_checkpoint, load_run

    run_dir = run_folder(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    own = (run_dir / "checkpoints").resolve()
    if ckpt.resolve().parent != own:   # its metrics would be logged as this run's, at the foreign step
        raise ValueError(f"checkpoint={checkpoint} is not one of {own}'s checkpoints: stepdistill-eval logs into "
                         f"run_dir's metrics.jsonl, so evaluate it with run_dir= its own run folder "
                         f"({ckpt.resolve().parent.parent})")
    run = load_run(run_dir, overrides, ckpt, device)
    step = checkpoint_step(run.checkpoint)   # not trainer.max_steps: a stopped run's latest step is earlier
    evaluator = Evaluator(run, Path(run_dir))
    if teacher_reference is None:
        teacher_reference = bool(run.cfg.eval.get("teacher_reference", True))
    if every_step:
        metrics = evaluator.evaluate_every_step(step, steps)
    else:
        metrics = evaluator.evaluate(step, teacher_reference, steps, figure_tag="_eval")
    # who wrote the record (curves.png and stepdistill-compare tell it from the training's own evaluations) and
    # at which step count: an evaluation at another count than the trained one has its own source, so that
    # metrics.jsonl's readers (one record per kind, step and source) keep it apart from one at the trained count
    trained = run.student().num_steps
    metrics["source"] = "stepdistill-eval" + (" every_step" if every_step else "")
    if not every_step and steps is not None and int(steps) != trained:
        metrics["source"] += f" steps={int(steps)}"
    if overrides:   # what this evaluation changed against the run's own settings
        metrics["eval_overrides"] = list(overrides)
    if steps is not None:
        metrics["student_steps"] = int(steps)
    elif not every_step:
        metrics["student_steps"] = trained
    # curves.png draws the training's own evaluations; this one (maybe at other steps or settings) is not one
    MetricsLogger(Path(run_dir), "console", resume=True, console=False, curves=False).log(step, metrics, kind="eval")
    return metrics


@checked_groups("stepdistill-eval", "sample")
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sample")
@user_errors("stepdistill-eval")
def main(cfg: DictConfig) -> None:
    # the input first, before torch and diffusers load: a wrong count or path fails at once. The run's own
    # evaluation settings, changed by this command's eval.* overrides and num_samples=N:
    overrides = [o for o in HydraConfig.get().overrides.task if o.startswith("eval.")]
    for o in overrides:
        if o.split("=")[0] in TRAINING_ONLY:   # accepted, recorded as applied and ignored before
            raise ValueError(f"{o}: {o.split('=')[0]} is a training run's setting; stepdistill-eval evaluates the "
                             "checkpoint once (its sample count: num_samples=N): leave it out")
    # as stepdistill-train refuses it (the value an integer already: override_types.py)
    if any(o.startswith("eval.num_samples=") for o in overrides):
        eval_sample_count("eval.num_samples", cfg.eval.num_samples)
    if cfg.get("num_samples") is not None:
        overrides.append(f"eval.num_samples={at_least('num_samples', cfg.num_samples, 2)}")   # a covariance needs 2
    steps = None if cfg.get("steps") is None else at_least("steps", cfg.steps)
    run_dir = run_folder(cfg.get("run_dir"))
    set_threads(cfg.get("num_threads"))
    device = pick_device(cfg.get("device"))
    refuse_unused("stepdistill-eval", EVAL_USES, UNUSED)   # a setting it would ignore: refused, saying what to do
    every_step = bool(cfg.get("every_step", False))
    metrics = evaluate_run(run_dir, steps, overrides, every_step=every_step, checkpoint=cfg.get("checkpoint"),
                           device=device)
    print(every_step_table(metrics) if every_step else json.dumps(metrics, indent=2))
    if every_step:
        figures = metrics["figures"]
        print(f"figures: {figures[0]}" + (f" .. {figures[-1]}" if len(figures) > 1 else ""))


def every_step_table(metrics: dict) -> str:
    """One row per step of the chain, one column per scalar metric."""
    ts = metrics["timesteps"]
    scalars = {k.split("_", 2)[2] for k in metrics if k.startswith("student_step1_")
               and isinstance(metrics[k], (int, float))}
    from ..eval.curves import BOOKKEEPING   # the counts behind the metrics (samples, resamples, k) go below the table
    names = sorted(n for n in scalars if not any(b in n for b in BOOKKEEPING))
    counts = ", ".join(f"{n} {metrics[f'student_step1_{n}']}" for n in sorted(scalars - set(names)))
    rows = []
    for k, t in enumerate(ts, start=1):
        vals = [metrics.get(f"student_step{k}_{n}") for n in names]
        rows.append([str(k), f"{t:g}", *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals)])
    return pipe_table(["step", "t", *names], rows) + (f"\nper step: {counts}" if counts else "")


if __name__ == "__main__":
    main()
