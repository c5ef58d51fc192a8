"""CLIP score (Hessel et al. 2021) of images against their prompts with a CLIP model from a local folder
(`eval.clip.model=PATH`: CLIPModel + CLIPProcessor files from save_pretrained).

score = 100 · max(cos(image embedding, text embedding), 0), averaged over the samples: Hessel et al.'s CLIP-S
per sample, with torchmetrics' weight of 100 instead of the paper's 2.5. torchmetrics (1.9) clamps the mean
instead of each sample; the two agree unless some cosine is negative, which a trained CLIP seldom gives an image
and its own prompt.
Computed here rather than through torchmetrics' CLIPScore, which (1.9) breaks on transformers 5, whose
get_*_features return output objects instead of tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch


def load_local_clip(path: str | Path):
    from transformers import CLIPModel, CLIPProcessor
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip.model={path} is not a CLIPModel folder (config.json + weights + "
                                "processor files, as CLIPModel/CLIPProcessor.save_pretrained write)")
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def _embedding(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_score(images01: torch.Tensor, prompts: list[str], model_path: str | Path, batch_size: int = 64) -> dict:
    """`images01`: float N×3×H×W in [0, 1]; `prompts`: N strings."""
    if images01.shape[0] != len(prompts):
        raise ValueError(f"{images01.shape[0]} images but {len(prompts)} prompts")
    model, processor = load_local_clip(model_path)
    scores = []
    for i in range(0, len(prompts), batch_size):   # the processor expects 0-255 pixel values
        pixels = list((images01[i:i + batch_size].float() * 255).round().to(torch.uint8))
        pix = processor(images=pixels, return_tensors="pt")["pixel_values"]
        text = processor(text=prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True)
        img = _embedding(model.get_image_features(pixel_values=pix))
        txt = _embedding(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
        scores.append(100 * torch.nn.functional.cosine_similarity(img, txt).clamp_min(0))
    return {"clip_score": float(torch.cat(scores).mean()), "clip_score_num_samples": len(prompts)}
