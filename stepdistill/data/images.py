"""Real images for text-to-image runs (`benchmark.data.images=DIR`): DMD2's GAN and the latent FD reference
then use real data instead of teacher samples.

DIR holds the images (png, jpg, jpeg, webp, bmp; subfolders too) and optionally their captions in
`metadata.csv` or `metadata.jsonl` (columns `file_name` and `text`, as diffusers' and 🤗 datasets' imagefolder
expect). An image without a caption gets the empty prompt. Images are resized on the shorter side and centre
cropped to the run's resolution, as SD training scripts do.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_image_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image file, caption) pairs, sorted by path."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark.data.images={folder} is not a folder of images")
    captions: dict[str, str] = {}
    if (folder / "metadata.csv").is_file():
        with (folder / "metadata.csv").open(newline="", encoding="utf-8-sig") as f:   # a byte-order mark too
            captions = {row["file_name"]: row.get("text") or "" for row in csv.DictReader(f)}
    elif (folder / "metadata.jsonl").is_file():
        for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                captions[row["file_name"]] = row.get("text") or ""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"benchmark.data.images={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [(p, captions.get(str(p.relative_to(folder)), "")) for p in files]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) in [-1, 1]: shorter side resized (bicubic), centre crop."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()
