"""Prompt lists for data-free text-to-image distillation, and the on-disk cache of their text embeddings.

`load_prompts(path, column)`: a .txt file (one prompt per line, blank lines skipped), a .csv file or a .parquet
file (the `column` column; default "prompt", or the only column).
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

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
    """Text embeddings keyed by (model, prompt), one safetensors file per model; a second run re-encodes
    nothing it has seen. Writes go through a temporary file and a rename."""

    def __init__(self, model: str, directory: Path | None = None):
        self.file = (directory or cache_dir()) / "text_embeddings" / f"{model}.safetensors"
        self.table: dict[str, torch.Tensor] = load_file(str(self.file)) if self.file.is_file() else {}
        self.encoded = 0        # how many prompts this process had to encode (tests check cache hits)

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha1(prompt.encode()).hexdigest()

    def get(self, prompts: list[str], encode) -> torch.Tensor:
        """(N, tokens, dim) embeddings for `prompts`; `encode(list[str])` runs only on the missing ones."""
        missing = sorted({p for p in prompts if self.key(p) not in self.table})
        if missing:
            out = encode(missing)
            for p, e in zip(missing, out):
                self.table[self.key(p)] = e.detach().cpu().contiguous()
            self.encoded += len(missing)
            save_tensors(self.table, self.file)
        return torch.stack([self.table[self.key(p)] for p in prompts])
