"""Method registry: `method.name` in the config -> the class that implements it."""
from .base import LossOut, Method
from .dmd import DMD
from .dmd2 import DMD2
from .scm import SCM
from .sid import SiD

METHODS = {"dmd": DMD, "dmd2": DMD2, "scm": SCM, "sid": SiD}


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use method= one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["LossOut", "Method", "METHODS", "method_class"]
