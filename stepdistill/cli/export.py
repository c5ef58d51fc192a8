"""`stepdistill-export run_dir=D [checkpoint=STEP] [out=DIR]`: write D/export/ (or DIR) in diffusers format from the
run's latest checkpoint (or the one of that step). Any other setting (steps=, num_samples=, ...) would be ignored,
and is refused."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..checks import run_folder
from . import CONF_DIR, checked_groups, refuse_unused, set_threads, user_errors

EXPORT_USES = ("run_dir", "checkpoint", "out", "num_threads")
# what stepdistill-export does not use, and what to do instead; any other unused setting: leave it out
UNUSED = {
    "steps": "an export holds the student, not a step count: leave it out and choose the steps when sampling "
             "(pipe(num_inference_steps=K), or stepdistill-sample run_dir=D steps=K)",
    "teacher_steps": "an export holds the student, not a step count: leave it out and choose the steps when "
                     "sampling (pipe(num_inference_steps=K))",
}


@checked_groups("stepdistill-export", "sample")
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sample")
@user_errors("stepdistill-export")
def main(cfg: DictConfig) -> None:
    run_dir = run_folder(cfg.get("run_dir"))   # before torch and diffusers load: a wrong path fails at once
    refuse_unused("stepdistill-export", EXPORT_USES, UNUSED)   # a setting it would ignore: refused, saying what to do
    set_threads(cfg.get("num_threads"))
    from ..export.export import export_folder, export_run
    from ..train.setup import load_run

    # out= checked before the run loads: one that would lose files fails at once
    out = export_folder(cfg.get("out") or run_dir / "export", run_dir)
    print(f"exported to {export_run(load_run(run_dir, checkpoint=cfg.get('checkpoint')), out, run_dir)}")


if __name__ == "__main__":
    main()
