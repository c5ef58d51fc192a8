"""The on-disk cache for work a run can reuse (text embeddings, teacher samples, VAE latents), and the atomic
safetensors write every cached or resumable file goes through."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    """$STEPDISTILL_CACHE, else ~/.cache/stepdistill."""
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill")).expanduser()


def digest(*parts: object) -> str:
    """A short stable key for a cache entry."""
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def files_stamp(files, root: Path | None = None) -> str:
    """Names, sizes and mtimes of `files` (relative to `root` when given): changes when any file does."""
    out = []
    for f in files:
        st = f.stat()
        out.append(f"{f.relative_to(root) if root else f}:{st.st_size}:{int(st.st_mtime)}")
    return "\n".join(out)


def model_key(path: str | Path) -> str:
    """Identifies a model folder's weights: its resolved path and its files' sizes and mtimes."""
    root = Path(path).resolve()
    files = [f for f in sorted(root.rglob("*")) if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt")]
    return digest(root, files_stamp(files, root))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write through a temporary sibling and a rename: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def cached_tensors(path: Path, compute) -> dict[str, torch.Tensor]:
    """`path`'s tensors if it exists, else `compute()`'s, saved there first."""
    if path.is_file():
        return load_file(str(path))
    tensors = compute()
    save_tensors(tensors, path)
    return tensors
