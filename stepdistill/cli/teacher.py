"""`stepdistill-teacher benchmark=digits [out=DIR]`: re-train the digits teacher and feature network from scratch.
`stepdistill-teacher benchmark=tiny_sd|tiny_sdxl out=DIR`: build a tiny random SD/SDXL-style pipeline (no training).

The shipped assets (stepdistill/assets/) were made by this command with the settings in conf/teacher.yaml;
`install=true` writes straight into the package's assets folder.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ..checks import at_least
from . import CONF_DIR, checked_groups, refuse_unused, set_threads, user_errors

ASSETS = Path(__file__).resolve().parents[1] / "assets"
RECIPE_SETTINGS = ("teacher.", "features.", "quality.")   # the digits recipe's
TEACHER_USES = ("benchmark", "seed", "out", "install", "num_threads", "features", "teacher", "quality")
UNUSED = {"trainer": "the teacher recipe's settings are teacher.*, features.* and quality.* (conf/teacher.yaml): "
                     "use teacher.steps= for its length"}


@checked_groups("stepdistill-teacher", "teacher", run_dir_keys=("out",))   # out= is the run folder (conf/teacher.yaml)
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="teacher")
@user_errors("stepdistill-teacher")
def main(cfg: DictConfig) -> None:
    # the benchmark files also set training's settings (trainer.*, method.*, ...): the recipe reads none of them, and
    # `trainer.max_steps=3` would start the full 30-minute recipe
    refuse_unused("stepdistill-teacher", TEACHER_USES, UNUSED)
    for override in HydraConfig.get().overrides.task:   # of the benchmark, the recipe reads its choice alone
        if override.lstrip("~+").startswith("benchmark."):
            raise ValueError(f"{override}: stepdistill-teacher reads only the benchmark's name (benchmark=digits, "
                             "tiny_sd or tiny_sdxl); the recipe's settings are teacher.*, features.* and quality.*")
    name = cfg.benchmark.name
    if name in ("gmm", "gmm_unbalanced"):   # checked before torch loads (set_threads): the answer is immediate
        raise ValueError(f"the {name} teacher is analytic (exact score): nothing to train; use benchmark=digits")
    if name not in ("tiny_sd", "tiny_sdxl", "digits"):
        raise ValueError(f"no teacher recipe for benchmark {name!r}: use benchmark=digits, tiny_sd or tiny_sdxl")
    if cfg.install and cfg.out:
        raise ValueError(f"install=true writes into the package's assets ({ASSETS}), out={cfg.out} elsewhere: give "
                         "one of them")
    set_threads(cfg.get("num_threads"), "num_threads")
    if name in ("tiny_sd", "tiny_sdxl"):
        recipe = [o for o in HydraConfig.get().overrides.task if o.lstrip("+").startswith(RECIPE_SETTINGS)]
        if cfg.install or recipe:   # the digits recipe's: ignored here before
            raise ValueError(f"{'install=true' if cfg.install else recipe[0]}: {name} is built with random weights, "
                             f"not trained; it takes out=DIR and seed= only")
        from ..benchmarks.tiny_sd_teacher import build_tiny_sd, build_tiny_sdxl
        out = Path(cfg.out or HydraConfig.get().runtime.output_dir)
        (build_tiny_sdxl if name == "tiny_sdxl" else build_tiny_sd)(out, seed=int(cfg.seed))
        print(f"{name} teacher (random weights, a diffusers pipeline folder): {out}  "
              f"(use benchmark={name} benchmark.teacher.path={out})")
        return
    from ..benchmarks.digits_teacher import measure_teacher_quality, train_digits_teacher, update_teacher_info
    from ..networks.digits_features import save_feature_net, train_feature_net

    fc, tc = cfg.features, cfg.teacher
    takes = set(inspect.signature(train_digits_teacher).parameters) - {"out_dir", "steps", "batch_size", "lr", "seed"}
    unknown = sorted(set(tc.extra) - takes)
    if unknown:   # before the feature network's training, not a TypeError after it
        raise ValueError(f"teacher.extra.{unknown[0]}: the digits teacher recipe takes teacher.extra."
                         f"{{{', '.join(sorted(takes))}}}")
    guidances = cfg.quality.guidances   # read after the whole recipe: checked before it
    if (not OmegaConf.is_list(guidances) or not len(guidances)
            or not all(isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in guidances)):
        raise ValueError(f"quality.guidances={guidances}: give a list of CFG scales >= 0, e.g. [1.0,1.5,2.0]")
    for key, value in (("features.steps", fc.steps), ("teacher.steps", tc.steps), ("quality.steps", cfg.quality.steps),
                       ("features.batch_size", fc.batch_size), ("teacher.batch_size", tc.batch_size)):
        at_least(key, value)
    out = ASSETS if cfg.install else Path(cfg.out or HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    net, feat_report = train_feature_net(steps=fc.steps, batch_size=fc.batch_size, lr=fc.lr, seed=cfg.seed)
    save_feature_net(net, out / "digits_features.safetensors")
    report = train_digits_teacher(out / "digits_teacher", steps=tc.steps, batch_size=tc.batch_size, lr=tc.lr,
                                  seed=cfg.seed, **OmegaConf.to_container(tc.extra))
    # Record the teacher's quality next to its weights; its default guidance is the scale with the lowest FD, and its
    # default sampler the steps that FD was measured at.
    quality = measure_teacher_quality(out / "digits_teacher", guidances=tuple(cfg.quality.guidances),
                                      steps=cfg.quality.steps, feature_net=net)
    report = update_teacher_info(out / "digits_teacher", default_guidance=quality["best_guidance"],
                                 default_sampler_steps=int(cfg.quality.steps), quality=quality)
    print(json.dumps({"features": feat_report, "teacher": report}, indent=2, default=str))
    print(f"teacher: {out / 'digits_teacher'}  (use benchmark.teacher.path={out / 'digits_teacher'} "
          f"benchmark.feature_net={out / 'digits_features.safetensors'})")


if __name__ == "__main__":
    main()
