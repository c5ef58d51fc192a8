"""On/off settings given on the command line must be true or false.

Hydra reads `trainer.resume=no` as the string "no", and a non-empty string is true: the run would resume. The
configs declare no schema, so a setting's type is read off its default: the same config composed with the
command line's group choices (benchmark=, method=, ...) and none of its values.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def check_flag_overrides(cfg: DictConfig) -> None:
    """A one-line error for each command-line value whose default is true/false but which is not (0 and 1 pass)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    group_choices, values = [], []   # benchmark=gmm picks a group's file; trainer.resume=no sets a value
    for override in hc.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in hc.runtime.choices:
            group_choices.append(override)
        else:
            values.append(key)
    if not values:
        return
    defaults = compose(config_name=hc.job.config_name, overrides=group_choices)
    for key in values:
        default, value = OmegaConf.select(defaults, key), OmegaConf.select(cfg, key)
        if isinstance(default, bool) and not isinstance(value, bool) and value not in (0, 1):
            raise ValueError(f"{key}={value}: an on/off setting takes true or false")
