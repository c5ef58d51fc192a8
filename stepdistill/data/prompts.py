"""Prompt lists for data-free text-to-image distillation, and the on-disk cache of their text embeddings.

`load_prompts(path, column)`: a .txt file (one prompt per line, blank lines skipped), a .csv file or a .parquet
file (the `column` column; default "prompt", or the only column).
"""
from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import torch
from safetensors import safe_open

from .cache import cache_dir, save_tensors


def load_prompts(path: str | Path, column: str | None = None) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"benchmark.data.prompts={path} does not exist: give a .txt (one prompt per line), .csv or "
                                ".parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"benchmark.data.prompts={path} is a parquet file, which needs pyarrow: "
                              "pip install 'stepdistill[parquet]' (or pyarrow), or give a .txt or .csv file") from e
        table = pq.read_table(path)
        names = table.column_names
        col = _pick_column(column, names, path)
        prompts = [str(p) for p in table.column(col).to_pylist() if p is not None]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:   # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            col = _pick_column(column, reader.fieldnames or [], path)
            prompts = [row[col] for row in reader if row.get(col)]
    elif suffix in (".txt", ""):
        prompts = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]   # as the CSV
    else:   # a .jsonl or .tsv read as lines gave prompts such as '{"prompt": "a cat"}'
        raise ValueError(f"benchmark.data.prompts={path}: give a .txt (one prompt per line), .csv or .parquet file")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"benchmark.data.prompts={path} holds no prompts")
    return prompts


def _pick_column(column: str | None, names: list[str], path: Path) -> str:
    if column:
        if column not in names:
            raise ValueError(f"benchmark.data.prompt_column={column!r} is not a column of {path}: it has {names}")
        return column
    if "prompt" in names:
        return "prompt"
    if len(names) == 1:
        return names[0]
    raise ValueError(f"{path} has columns {names}: set benchmark.data.prompt_column to the one holding the prompts")


class EmbeddingCache:
    """Text embeddings keyed by (model, prompt): a second run re-encodes nothing it has seen.

    One folder per model, one safetensors shard per batch of newly encoded prompts, each written through a
    temporary file and a rename. A run reads only the embeddings it asks for (from the shards' headers, then those
    tensors), and a miss writes a new shard instead of rewriting every embedding seen so far: the single file of
    before held the whole table in memory beside the stacked copy (~450 MiB per 1000 SD1.5 prompts), was rewritten
    whole on each miss, and two runs writing at once lost one's entries. That older file (`<model>.safetensors`
    beside the folder) is still read."""

    def __init__(self, model: str, directory: Path | None = None):
        root = (directory or cache_dir()) / "text_embeddings"
        self.folder = root / model
        self.legacy = root / f"{model}.safetensors"
        self.encoded = 0        # how many prompts this process had to encode (tests check cache hits)

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha1(prompt.encode()).hexdigest()

    def index(self) -> dict[str, Path]:
        """Each cached prompt key and the file that holds it (headers only)."""
        files = [self.legacy] if self.legacy.is_file() else []
        files += sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        found: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    found.setdefault(k, f)
        return found

    def get(self, prompts: list[str], encode) -> torch.Tensor:
        """(N, tokens, dim) embeddings for `prompts`; `encode(list[str])` runs only on the missing ones."""
        keys = [self.key(p) for p in prompts]
        where = self.index()
        missing = sorted({p for p, k in zip(prompts, keys) if k not in where})
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            fresh = {self.key(p): e.detach().cpu().contiguous() for p, e in zip(missing, encode(missing))}
            self.encoded += len(missing)
            shard = hashlib.sha1("".join(sorted(fresh)).encode()).hexdigest()[:16]
            save_tensors(fresh, self.folder / f"{shard}.safetensors")
        rows: dict[str, list[int]] = {}   # each prompt's rows of the result (a prompt may repeat)
        for i, k in enumerate(keys):
            rows.setdefault(k, []).append(i)
        result = None
        for k, tensor in itertools.chain(fresh.items(), self._read(where, rows.keys() - fresh.keys())):
            if result is None:   # one preallocated result: no second copy of every embedding to stack
                result = tensor.new_empty((len(prompts), *tensor.shape))
            result[rows[k]] = tensor
        return result

    @staticmethod
    def _read(where: dict[str, Path], keys):
        """(key, tensor) for each of `keys`, each shard opened once."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(where[k], []).append(k)
        for f, file_keys in by_file.items():
            with safe_open(str(f), "pt") as st:
                for k in file_keys:
                    yield k, st.get_tensor(k)
