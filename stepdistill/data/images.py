"""Real images for text-to-image runs (`benchmark.data.images=DIR`): DMD2's GAN and the latent FD reference
then use real data instead of teacher samples.

DIR holds the images (png, jpg, jpeg, webp, bmp; subfolders too) and optionally their captions in
`metadata.csv` or `metadata.jsonl` files (columns `file_name` and `text`, as diffusers' and 🤗 datasets' imagefolder
expect), at DIR's top or in subfolders (`DIR/train/metadata.csv`), each `file_name` relative to its own file's
folder. An image without a caption gets the empty prompt. Images are resized on the shorter side and centre
cropped to the run's resolution, as SD training scripts do.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_image_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image file, caption) pairs, sorted by path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark.data.images={folder} is not a folder of images")
    captions: dict[str, str] = {}   # path relative to DIR -> caption
    metas = sorted(p for p in folder.rglob("metadata.*") if p.name in ("metadata.csv", "metadata.jsonl"))
    for meta in metas:   # each folder's own captions (imagefolder's layout: DIR/train/metadata.csv); .csv first
        if meta.name == "metadata.jsonl" and (meta.parent / "metadata.csv").is_file():
            continue
        if meta.suffix == ".csv":
            with meta.open(newline="", encoding="utf-8-sig") as f:   # a byte-order mark too
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in meta.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        for row in rows[:1]:   # a `caption` column gave every image the empty prompt, a missing file_name a KeyError
            if "file_name" not in row or "text" not in row:
                raise ValueError(f"benchmark.data.images: {meta} has columns {sorted(row)}: name them file_name and "
                                 "text (diffusers' imagefolder captions)")
        base = meta.parent.relative_to(folder)
        captions.update({(base / str(row["file_name"])).as_posix(): row.get("text") or "" for row in rows})
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"benchmark.data.images={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    pairs = [(p, captions.get(p.relative_to(folder).as_posix())) for p in files]
    uncaptioned = sum(c is None for _, c in pairs)
    if metas and uncaptioned:
        log.warning("benchmark.data.images: %d of %d images have no caption in %s (a file_name is the path relative "
                    "to its metadata file's folder); they get the empty prompt", uncaptioned, len(pairs),
                    ", ".join(m.relative_to(folder).as_posix() for m in metas))
    return [(p, c or "") for p, c in pairs]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]: shorter side resized (bicubic), centre crop."""
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(Image.open(path))   # a photo's Orientation tag, as diffusers' load_image
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):   # 16-bit grey: convert("RGB") clipped it at 255, to white
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()
