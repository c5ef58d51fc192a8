"""Console scripts: each a Hydra app over conf/ (DESIGN §5)."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from ..checks import NonFiniteError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def job_dirname(overrides: str) -> str:
    """A sweep job's folder name from its command-line overrides (`hydra.sweep.subdir` in train.yaml): a path's
    "/" becomes "_" so the name is one folder, and a name past 160 characters is cut, a hash of the whole kept so
    that two jobs never share a folder (a file name has at most 255 bytes: 15 overrides failed the sweep)."""
    import hashlib
    name = overrides.replace("/", "_")
    if len(name) > 160:
        name = f"{name[:140]}-{hashlib.sha1(overrides.encode()).hexdigest()[:12]}"
    return name


def _register_resolvers() -> None:
    from omegaconf import OmegaConf
    if not OmegaConf.has_resolver("stepdistill_dirname"):
        OmegaConf.register_new_resolver("stepdistill_dirname", job_dirname)


_register_resolvers()

# ImportError: an optional dependency a setting needs (pyarrow for parquet prompts, torch-fidelity for Inception
# FID), whose message names the install; OSError: a path that cannot be written or read (missing folder, no
# permission, a full disk); STEPDISTILL_TRACEBACK=1 shows the traceback of any of these
USER_ERRORS = (ValueError, OSError, KeyError, ImportError, NonFiniteError)


def unknown_group_choice(args: list[str]) -> str | None:
    """The one-line error for a config group choice on the command line that conf/ has no file for
    (`method=foo`), else None. Hydra's own answer is 12-18 lines (the search path, a hint about
    HYDRA_FULL_ERROR); this one names the group's choices. Sweep lists (`method=dmd,dmd2`) are checked item by
    item; sweep functions (`glob(...)`, `range(...)`) and deletions (`~group`) are left to Hydra, as is every
    choice when the command adds config folders (`--config-dir`, `hydra.searchpath`) that may hold more."""
    conf = Path(CONF_DIR)
    if any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "hydra.searchpath")) for a in args):
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


def checked_groups(app: str):
    """Outside `@hydra.main`: the command line's config group choices are checked (above) before the Hydra app
    composes its config, which happens before the app's own error handling (user_errors) runs."""
    def wrap(hydra_main):
        @functools.wraps(hydra_main)
        def entry():
            msg = unknown_group_choice(sys.argv[1:])
            if msg:
                print(f"{app}: error: {msg}", file=sys.stderr)
                sys.exit(2)
            return hydra_main()
        return entry
    return wrap


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
                sys.exit(2)
        return inner
    return wrap


def _check_hydra_overrides(args) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .override_types import check_override_types
    if args and isinstance(args[0], DictConfig) and HydraConfig.initialized():
        check_override_types(args[0])


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
