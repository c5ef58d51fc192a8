"""Settings a training run composes but never reads are refused where the command line sets them.

`setting_of_another_choice` (cli/__init__.py) refuses a key the composed config lacks. Some keys are in the config
and still go unread, and a value given for one ran with it ignored:
- a benchmark's `_global_` `method:` block puts its keys into every method's config (gmm's critic_steps,
  critic_warmup_steps, normalizer and gan.*), also for methods that have no use for them (sCM has no critic, SiD
  no GAN head): a `method.*` value is read only by methods whose own conf/method file (with the files it inherits)
  names the key;
- some settings are read only when another one says so (RULES: `method.init_sigma` by a one-step student without
  `generator.timesteps`, `model.lora_*` with `model.shared_base=true`, ...).
Only the command line's values are checked: the conf/ files' own values (a benchmark's block, written for every
method) are not. Nothing here imports torch but `has_critic`, which reads the method's class.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from ..benchmarks.registry import POINTS_BENCHMARKS


def has_critic(cfg: DictConfig) -> bool:
    from ..methods import method_class
    return method_class(str(cfg.method.name)).uses_fake_score


@dataclass(frozen=True)
class ReadWhen:
    """`keys` (a dotted key, or a prefix ending in ".") are read only when `condition(cfg)` holds, which `needs`
    says in settings' words; `but` lists keys under a prefix that are read regardless (its on/off switch)."""
    keys: tuple[str, ...]
    condition: Callable[[DictConfig], bool]
    needs: str
    but: tuple[str, ...] = ()

    def covers(self, key: str) -> bool:
        return key not in self.but and any(key == k or (k.endswith(".") and key.startswith(k)) for k in self.keys)


def _shared_base(cfg) -> bool:
    return bool((cfg.get("model") or {}).get("shared_base"))


def _points(cfg) -> bool:
    """The gmm benchmarks: MLP students from scratch (no attention) around an EDM-preconditioned fake score."""
    return str(cfg.benchmark.name) in POINTS_BENCHMARKS


def _edm(cfg) -> bool:
    """An EDM teacher: a gmm's `benchmark.schedule.kind=edm` (the digits and text-to-image teachers are VP)."""
    return (cfg.benchmark.get("schedule") or {}).get("kind") == "edm"


def _data(cfg) -> dict:
    return cfg.benchmark.get("data") or {}


def _exits_before_the_last(cfg) -> bool:
    """Backward simulation trains some step k < K (generator.train_steps, null = all of 1..K)."""
    steps = int(cfg.generator.steps)
    return any(int(k) < steps for k in (cfg.generator.get("train_steps") or range(1, steps + 1)))


