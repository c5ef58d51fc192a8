"""Console scripts: each a Hydra app over conf/ (DESIGN §5)."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from ..checks import NonFiniteError, make_folder

# the repository's conf/ (an editable install), else the copy a wheel installs as stepdistill/conf
_SOURCE_CONF = Path(__file__).resolve().parents[2] / "conf"
CONF_DIR = str(_SOURCE_CONF if (_SOURCE_CONF / "train.yaml").is_file() else Path(__file__).resolve().parents[1] / "conf")


def job_dirname(overrides: str) -> str:
    """A sweep job's folder name from its command-line overrides (`hydra.sweep.subdir` in train.yaml): a path's
    "/" becomes "_" so the name is one folder, and a name past 160 characters is cut, a hash of the whole kept so
    that two jobs never share a folder (a file name has at most 255 bytes: 15 overrides failed the sweep)."""
    import hashlib
    name = overrides.replace("/", "_")
    if len(name) > 160:
        name = f"{name[:140]}-{hashlib.sha1(overrides.encode()).hexdigest()[:12]}"
    return name


def first_set(*values):
    """The first value that is set, not null or empty (`${stepdistill_or:${out},outputs/...}`: oc.select keeps a
    null, and `out=` on the command line is an empty string)."""
    return next((v for v in values if v is not None and v != ""), None)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf
    if not OmegaConf.has_resolver("stepdistill_dirname"):
        OmegaConf.register_new_resolver("stepdistill_dirname", job_dirname)
    if not OmegaConf.has_resolver("stepdistill_or"):
        OmegaConf.register_new_resolver("stepdistill_or", first_set)


_register_resolvers()

# ImportError: an optional dependency a setting needs (pyarrow for parquet prompts, torch-fidelity for Inception
# FID), whose message names the install; OSError: a path that cannot be written or read (missing folder, no
# permission, a full disk); STEPDISTILL_TRACEBACK=1 shows the traceback of any of these
USER_ERRORS = (ValueError, OSError, KeyError, ImportError, NonFiniteError)


def adds_config_folders(args: list[str]) -> bool:
    """The command adds config folders (`--config-dir`, `hydra.searchpath`), which may hold choices and settings
    conf/ does not: the checks below then leave the command line to Hydra."""
    return any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "hydra.searchpath")) for a in args)


def unknown_group_choice(args: list[str]) -> str | None:
    """The one-line error for a config group choice on the command line that conf/ has no file for
    (`method=foo`), else None. Hydra's own answer is 12-18 lines (the search path, a hint about
    HYDRA_FULL_ERROR); this one names the group's choices. Sweep lists (`method=dmd,dmd2`) are checked item by
    item; sweep functions (`glob(...)`, `range(...)`) and deletions (`~group`) are left to Hydra, as is every
    choice when the command adds config folders (`--config-dir`, `hydra.searchpath`) that may hold more."""
    conf = Path(CONF_DIR)
    if adds_config_folders(args):
        return None
    for arg in args:
        key, sep, value = arg.lstrip("+").partition("=")
        group = key.split("@")[0]
        if not sep or arg.startswith("~") or "(" in value or not (conf / group).is_dir():
            continue
        choices = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in choices and choice != "null":
                return f"unknown {group} {choice!r}: use {group}= one of {', '.join(choices)}"
    return None


@functools.lru_cache(maxsize=None)
def file_settings(f: Path) -> frozenset[str]:
    """The dotted keys one conf/ file sets (a group file's under its group, `_global_` ones as written)."""
    import yaml
    keys = set()

    def walk(node, prefix):
        for k, v in node.items():
            if k == "defaults" and not prefix:
                continue
            keys.add(prefix + str(k))
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
    text = f.read_text()
    rel = f.relative_to(CONF_DIR).parts
    prefix = "" if len(rel) == 1 or "@package _global_" in text else ".".join(rel[:-1]) + "."
    data = yaml.safe_load(text)
    if isinstance(data, dict):
        walk(data, prefix)
    return frozenset(keys)


@functools.lru_cache(maxsize=1)
def known_settings() -> frozenset[str]:
    """Every setting's dotted key in any conf/ file: a superset of any one composed config's keys."""
    return frozenset().union(*(file_settings(f) for f in Path(CONF_DIR).rglob("*.yaml")))


def setting_of_another_choice(config_name: str, args: list[str]) -> str | None:
    """The one-line error for a `key=value` whose key a conf/ file has but this command's config has not, since
    another choice of its group sets it (`benchmark=gmm benchmark.teacher.path=...`: a digits or text-to-image
    teacher's), else None. Hydra's answer is six lines suggesting the `+` that would add it unread; and an
    addition `+key=value` of such a key (`method=dmd2 +method.p_std=1`, sCM's) ran with it ignored, since only the
    choices that have a key read it (schedule keys and FREE_FORM dicts excepted: what takes them checks them).
    Found by composing the command's config: its sweeps' first values stand in for them, and a failure for
    another reason is left to Hydra's own message."""
    import re

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    if adds_config_folders(args):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except HydraException:
        return None   # Hydra says what is malformed
    if any(o.is_sweep_override() and (Path(CONF_DIR) / o.key_or_group).is_dir() for o in parsed):
        return None   # which settings exist depends on the choice each job makes
    overrides = [o.input_line for o in parsed if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    if all((Path(CONF_DIR) / o.key_or_group.split("@")[0]).is_dir() for o in parsed
           if not o.key_or_group.startswith("hydra")):
        return None   # group choices alone set no setting (~0.45 s of composing saved on every such command)
    added = [o.key_or_group for o in parsed if (o.is_add() or o.is_force_add()) and o.key_or_group in known_settings()
             and o.key_or_group not in SCHEDULE_KEYS and not o.key_or_group.startswith(FREE_FORM)]
    missing = object()
    with initialize_config_dir(CONF_DIR, version_base=None):
        try:
            cfg = compose(config_name, overrides=[o for o in overrides if o.lstrip("+").split("=")[0] not in added])
            key = next((k for k in added if OmegaConf.select(cfg, k, default=missing) is missing), None)
            if key is None:   # an addition of a setting the config has is Hydra's to refuse
                return None
        except HydraException as e:
            found = re.match(r"Could not override '([^']+)'", str(e))
            key = found.group(1) if found else None
            if key is None or key not in known_settings():
                return None
        group = key.split(".")[0]
        if not (Path(CONF_DIR) / group).is_dir() or group not in compose(config_name).keys():
            return not_this_commands_setting(config_name, key)
        try:
            chosen = compose(config_name, overrides=[o for o in overrides if "." not in o.split("=")[0]],
                             return_hydra_config=True).hydra.runtime.choices.get(group)
        except HydraException:
            return None
    owners = sorted(f.stem for f in (Path(CONF_DIR) / group).glob("*.yaml") if key in file_settings(f))
    if chosen is None:
        return None
    if not owners:   # set by another group's files only (experiment presets)
        setters = sorted(f"{f.parent.name}={f.stem}" for f in Path(CONF_DIR).glob("*/*.yaml") if key in file_settings(f))
        return f"{key!r} is not a setting of {group}={chosen}: only {' and '.join(setters)} set{'s' if len(setters) == 1 else ''} it"
    return f"{key!r} is not a setting of {group}={chosen}: {group}={' or '.join(owners)} has it"


# which console scripts compose each top-level config of conf/
CONFIG_APPS = {"train": ["stepdistill-train"], "sample": ["stepdistill-sample", "stepdistill-eval", "stepdistill-export"],
               "compare": ["stepdistill-compare"], "teacher": ["stepdistill-teacher"]}


def own_settings(config_name: str) -> list[str]:
    """The top-level settings a console script's config file names: its groups and its own keys (not those a
    `_global_` group file adds, such as a benchmark's trainer.* defaults, which stepdistill-teacher does not read)."""
    import yaml
    data = yaml.safe_load((Path(CONF_DIR) / f"{config_name}.yaml").read_text())
    groups = [next(iter(d)) for d in data.get("defaults", []) if isinstance(d, dict)]
    return [g for g in groups if not g.startswith("override")] + [k for k in data if k not in ("defaults", "hydra")]


def not_this_commands_setting(config_name: str, key: str) -> str:
    """The one-line error for a setting of another console script (`stepdistill-train run_dir=D`, a sample
    setting; `stepdistill-compare trainer.max_steps=10`): Hydra's answer was six lines suggesting a `+`."""
    owners = [app for f in sorted(Path(CONF_DIR).glob("*.yaml"))
              if f.stem != config_name and f.stem in CONFIG_APPS and key in file_settings(f) for app in CONFIG_APPS[f.stem]]
    if owners:
        apps = owners[0] if len(owners) == 1 else f"{', '.join(owners[:-1])} and {owners[-1]}"
        msg = f"{key!r} is not a setting of this command: {apps} {'takes' if len(owners) == 1 else 'take'} it"
    else:
        msg = f"{key!r} is not a setting of this command: it takes {'=, '.join(own_settings(config_name))}="
    if config_name == "train" and key in ("run_dir", "out"):
        msg += "; a training run's folder is hydra.run.dir=D"
    return msg


# settings that are dicts passed on as keyword arguments, whose keys are checked by what takes them: the teacher
# recipe's `teacher.extra` (stepdistill-teacher checks them against train_digits_teacher), and a gmm schedule's
# settings, any schedule kind's (make_schedule refuses another kind's; tests check this list against theirs)
FREE_FORM = ("teacher.extra.",)
SCHEDULE_SETTINGS = ("kind", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                     "rescale_betas_zero_snr", "sigma_min", "sigma_max", "rho", "t_min", "time_scale")
SCHEDULE_KEYS = frozenset(f"benchmark.schedule.{k}" for k in SCHEDULE_SETTINGS)


def unknown_setting(args: list[str]) -> str | None:
    """The one-line error for a `key=value` or an addition `+key=value` whose key no conf/ file has
    (`trainer.max_step=10`), else None. Hydra's answer to the first is six lines that suggest
    `+trainer.max_step=10`, and an addition runs with the typo ignored, since no app reads the key; this one
    names the nearest settings. Keys under FREE_FORM, deletions, hydra.* and group choices are left to Hydra,
    and so is everything when the command adds config folders."""
    import difflib
    if adds_config_folders(args):
        return None
    conf, known = Path(CONF_DIR), known_settings()
    for arg in args:
        added = arg[:2] if arg.startswith("++") else arg[:1] if arg.startswith("+") else ""
        key, sep, _ = arg[len(added):].partition("=")
        if sep and not added and key.startswith(FREE_FORM) and key not in known:   # Hydra's answer: six lines
            return (f"{key!r} is not in conf/teacher.yaml: a recipe setting it does not set takes a '+' "
                    f"(+{arg})")
        if (not sep or key.startswith(("~", "-", "hydra.", *FREE_FORM)) or "@" in key
                or not key.replace(".", "").replace("_", "").isalnum() or (conf / key.replace(".", "/")).is_dir()):
            continue
        if (key in known or key.split(".")[-1].isdigit()   # a list element (generator.timesteps.0=...)
                or key in SCHEDULE_KEYS):
            continue
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        hint = f"did you mean {' or '.join(near)}?" if near else "its settings are in the files under conf/"
        if added:
            hint = f"no command reads it, so the addition would be ignored; {hint}"
            if near:   # a setting that exists takes no "+": Hydra refuses to add it again
                hint += " (without the '+')"
        return f"unknown setting {added + key!r}: {hint}"
    return None


def unwritable_run_dir(args: list[str], run_dir_keys: tuple[str, ...] = (), default_in_cwd: bool = False) -> str | None:
    """The one-line error for a `hydra.run.dir` / `hydra.sweep.dir` (or an app's own `run_dir_keys`, which its
    config makes the run folder: stepdistill-teacher's `out`) that cannot be made (a file on its path, no
    permission), else None: Hydra makes it before the app runs, and its failure is a traceback."""
    import tempfile
    given = False
    for arg in args:
        key, sep, value = arg.partition("=")
        if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":   # quoted (quote_folder_values)
            value = value[1:-1]
        if not sep or key not in ("hydra.run.dir", "hydra.sweep.dir", *run_dir_keys) or "$" in value or not value:
            continue
        given = True
        try:   # made here a moment before Hydra would make it
            make_folder(value, key)
        except ValueError as e:
            return str(e)
    if not given and default_in_cwd:
        try:   # the default run folder (outputs/..., multirun/...) goes under the working folder
            tempfile.TemporaryFile(dir=Path.cwd()).close()
        except OSError as e:
            return (f"the working folder {Path.cwd()} cannot be written ({e.strerror}), and the run folder goes "
                    "under it: run from another folder or set hydra.run.dir=DIR")
    return None


def quote_folder_values(args: list[str]) -> list[str]:
    """A value holding "=" (a sweep job's folder, `0_benchmark=gmm,method=dmd`) quoted for Hydra's grammar, which
    refused `run_dir=multirun/.../0_benchmark=gmm,method=dmd` in several lines: no value of a setting can hold
    an unquoted "=", so quoting changes nothing else. Lists and dicts are left as they are (`runs=[...]`: give
    the sweep's folder instead, or quote each item)."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and "=" in value and not key.startswith("-") and value[:1] not in "'\"[{":
            quote = "'" if "'" not in value else '"' if '"' not in value else None
            if quote:
                arg = f"{key}={quote}{value}{quote}"
        quoted.append(arg)
    return quoted


def checked_groups(app: str, config_name: str, run_dir_keys: tuple[str, ...] = ()):
    """Outside `@hydra.main` (whose `config_name` it is): the command line's config group choices and setting
    names are checked (above) before the Hydra app composes its config, which happens before the app's own error
    handling (user_errors) runs."""
    def wrap(hydra_main):
        @functools.wraps(hydra_main)
        def entry():
            sys.argv[1:] = args = quote_folder_values(sys.argv[1:])
            msg = (unknown_group_choice(args) or unknown_setting(args)
                   or unwritable_run_dir(args, run_dir_keys, default_in_cwd=config_name in ("train", "teacher"))
                   or setting_of_another_choice(config_name, args))
            if msg:
                print(f"{app}: error: {msg}", file=sys.stderr)
                sys.exit(2)
            FAILED_JOBS.clear()
            out = hydra_main()
            if FAILED_JOBS:   # each said why when it failed
                print(f"{app}: error: sweep job{'s' if len(FAILED_JOBS) > 1 else ''} {', '.join(FAILED_JOBS)} "
                      "failed (the reasons are above); the others ran", file=sys.stderr)
                sys.exit(2)
            return out
        return entry
    return wrap


# the sweep jobs that ended in a one-line error (printed as they failed): the command exits 2 after the sweep
FAILED_JOBS: list[str] = []


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def compose_config(overrides: list[str], config_name: str = "train"):
    """The config a console script composes from these command-line overrides, with the same checks (an unknown
    choice or setting, a setting of another choice or command, a value of the wrong type): from Python
    (notebooks), hydra's compose alone took `method.gan.enabled=no` as the string "no", which is true."""
    from hydra import compose, initialize_config_dir

    from .override_types import check_values, split_overrides
    from .unread_settings import unread_setting
    overrides = list(overrides)
    msg = (unknown_group_choice(overrides) or unknown_setting(overrides)
           or setting_of_another_choice(config_name, overrides))
    if msg:
        raise ValueError(msg)
    choices, values = split_overrides(overrides, [p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()])
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose(config_name, overrides=overrides)
        check_values(compose(config_name, overrides=choices), cfg, values)
    if config_name == "train" and (msg := unread_setting(cfg, [key for key, _ in values])):
        raise ValueError(msg)
    return cfg


def user_errors(app: str):
    """Bad input ends in one line saying what to change, not a traceback. Around a Hydra app's main(cfg), the
    command line's values are first checked against their settings' types (override_types.py), so every app
    checks them and none can forget to."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                _check_hydra_overrides(args)
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                if os.environ.get("STEPDISTILL_TRACEBACK"):
                    raise
                # an OSError's args are (errno, text); its str names the path too
                msg = str(e) if isinstance(e, OSError) or not e.args else e.args[0]
                print(f"{app}: error: {msg}", file=sys.stderr)
                if in_multirun():   # the sweep's other jobs still run (a sys.exit ended the whole sweep)
                    from hydra.core.hydra_config import HydraConfig
                    FAILED_JOBS.append(f"#{HydraConfig.get().job.num} ({HydraConfig.get().runtime.output_dir})")
                    return None
                sys.exit(2)
        return inner
    return wrap


def refuse_unused(app: str, uses, hints: dict[str, str]) -> None:
    """The command line's settings (Hydra's task overrides, group choices included) that `app` does not use, one
    top-level key of sample.yaml at a time, are a one-line error rather than silently ignored: `hints[key]` says
    what to do, else the line names the settings the app takes."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("~+").split("=", 1)[0]
        top = key.split(".")[0].split("@")[0]
        if top in uses or top == "hydra":
            continue
        hint = hints.get(top) or f"{app} does not use {key}= here (it takes {'=, '.join(uses)}=): leave it out"
        raise ValueError(f"{override}: {hint}")


def _check_hydra_overrides(args) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .override_types import check_override_types, split_overrides
    from .unread_settings import unread_setting
    if args and isinstance(args[0], DictConfig) and HydraConfig.initialized():
        check_override_types(args[0])
        hc = HydraConfig.get()
        if hc.job.config_name == "train":
            msg = unread_setting(args[0], [key for key, _ in split_overrides(hc.overrides.task, hc.runtime.choices)[1]])
            if msg:
                raise ValueError(msg)


def pick_device(name) -> str:
    """`device=`: auto is the GPU where torch sees one, else the CPU; a GPU torch does not see is a one-line error."""
    import torch

    name = str(name or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available() or torch.device(name).index not in (None, *range(torch.cuda.device_count())):
            raise ValueError(f"device={name}: torch sees no such GPU here: use device=cpu (or auto)")
        return name
    raise ValueError(f"device={name}: use auto, cpu, cuda or cuda:N")


def set_threads(n, key: str = "num_threads") -> None:
    """torch's thread count; 0 or null leaves torch's default (one per core)."""
    import torch

    from ..checks import at_least
    if n is not None and at_least(key, n, 0):
        torch.set_num_threads(int(n))


def pipe_table(head, rows) -> str:
    """A table of already formatted cells: a header, a `---` row, then one line per row, cells joined by " | "."""
    return "\n".join(" | ".join(cells) for cells in [list(head), ["---"] * len(head), *rows])
