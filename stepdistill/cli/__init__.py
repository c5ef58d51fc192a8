"""Console scripts: each a Hydra app over conf/ (DESIGN §5)."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# ImportError: an optional dependency a setting needs (pyarrow for parquet prompts, torch-fidelity for Inception
# FID), whose message names the install; STEPDISTILL_TRACEBACK=1 shows the traceback of any of these
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError)


def user_errors(app: str):
    """Bad input ends in one line saying what to change, not a traceback."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except USER_ERRORS as e:
                if os.environ.get("STEPDISTILL_TRACEBACK"):
                    raise
                msg = e.args[0] if e.args else repr(e)
                print(f"{app}: error: {msg}", file=sys.stderr)
                sys.exit(2)
        return inner
    return wrap


def set_threads(n) -> None:
    import torch
    if n:
        torch.set_num_threads(int(n))


def pipe_table(head, rows) -> str:
    """A table of already formatted cells: a header, a `---` row, then one line per row, cells joined by " | "."""
    return "\n".join(" | ".join(cells) for cells in [list(head), ["---"] * len(head), *rows])
