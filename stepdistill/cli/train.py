"""`stepdistill-train` (= `python -m stepdistill.train`): distil a teacher into a few-step generator."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import CONF_DIR, checked_groups, in_multirun, set_threads, user_errors


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, run_dir / "config.yaml")


def refuse_earlier_checkpoints(run_dir: Path) -> None:
    """A fresh run in a folder holding another run's checkpoints would leave them beside its own: the latest step
    (what sample, eval, export and a later resume take) could be the other run's."""
    from ..train.checkpoint import checkpoint_step, list_checkpoints
    earlier = [checkpoint_step(c) for c in list_checkpoints(run_dir / "checkpoints")]
    if earlier:
        raise ValueError(f"{run_dir} holds checkpoints of an earlier run (steps {earlier}): continue it with "
                         "trainer.resume=true, or train in another hydra.run.dir")


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train, export and report; the Python entry point (notebooks call this with a composed config)."""
    from ..train.setup import build_run, load_run
    from ..train.trainer import Trainer

    run_dir = Path(run_dir)
    set_threads(cfg.trainer.get("num_threads"), "trainer.num_threads")
    if not cfg.trainer.get("resume"):
        refuse_earlier_checkpoints(run_dir)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # detach from Hydra's runtime
    if "hydra" in cfg:
        del cfg["hydra"]
    run = build_run(cfg)
    if cfg.trainer.export:   # before training: the export runs after it
        from ..export.export import check_exportable   # diffusers' pipelines and UNets, ~2-4 s of imports
        check_exportable(run.roles["generator"])
    trainer = Trainer(run, run_dir)
    if cfg.trainer.resume:   # before config.yaml is rewritten: a resume that does not fit leaves the folder as it was
        trainer.resume()
    if trainer.main:
        write_config(run.cfg, run_dir)
    result = trainer.fit()
    if cfg.trainer.export and trainer.main and "stopped_by" not in result:
        from ..export.export import export_run
        # sharded networks (trainer=fsdp) hold 1/N of each weight: export plain ones from the final checkpoint
        result["export"] = str(export_run(load_run(run_dir) if trainer.fsdp else run, run_dir / "export", run_dir))
    result["run_dir"] = str(run_dir)
    result["main_process"] = trainer.main
    return result


def summary(result: dict) -> str:
    lines = [f"run folder:   {result['run_dir']}"]
    if "figure" in result:
        lines.append(f"sample grid:  {result['figure']}")
    lines.append(f"metrics:      {Path(result['run_dir']) / 'metrics.jsonl'}")
    if (curves := Path(result["run_dir"]) / "curves.png").is_file():
        lines.append(f"curves:       {curves}")
    if "export" in result:
        lines.append(f"export:       {result['export']}  (diffusers from_pretrained)")
    for key in ("fd", "latent_fd", "clip_score", "sliced_w2", "modes_covered", "high_quality_fraction", "precision",
                "recall", "class_accuracy"):
        s, t = result.get(f"student_{key}"), result.get(f"teacher_{key}")
        if s is not None:
            # the FD's bootstrap spread: how far it would move with another set of as many samples
            pm = {who: f" ± {v:.2g}" if (v := result.get(f"{who}_{key}_bootstrap_std")) is not None else ""
                  for who in ("student", "teacher")}
            extra = f"   teacher ({result.get('teacher_steps')} steps): {t:.4g}{pm['teacher']}" if t is not None else ""
            ratio = f"   ratio {s / t:.3g}" if key in ("fd", "latent_fd", "sliced_w2") and t else ""
            lines.append(f"student {key}: {s:.4g}{pm['student']}{extra}{ratio}")
    if "processes" in result:
        lines.append(f"processes:    {result['processes']} (weight spread across them "
                     f"{result['weight_spread_across_processes']:.3g})")
    lines.append(f"train time:   {result['train_seconds']:.1f} s")
    if "stopped_by" in result:
        lines.append(f"stopped:      by {result['stopped_by']} at step {result['stopped_at_step']}, checkpoint saved; "
                     f"continue with trainer.resume=true hydra.run.dir={result['run_dir']}")
    return "\n".join(lines)


def leave_the_log_file_to_rank_0() -> None:
    """Under `accelerate launch`, every process's Hydra set up a handler on the run's train.log, so each warning
    and info line was written once per process. The other ranks keep their console (stderr) lines."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


@checked_groups("stepdistill-train", "train")
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
@user_errors("stepdistill-train")
def main(cfg: DictConfig) -> None:
    leave_the_log_file_to_rank_0()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.trainer.resume and in_multirun():
        from ..train.checkpoint import latest_checkpoint
        if latest_checkpoint(run_dir / "checkpoints") is None:
            # a sweep stopped part-way and continued with trainer.resume=true: a job that never saved starts afresh
            logging.getLogger("stepdistill").warning("%s holds no checkpoint (the job never saved one): it starts "
                                                     "from step 0", run_dir)
            cfg.trainer.resume = False
    result = train(cfg, run_dir)
    if result["main_process"]:
        print(summary(result), flush=True)
    from ..train.distributed import leave_together
    leave_together()   # rank 0 has written and printed before any process exits, and none exits with its group up
    if "stopped_by" in result:   # a signal's conventional exit status: a scheduler or a sweep sees an unfinished job
        sig = getattr(signal, str(result["stopped_by"]), None)
        sys.exit(128 + int(sig) if isinstance(sig, signal.Signals) else 1)


if __name__ == "__main__":
    main()
