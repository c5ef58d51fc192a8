"""Why this file exists: this folder is the source of `stepdistill.kernels` (pyproject maps it). Python started
from the repository root (`python -m pytest`, `python -m stepdistill...`) has the root on sys.path, so the folder
is also found as a top-level package `kernels`, and it hides Hugging Face's `kernels` package, which transformers
(and through it peft and diffusers' LoRA loaders) imports. `hand_over` gives that name back to the installed
package, or to nothing where none is installed, as if the folder were not on the path."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str = "kernels") -> None:
    """Replace this folder's module under `name` in sys.modules by the next package of that name on sys.path
    (import returns whatever sys.modules holds once the package's __init__ has run); raise ModuleNotFoundError,
    as a plain `import kernels` would, where there is none."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
