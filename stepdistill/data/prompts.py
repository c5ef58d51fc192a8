"""Prompt lists for data-free text-to-image distillation, and the on-disk cache of their text embeddings.

`load_prompts(path, column)`: a .txt file (one prompt per line, blank lines skipped), a .csv file or a .parquet
file (the `column` column; default "prompt", or the only column).
"""
from __future__ import annotations

import csv
import hashlib
from collections import OrderedDict
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

    One folder per model, one safetensors shard per chunk of newly encoded prompts, each written through a
    temporary file and a rename. A miss writes new shards instead of rewriting every embedding seen so far, and
    two runs writing at once keep both's entries. `table(prompts)` reads nothing up front: its rows come from the
    shards when a batch asks for them, so a prompt set's embeddings need not fit in memory (~236 KB per SD1.5
    prompt, ~630 KB per SDXL one: 100k prompts were 24-63 GB stacked). The older single file (`<model>.safetensors`
    beside the folder) is still read."""

    chunk = 512   # prompts encoded, and held in memory, at a time: one shard each

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

    def table(self, prompts: list[str], encode) -> "EmbeddingTable":
        """The embeddings of `prompts`, row i for prompts[i]; `encode(list[str])` runs only on the missing ones,
        `chunk` prompts at a time."""
        where, key_of = self.index(), {p: self.key(p) for p in prompts}
        missing = sorted(p for p, k in key_of.items() if k not in where)
        chunks = range(0, len(missing), self.chunk)
        if len(chunks) > 1:
            from tqdm.auto import tqdm
            chunks = tqdm(chunks, desc=f"text embeddings of {len(missing)} prompts (cached)", leave=False)
        for i in chunks:
            part = missing[i:i + self.chunk]
            fresh = {key_of[p]: e.detach().cpu().contiguous() for p, e in zip(part, encode(part))}
            shard = self.folder / f"{hashlib.sha1(''.join(sorted(fresh)).encode()).hexdigest()[:16]}.safetensors"
            save_tensors(fresh, shard)
            where.update(dict.fromkeys(fresh, shard))
            self.encoded += len(part)
        keys = [key_of[p] for p in prompts]
        return EmbeddingTable([where[k] for k in keys], keys)

    def get(self, prompts: list[str], encode) -> torch.Tensor:
        """(N, tokens, dim) embeddings for `prompts`, all in memory (a negative prompt, image captions)."""
        return self.table(prompts, encode)[range(len(prompts))]


class EmbeddingTable:
    """Rows of cached embeddings read on demand: `table[indices]` is (len(indices), tokens, dim). The shards stay
    open (up to `max_open`, least recently used closed first): opening one and parsing its header costs ~1 ms,
    reading a row from an open one ~20 µs."""

    max_open = 256

    def __init__(self, files: list[Path], keys: list[str]):
        self.files, self.keys = files, keys
        self._open: OrderedDict[Path, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def _shard(self, f: Path):
        if f in self._open:
            self._open.move_to_end(f)
        else:
            self._open[f] = safe_open(str(f), "pt")
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return self._open[f]

    def __getitem__(self, indices) -> torch.Tensor:
        rows = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        read: dict[str, torch.Tensor] = {}   # a prompt drawn twice is read once
        for i in rows:
            if self.keys[i] not in read:
                read[self.keys[i]] = self._shard(self.files[i]).get_tensor(self.keys[i])
        return torch.stack([read[self.keys[i]] for i in rows])

    def __getstate__(self):   # open shards do not pickle: a copy opens its own
        return {**self.__dict__, "_open": OrderedDict()}
