"""`stepdistill-export run_dir=D [checkpoint=STEP] [out=DIR]`: write D/export/ (or DIR) in diffusers format from the
run's latest checkpoint (or the one of that step)."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from . import CONF_DIR, set_threads, user_errors


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="sample")
@user_errors("stepdistill-export")
def main(cfg: DictConfig) -> None:
    from ..export.export import export_run
    from ..train.setup import load_run

    set_threads(cfg.get("num_threads"))
    if not cfg.get("run_dir"):
        raise ValueError("give run_dir=D (a stepdistill-train run folder)")
    out = cfg.get("out") or Path(cfg.run_dir) / "export"
    print(f"exported to {export_run(load_run(cfg.run_dir, checkpoint=cfg.get('checkpoint')), out)}")


if __name__ == "__main__":
    main()
