"""Building the `tiny_sd` teacher: a tiny, randomly initialised Stable-Diffusion-style pipeline made locally.

UNet2DConditionModel (cross-attention on CLIP text states) + AutoencoderKL + CLIPTextModel + a CLIP tokenizer
whose byte-level BPE is trained here with the tokenizers library on a few prompts, all saved with
`StableDiffusionPipeline.save_pretrained`, so stock diffusers loads the folder. Nothing is downloaded. It proves
the latent / text / CFG / export path of the SD-style teachers, not image quality (DESIGN §6 `tiny_sd`).
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

# SD 1.x's noise schedule and scheduler settings, so recipes written for SD apply unchanged.
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
TOKENIZER_PROMPTS = ("a photo of a cat", "a red car on a road", "a painting of a dog in the snow",
                     "a bowl of fruit on a wooden table", "a blue bird sitting on a branch",
                     "an astronaut riding a horse", "a city street at night", "a mountain lake at sunrise")


def build_tokenizer(max_length: int = 16, vocab_size: int = 600, prompts=TOKENIZER_PROMPTS):
    """A CLIP tokenizer (CLIP's normaliser and pre-tokeniser) with a byte-level BPE learnt on `prompts`.

    Every byte is in the vocabulary both inside a word and as a word end, so any text tokenizes without an
    unknown token; frequent words become single tokens. The merges are learnt here, not by the tokenizers
    library's trainer, which breaks ties between equally frequent pairs in hash order: its vocabulary, and so the
    teacher, changed from one process to the next."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer   # CLIP's normaliser and byte-level pre-tokeniser
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words: Counter = Counter()
    for prompt in prompts:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(prompt)):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = bpe_merges(words, vocab_size - len(specials) - len(alphabet))
    tokens = [*specials, *alphabet, *(ch + "</w>" for ch in alphabet), *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def bpe_merges(words: Counter, count: int) -> list[tuple[str, str]]:
    """Up to `count` BPE merges of `words` (symbol tuples with their frequencies): each time the most frequent
    adjacent pair, ties broken by the pair itself, so the same words always give the same merges."""
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def build_tiny_sd(out_dir, seed: int = 0, image_size: int = 16, text_dim: int = 32, max_length: int = 16) -> Path:
    """Write a StableDiffusionPipeline folder to `out_dir`: images image_size², latents 4 × (image_size / 2)².
    Seeded, and without touching the caller's random stream (a run must not depend on whether it built this)."""
    with torch.random.fork_rng(devices=[]):
        return _build_tiny_sd(out_dir, seed, image_size, text_dim, max_length)


def _build_tiny_sd(out_dir, seed: int, image_size: int, text_dim: int, max_length: int) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, projection_dim=text_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size)
    unet = UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=text_dim, attention_head_dim=8)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


def build_tiny_sdxl(out_dir, seed: int = 0, image_size: int = 16, text_dim: int = 32, max_length: int = 16) -> Path:
    """Write a tiny StableDiffusionXLPipeline folder: two CLIP text encoders (the second with a projection, whose
    pooled output and the six size/crop numbers feed the UNet's added "text_time" conditioning), the
    encoders' penultimate states concatenated for cross-attention. Random weights; no download."""
    with torch.random.fork_rng(devices=[]):
        return _build_tiny_sdxl(out_dir, seed, image_size, text_dim, max_length)


def _build_tiny_sdxl(out_dir, seed: int, image_size: int, text_dim: int, max_length: int) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(max_length)
    tokenizer_2 = build_tokenizer(max_length)

    def text_config(projection: int):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                              projection_dim=projection, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    text_encoder = CLIPTextModel(text_config(text_dim))
    projection = text_dim
    text_encoder_2 = CLIPTextModelWithProjection(text_config(projection))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size)
    time_dim = 8
    unet = UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=2 * text_dim, attention_head_dim=(2, 4),
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=projection + 6 * time_dim,
                                transformer_layers_per_block=(1, 1), use_linear_projection=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=DDIMScheduler(**SD_SCHEDULER), force_zeros_for_empty_prompt=True)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out
