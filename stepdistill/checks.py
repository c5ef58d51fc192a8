"""Setting checks shared by the apps, the trainer and the methods: a bad value is a one-line ValueError that
names the setting (the console scripts print it as `stepdistill-APP: error: ...`). Nothing here imports torch:
the apps check their input with these before the heavy imports, so a usage error answers at once (~0.3 s)."""
from __future__ import annotations

from pathlib import Path


class NonFiniteError(RuntimeError):
    """Training stopped after `trainer.max_nonfinite_steps` non-finite updates of one phase in a row: the console
    scripts print its message (what to change) as one line, like a bad setting's."""


def at_least(key: str, value, least: int = 1) -> int:
    """`value` as an int >= `least`, else a one-line error naming the setting `key`."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):   # OverflowError: int(inf)
        n = None
    if n is None or n < least or n != float(value):
        raise ValueError(f"{key}={value}: need an integer >= {least}")
    return n


def eval_sample_count(key: str, value, hint: str = "") -> int:
    """An evaluation's sample count as an int: a covariance (FD) needs 2 (0 was an IndexError deep in sampling).
    `hint` ends the one-line error."""
    n = int(value)
    if n < 2:
        raise ValueError(f"{key}={value}: an evaluation needs at least 2 samples{hint}")
    return n


def non_negative(key: str, value) -> float:
    """`value` as a float >= 0 (a loss weight: 0 switches the term off), else a one-line error naming `key`."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not x >= 0:
        raise ValueError(f"{key}={value}: need a number >= 0")
    return x


def or_default(value, default):
    """`value` unless it is unset (None): `value or default` would also replace a meaningful 0 (guidance 0 is the
    unconditional model) or hide a bad one (0 sampler steps)."""
    return default if value is None else value


def run_folder(run_dir) -> Path:
    """`run_dir` as the folder of a stepdistill-train run (it holds config.yaml), else a one-line error."""
    if not run_dir:
        raise ValueError("give run_dir=D (a stepdistill-train run folder)")
    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder / 'config.yaml'} not found: run_dir= must be a stepdistill-train run folder")
    return folder


def make_folder(folder, setting: str) -> Path:
    """`folder` made with its parents and written to, for the setting named `setting` (`out`, `hydra.run.dir`), or
    a one-line error saying what to change: a file on the path was `[Errno 17] File exists`, which does not say
    which setting to change, and an existing folder may refuse writes (os.access says yes to root on /proc)."""
    import tempfile
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:   # a file in the way (File exists, Not a directory), no permission
        raise ValueError(f"{setting}: cannot make or write the folder {folder} ({e.strerror}"
                         f"{': ' + str(e.filename) if e.filename else ''}): choose another {setting}") from None
    return folder
