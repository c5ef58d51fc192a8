"""Command-line values must have their setting's type.

Hydra reads `trainer.resume=no` as the string "no", and a non-empty string is true: the run would resume. It reads
`trainer.batch_size=abc` as a string too, which failed much later as "invalid literal for int() with base 10: 'abc'"
without naming the setting, and `optim.generator.lr=fast` as a traceback from inside torch. The configs declare no
schema, so a setting's type is read off its default: the same config composed with the command line's group choices
(benchmark=, method=, ...) and none of its values. `null` on a number setting is refused (leave the setting out for
its default) except where it means the default (NULL_NUMBERS); a list setting takes a list, not one value; settings
whose default is a string or null are not checked otherwise.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


# lists whose default is null (null: the setting's own default): a single value was a traceback ("'int' object is
# not iterable") deep in the run
LIST_SETTINGS = ("generator.timesteps", "generator.train_steps", "benchmark.weights", "benchmark.means")
# number settings that read null as their default (no clipping, no warm-up, torch's threads); null on any other
# number setting was an int(None) traceback
NULL_NUMBERS = ("method.critic_warmup_steps", "method.gan.start_step", "method.step_embedding_gain",
                "optim.generator.grad_clip", "optim.critic.grad_clip", "trainer.num_threads", "num_threads")


def type_error(key: str, text: str, default, value) -> str | None:
    """Why `key=text` (parsed to `value`) does not fit a setting whose default is `default`; None if it does."""
    from omegaconf import ListConfig
    if isinstance(default, (list, ListConfig)) or key in LIST_SETTINGS:
        if value is None or isinstance(value, (list, ListConfig)):
            return None
        return f"{key}={text}: need a list, e.g. {key}=[{text}]"
    if value is None:
        if isinstance(default, (int, float)) and not isinstance(default, bool) and key not in NULL_NUMBERS:
            return f"{key}=null: need {'an integer' if isinstance(default, int) else 'a number'}: leave it out for " \
                   f"the default ({default})"
        return None
    if isinstance(default, bool):
        fits, need = isinstance(value, bool) or value in (0, 1), "an on/off setting takes true or false"
    elif isinstance(default, (int, float)):
        integer = isinstance(default, int)
        # bool is an int to Python: `true` would be a count of 1
        fits = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
        need = f"need {'an integer' if integer else 'a number'} (the default is {default})"
    else:
        return None
    return None if fits else f"{key}={text}: {need}"


def split_overrides(overrides: list[str], groups=()) -> tuple[list[str], list[tuple[str, str]]]:
    """(the group choices, (key, text as typed) of each value set): benchmark=gmm picks a group's file,
    trainer.resume=no sets a value. A deleted key (~key) has no value; an added one (+key) has no default."""
    choices, values = [], []
    for override in overrides:
        key, _, text = override.partition("=")
        if key.lstrip("+~") in groups:
            choices.append(override)
        elif not key.startswith("~"):
            values.append((key.lstrip("+"), text))
    return choices, values


def check_override_types(cfg: DictConfig) -> None:
    """A one-line error for the first command-line value whose type does not fit its setting's default."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    choices, values = split_overrides(hc.overrides.task, hc.runtime.choices)
    if values:
        check_values(compose(config_name=hc.job.config_name, overrides=choices), cfg, values)


def check_values(defaults: DictConfig, cfg: DictConfig, values: list[tuple[str, str]]) -> None:
    """`values`: (key, text as typed) of each value set on the command line; `cfg` holds them parsed."""
    for key, text in values:
        error = type_error(key, text, OmegaConf.select(defaults, key), OmegaConf.select(cfg, key))
        if error:
            raise ValueError(error)
