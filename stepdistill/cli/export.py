"""`stepdistill-export run_dir=D [checkpoint=STEP] [out=DIR]`: write D/export/ (or DIR) in diffusers format from the
run's latest checkpoint (or the one of that step)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..checks import run_folder
from . import CONF_DIR, checked_groups, set_threads, user_errors


@checked_groups("stepdistill-export")
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sample")
@user_errors("stepdistill-export")
def main(cfg: DictConfig) -> None:
    run_dir = run_folder(cfg.get("run_dir"))   # before torch and diffusers load: a wrong path fails at once
    set_threads(cfg.get("num_threads"))
    from ..export.export import export_folder, export_run
    from ..train.setup import load_run

    # out= checked before the run loads: one that would lose files fails at once
    out = export_folder(cfg.get("out") or run_dir / "export", run_dir)
    print(f"exported to {export_run(load_run(run_dir, checkpoint=cfg.get('checkpoint')), out, run_dir)}")


if __name__ == "__main__":
    main()
