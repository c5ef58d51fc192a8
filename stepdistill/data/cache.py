"""The on-disk cache for work a run can reuse (text embeddings, teacher samples, VAE latents), and the atomic
safetensors write every cached or resumable file goes through."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger("stepdistill")


def cache_dir() -> Path:
    """$STEPDISTILL_CACHE, else ~/.cache/stepdistill."""
    return Path(os.environ.get("STEPDISTILL_CACHE", Path.home() / ".cache" / "stepdistill")).expanduser()


def digest(*parts: object) -> str:
    """A short stable key for a cache entry."""
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def files_stamp(files, root: Path | None = None) -> str:
    """Names, sizes and mtimes (in ns: a same-size rewrite within a second must change it) of `files` (relative
    to `root` when given): changes when any file does."""
    out = []
    for f in files:
        st = f.stat()
        out.append(f"{f.relative_to(root) if root else f}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(out)


def model_key(path: str | Path) -> str:
    """Identifies a model folder's weights: its resolved path and its files' sizes and mtimes."""
    root = Path(path).resolve()
    files = [f for f in sorted(root.rglob("*")) if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt")]
    return digest(root, files_stamp(files, root))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write through a temporary sibling and a rename: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def cache_holds(path: Path, key: str | None = None) -> bool:
    """`path` exists, saved under `key` when one is given."""
    if not path.is_file():
        return False
    if key is None:
        return True
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("key") == key


def cached_tensors(path: Path, compute, key: str | None = None) -> dict[str, torch.Tensor]:
    """`path`'s tensors if it exists (and was saved under `key`, when one is given), else `compute()`'s, saved
    there first. A file under a path that does not name its inputs (a run folder's) needs the key: the run's
    settings may have changed since it was written."""
    if cache_holds(path, key):
        return load_file(str(path))
    if path.is_file():
        log.info("%s was made with other settings: made again", path)
    tensors = compute()
    save_tensors(tensors, path, None if key is None else {"key": key})
    return tensors
