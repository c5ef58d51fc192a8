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


def check_clip_folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip.model={path} is not a CLIPModel folder (config.json + weights + "
                                "processor files, as CLIPModel/CLIPProcessor.save_pretrained write)")
    return path


def load_local_clip(path: str | Path):
    from transformers import CLIPModel, CLIPProcessor
    path = check_clip_folder(path)
    try:
        processor = CLIPProcessor.from_pretrained(path)
    except OSError as e:   # transformers' own message names files, not the setting
        raise FileNotFoundError(f"eval.clip.model={path} has no CLIPProcessor files (tokenizer and image processor, "
                                f"as CLIPProcessor.save_pretrained writes): {str(e).splitlines()[0]}") from None
    return CLIPModel.from_pretrained(path).float().eval(), processor   # float32 as on the CPU: an fp16 folder too


def _embedding(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def clip_score(images01: torch.Tensor, prompts: list[str], model_path: str | Path, batch_size: int = 64,
               device: str | torch.device | None = None) -> dict:
    """`images01`: float N×3×H×W in [0, 1]; `prompts`: N strings; the model runs on `device` (None: the CPU)."""
    if images01.shape[0] != len(prompts):
        raise ValueError(f"{images01.shape[0]} images but {len(prompts)} prompts")
    from .frechet import nonfinite_rows
    nonfinite = nonfinite_rows(images01)
    if nonfinite:   # a diverged student: nan pixels cast to 0 scored as black images (as FID and latent FD, nan)
        return {"clip_score": float("nan"), "clip_score_num_samples": len(prompts), "clip_score_num_nonfinite": nonfinite}
    model, processor = load_local_clip(model_path)
    model.to(device or "cpu")
    # decoded latents overshoot [0, 1] a little; the uint8 cast wrapped them (1.2 -> 50) instead of saturating
    images01 = images01.clamp(0, 1)
    scores = []
    for i in range(0, len(prompts), batch_size):   # the processor expects 0-255 pixel values
        pixels = list((images01[i:i + batch_size].float() * 255).round().to(torch.uint8))
        pix = processor(images=pixels, return_tensors="pt")["pixel_values"]
        text = processor(text=prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True)
        img = _embedding(model.get_image_features(pixel_values=pix.to(model.device)))
        txt = _embedding(model.get_text_features(input_ids=text["input_ids"].to(model.device),
                                                 attention_mask=text["attention_mask"].to(model.device)))
        scores.append(100 * torch.nn.functional.cosine_similarity(img, txt).clamp_min(0).cpu())
    return {"clip_score": float(torch.cat(scores).mean()), "clip_score_num_samples": len(prompts)}