RULES = (
    # benchmarks/base.py generator_timesteps: explicit timesteps win, and a multi-step student starts at the top
    ReadWhen(("method.init_sigma",), lambda c: int(c.generator.steps) == 1 and c.generator.get("timesteps") is None,
             "a one-step student without explicit timesteps (generator.steps=1, generator.timesteps=null)"),
    # backward simulation (generator.py) draws exit steps; sCM trains its consistency function on real data instead
    ReadWhen(("generator.per_sample_step", "generator.train_steps"),
             lambda c: int(c.generator.steps) > 1 and c.method.name != "scm",
             "a multi-step student's backward simulation (generator.steps > 1; method=scm has none)"),
    ReadWhen(("model.lora_rank", "model.lora_alpha", "model.lora_targets"), _shared_base, "model.shared_base=true"),
    ReadWhen(("generator.lora_alpha", "generator.lora_targets"),
             lambda c: bool(c.generator.get("lora_rank")) or _shared_base(c),
             "a LoRA student (generator.lora_rank=R, or model.shared_base=true)"),
    ReadWhen(("optim.critic.",), has_critic, "a method with a critic (method=scm has none)"),
    ReadWhen(("optim.lr_drop_factor",), lambda c: c.optim.get("lr_drop_step") is not None, "optim.lr_drop_step=N"),
    # the trainer shards only with fsdp.enabled (and more than one process, which it says at the start)
    ReadWhen(("trainer.fsdp.",), lambda c: bool((c.trainer.get("fsdp") or {}).get("enabled")), "trainer=fsdp",
             but=("trainer.fsdp.enabled",)),
    ReadWhen(("method.gan.",), lambda c: bool(c.method.gan.get("enabled")), "method.gan.enabled=true",
             but=("method.gan.enabled",)),
    ReadWhen(("method.step_embedding_gain",), lambda c: bool(c.method.get("step_aware_critic")),
             "method.step_aware_critic=true"),
    ReadWhen(("method.ratio_ema",), lambda c: int(c.method.get("ratio_bins") or 0) > 0, "method.ratio_bins > 0"),
    ReadWhen(("method.weighting_width",), lambda c: c.method.get("weighting") == "adaptive",
             "method.weighting=adaptive (the learned w(t))"),
    # sid.py _check_critic_noise: reference is lognormal on an EDM schedule (a gmm's benchmark.schedule.kind=edm;
    # the digits and text-to-image teachers are VP), loss_range elsewhere
    ReadWhen(("method.critic_lognormal",),
             lambda c: c.method.get("critic_noise") == "lognormal" or (c.method.get("critic_noise") == "reference"
                                                                        and _edm(c)),
             "method.critic_noise=lognormal (or reference, on an EDM teacher: benchmark.schedule.kind=edm)"),
    # sid.py: the reference weighting differs from the native loss only for a v-prediction fake score; the gmm's is EDM
    ReadWhen(("method.critic_weighting",), lambda c: not _points(c), "a v-prediction teacher (digits; not the gmm's)"),
    # fdistill.py: h = 1 for the reverse KL, whatever the ratio (DMD2 bit for bit); the GAN still trains
    ReadWhen(("method.log_ratio_clip", "method.ratio_bins", "method.ratio_ema"),
             lambda c: c.method.get("divergence") != "rkl", "a method.divergence other than rkl (whose weight is 1)"),
    # dmd2.py _dm_noise_ranges: the bound moves only the exit steps k < K
    ReadWhen(("method.dm_above_next_input",), _exits_before_the_last,
             "an exit step before the last (generator.steps > 1, generator.train_steps not only [K])"),
    ReadWhen(("attention.backend",), lambda c: not _points(c), "networks with attention layers (not the gmm's MLPs)"),
    ReadWhen(("benchmark.fake_score_from_teacher",), has_critic, "a method with a critic (method=scm has none)"),
    # gmm.py: explicit means replace the circle
    ReadWhen(("benchmark.num_modes", "benchmark.radius"), lambda c: not c.benchmark.get("means"),
             "benchmark.means=null"),
    ReadWhen(("benchmark.network.fourier_scale", "benchmark.network.generator_fourier_scale"),
             lambda c: int(c.benchmark.network.get("fourier_features") or 0) > 0,
             "benchmark.network.fourier_features > 0"),
    # text_to_image.py real_samples: given images replace the teacher samples standing in for them
    ReadWhen(("benchmark.num_real",), lambda c: not _data(c).get("images"), "benchmark.data.images=null"),
    ReadWhen(("benchmark.data.prompt_column",), lambda c: bool(_data(c).get("prompts")),
             "benchmark.data.prompts=FILE (a .csv or .parquet file)"),
    ReadWhen(("method.regression.lpips_weights", "method.regression.lpips_resize"),
             lambda c: c.method.regression.get("distance") == "lpips", "method.regression.distance=lpips"),
)


@functools.lru_cache(maxsize=None)
def method_own_settings(name: str) -> frozenset[str]:
    """The `method.*` keys that conf/method/NAME.yaml and the method files it inherits (its defaults list) set."""
    import yaml

    from . import CONF_DIR, file_settings
    f = Path(CONF_DIR) / "method" / f"{name}.yaml"
    if not f.is_file():
        return frozenset()
    keys = set(file_settings(f))
    for parent in (yaml.safe_load(f.read_text()) or {}).get("defaults", []):
        if isinstance(parent, str) and parent != "_self_":
            keys |= method_own_settings(parent)
    return frozenset(keys)


def another_methods_setting(cfg: DictConfig, key: str) -> str | None:
    """The error for a `method.*` key that some method's own files set but not the chosen method's, else None (a
    key no method file has is another file's: an experiment preset's method.experiment_for, read by build_run)."""
    from . import CONF_DIR
    name, top = str(cfg.method.name), ".".join(key.split(".")[:2])
    own = method_own_settings(name)
    readers = sorted(f.stem for f in (Path(CONF_DIR) / "method").glob("*.yaml") if top in method_own_settings(f.stem))
    if not own or not readers or top in own:
        return None
    return (f"{key}: method={name} never reads it (only method={' or '.join(readers)} "
            f"read{'s' if len(readers) == 1 else ''} it; a benchmark's defaults put it in every method's config): "
            "leave it out")


def unread_setting(cfg: DictConfig, keys) -> str | None:
    """The one-line error for the first of `keys` (settings the command line gives a value) that a run with the
    composed config `cfg` never reads, else None."""
    for key in keys:
        if key.startswith("method.") and "name" in (cfg.get("method") or {}):
            msg = another_methods_setting(cfg, key)
            if msg:
                return msg
        for rule in RULES:
            if rule.covers(key) and not rule.condition(cfg):
                return f"{key} would be ignored: it is read only with {rule.needs}"
    return None
