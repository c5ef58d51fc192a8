"""A resume whose config no longer fits the checkpoint: say which settings changed, in one line.

Loading a checkpoint into networks of another width, or into the optimizers of another method, fails deep in
torch (a size-mismatch dump, or "loaded state dict contains a parameter group that doesn't match"). The run
folder's config.yaml is the config its checkpoints were written with, so the useful answer is the list of
settings this run changes against it.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

SHOWN = 8   # differences listed; the rest are counted


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: DictConfig | dict, current: DictConfig | dict) -> list[str]:
    """`key: saved -> current` for every leaf setting that differs (lists compared whole): settings both
    configs have first, then those only one has, each group sorted by key. `trainer.resume` is left out."""
    def leaves(cfg):
        return _flat(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    old, new = leaves(saved), leaves(current)
    changed = sorted(k for k in old.keys() & new.keys() if k != "trainer.resume" and old[k] != new[k])
    one_side = sorted(old.keys() ^ new.keys())
    return ([f"{k}: {old[k]} -> {new[k]}" for k in changed]
            + [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in one_side])


def mismatch_message(checkpoint: Path, saved_config: Path, current: DictConfig, error: Exception) -> str:
    """One line: what failed, which settings differ from the run's config.yaml, and what to do."""
    reason = " ".join(str(error).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    if saved_config.is_file():
        diffs = config_differences(OmegaConf.load(saved_config), current)
        if diffs:
            more = f" (and {len(diffs) - SHOWN} more)" if len(diffs) > SHOWN else ""
            changed = f"this run changes {'; '.join(diffs[:SHOWN])}{more} against {saved_config}"
        else:
            changed = f"no setting differs from {saved_config} (was the checkpoint written by another version?)"
    else:
        changed = f"the run folder has no config.yaml to compare with ({saved_config})"
    return (f"trainer.resume=true but checkpoint {checkpoint} does not fit this config ({reason}); {changed}. "
            "Resume with the run's own settings, or start a new run in another hydra.run.dir")
