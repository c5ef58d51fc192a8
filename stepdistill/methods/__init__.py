"""Method registry: `method.name` in the config -> the class that implements it."""
from .base import LossOut, Method
from .dmd import DMD
from .dmd2 import DMD2
from .rcm import RCM
from .scm import SCM
from .fdistill import FDistill
from .sid import SiD, SiDFewStep
from .sida import SiDA
from .sim import SIM

METHODS = {"dmd": DMD, "dmd2": DMD2, "fdistill": FDistill, "rcm": RCM, "scm": SCM, "sid": SiD, "sid_fewstep": SiDFewStep,
           "sida": SiDA, "sim": SIM}


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use method= one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["LossOut", "Method", "METHODS", "method_class"]
