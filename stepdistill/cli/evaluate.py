"""`stepdistill-eval run_dir=D [steps=K] [eval.num_samples=N]`: recompute the run's configured metrics."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import CONF_DIR, set_threads, user_errors


def evaluate_run(run_dir, steps=None, overrides=None, teacher_reference: bool = True) -> dict:
    from ..train.evaluation import Evaluator
    from ..train.loggers import MetricsLogger
    from ..train.setup import load_run

    run = load_run(run_dir, overrides)
    step = int(run.cfg.trainer.max_steps)
    metrics = Evaluator(run, Path(run_dir)).evaluate(step, teacher_reference, steps)
    metrics["source"] = "stepdistill-eval"
    if steps is not None:
        metrics["student_steps"] = int(steps)
    MetricsLogger(Path(run_dir), "console", resume=True, console=False).log(step, metrics, kind="eval")
    return metrics


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sample")
@user_errors("stepdistill-eval")
def main(cfg: DictConfig) -> None:
    set_threads(cfg.get("num_threads"))
    if not cfg.get("run_dir"):
        raise ValueError("give run_dir=D (a stepdistill-train run folder)")
    overrides = [f"eval.num_samples={cfg.num_samples}"] if cfg.get("num_samples") else None
    print(json.dumps(evaluate_run(cfg.run_dir, cfg.get("steps"), overrides), indent=2))


if __name__ == "__main__":
    main()
