"""Atomic checkpoints: `checkpoints/step_XXXXXXX/` holds one safetensors file per role + `trainer_state.pt`.

A checkpoint is written into a temporary sibling folder and renamed into place (os.replace is atomic on one
file system), so a kill mid-save leaves the previous checkpoint intact and never a half-written one. The files
and folders are synced to disk before and after the rename, so a machine that crashes right after a save (not
only a killed process) does not come back with a renamed folder of empty files.
`trainer_state.pt` holds only tensors and plain containers and is read back with `weights_only=True`.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{7,})$")
MOVED_ASIDE = re.compile(r"^\.old_step_(\d{7,})_\d+$")   # a step being rewritten in place, moved aside meanwhile


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def save_module(module: torch.nn.Module | dict, path: Path) -> None:
    """A module's weights, or an already gathered state dict (trainer=fsdp), as one safetensors file."""
    state = module if isinstance(module, dict) else module.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    # tied / shared tensors: safetensors refuses aliases, so store clones
    save_file({k: v.clone() for k, v in state.items()}, str(path))


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load `path` into `module`; a checkpoint of another network (another run's, or a changed config) is a
    ValueError the apps print in one line, not a traceback."""
    try:
        missing, unexpected = module.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as e:   # a tensor of another shape
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ValueError(f"checkpoint {path} does not match the network: {(shapes or [str(e)])[0]} (was it "
                         "written with a different config?)") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the network: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (was it written with a different config?)")


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: its list of names, so a rename is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, modules: dict[str, torch.nn.Module | dict], state: dict,
                    keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, mod in modules.items():
        save_module(mod, tmp / f"{name}.safetensors")
    torch.save(state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first, then swap
        old = root / f".old_{step_dir_name(step)}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    found = list_checkpoints(root)
    stale = found[:-keep] if keep > 0 else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    for leftover in root.glob(".tmp_step_*"):   # from saves killed before their rename: never checkpoints
        shutil.rmtree(leftover, ignore_errors=True)
    listed = set(found[len(stale):])   # a step moved aside counts only while its own folder is missing
    for aside in root.glob(".old_step_*"):   # from rewrites killed after their rename: replaced by now, or stale
        if aside not in listed:
            shutil.rmtree(aside, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A step whose rewrite was killed between moving the old folder aside and
    renaming the new one into place is still there, under its `.old_` name."""
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for pattern in (STEP_DIR, MOVED_ASIDE):   # a step's own folder wins over one moved aside
        for d in root.iterdir():
            m = pattern.match(d.name)
            if m and int(m.group(1)) not in found and d.is_dir() and (d / "trainer_state.pt").is_file():
                found[int(m.group(1))] = d
    return [found[step] for step in sorted(found)]


def checkpoint_before(root: Path, ckpt: Path) -> Path | None:
    """The newest checkpoint under `root` of an earlier step than `ckpt` (what to fall back on when it is
    damaged), or None."""
    step = checkpoint_step(ckpt)
    earlier = [c for c in list_checkpoints(root) if checkpoint_step(c) < step]
    return earlier[-1] if earlier else None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds (from its name: step_XXXXXXX, or .old_step_XXXXXXX_PID)."""
    m = STEP_DIR.match(path.name) or MOVED_ASIDE.match(path.name)
    if m is None:   # a folder renamed by hand: its trainer state knows
        return int(torch.load(path / "trainer_state.pt", weights_only=True)["step"])
    return int(m.group(1))


def damaged_file(path: Path) -> str | None:
    """The first file of checkpoint `path` that cannot be read (truncated or emptied after it was written: the
    write itself is atomic), with the reader's complaint; None if every file reads. Run only when a load failed,
    to tell damage from a config that no longer fits."""
    from safetensors import safe_open
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
        except Exception as e:   # safetensors' own error class differs across its versions
            return f"{f.name}: {' '.join(str(e).split())[:120]}"
    try:
        torch.load(path / "trainer_state.pt", weights_only=True)
    except Exception as e:   # EOFError, an unpickling or zip error, a truncated archive's RuntimeError
        return f"trainer_state.pt: {type(e).__name__} {' '.join(str(e).split())[:120]}"
    return None


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _role_file(path: Path, name: str) -> Path:
    f = path / f"{name}.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no weights for role {name!r} ({f.name})")
    return f


def load_sharded_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> dict:
    """load_checkpoint for sharded roles (trainer=fsdp): each process reads the whole weights, keeps its shards."""
    from .fsdp import load_full_state_dicts
    load_full_state_dicts(modules, {name: load_file(str(_role_file(path, name))) for name in modules})
    return torch.load(path / "trainer_state.pt", weights_only=True)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module]) -> dict:
    for name, mod in modules.items():
        load_module(mod, _role_file(path, name))
    return torch.load(path / "trainer_state.pt", weights_only=True)
