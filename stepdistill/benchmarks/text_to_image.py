"""Latent text-to-image teachers (SD1.x-style pipeline folders), distilled data-free from a prompt list.

`tiny_sd` is the tiny random pipeline `stepdistill-teacher benchmark=tiny_sd` builds (built on first use into
the cache when `teacher.path` is unset); `text_to_image` takes any local StableDiffusionPipeline folder
(`teacher.path=DIR`: unet/, vae/, text_encoder/, tokenizer/, scheduler/). The student works in the VAE's latent
space; images appear only for figures and image metrics (decoded by the teacher's VAE).

Conditioning is the text encoder's hidden states; their embeddings are cached on disk per model and prompt.
The "real" samples some methods need (DMD2's GAN) are teacher ODE samples, generated once and cached too.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from functools import cached_property
from pathlib import Path

import torch

from ..checks import at_least, non_negative, or_default
from ..data.cache import cache_dir, cached_tensors, digest, files_stamp, model_key
from ..data.prompts import EmbeddingCache, load_prompts
from ..networks.text_unet import SDXLConditionedUNet, TextConditionedUNet, TextDenoiser, pack_sdxl_cond
from ..teachers import scheduler_config, vp_schedule
from .base import Benchmark
from .tiny_sd_teacher import TOKENIZER_PROMPTS, build_tiny_sd, build_tiny_sdxl

log = logging.getLogger("stepdistill")


# the tiny teachers' build, in their cache folder's name: a build before 2 had a tokenizer that differed from one
# process to the next (tiny_sd_teacher.build_tokenizer), and is not reused
TINY_BUILD = 2


def tiny_path(name: str = "tiny_sd") -> Path:
    """The tiny_sd / tiny_sdxl teacher in the cache, built once (deterministic: seed 0)."""
    path = cache_dir() / f"{name}-build{TINY_BUILD}"
    if not (path / "model_index.json").is_file():
        tmp = path.with_name(f".{name}.tmp{os.getpid()}")
        (build_tiny_sdxl if name == "tiny_sdxl" else build_tiny_sd)(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:   # another process (a second rank) got there first: theirs is the same build
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_pipeline_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"teacher path {path} does not exist: set benchmark.teacher.path to a local "
                                "StableDiffusionPipeline folder (or run stepdistill-teacher benchmark=tiny_sd out=DIR)")
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"teacher path {path} lacks {missing}: it must be a StableDiffusionPipeline folder "
                                "written by save_pretrained (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")


class TextToImageBenchmark(Benchmark):
    name = "text_to_image"
    kind = "image"

    def __init__(self, cfg):
        super().__init__(cfg)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.name = cfg.name
        given = cfg.teacher.get("path")
        if not given and cfg.name not in ("tiny_sd", "tiny_sdxl"):
            raise FileNotFoundError(f"benchmark={cfg.name} needs benchmark.teacher.path=DIR (a local "
                                    "StableDiffusionPipeline folder)")
        self.path = Path(given).expanduser() if given else tiny_path(cfg.name)
        check_pipeline_folder(self.path)
        sched_cfg = scheduler_config(self.path)
        self.schedule = vp_schedule(sched_cfg)
        self.prediction_type = sched_cfg.get("prediction_type", "epsilon")
        want = cfg.teacher.get("prediction_type")
        if want and want != self.prediction_type:
            raise ValueError(f"benchmark.teacher.prediction_type={want!r} does not match the teacher's scheduler, which says "
                             f"{self.prediction_type!r}: remove the override or set it to {self.prediction_type!r}")
        unet = UNet2DConditionModel.from_pretrained(self.path / "unet", use_safetensors=True).eval()
        added = getattr(unet.config, "addition_embed_type", None)
        self.sdxl = added == "text_time"
        if added and not self.sdxl:
            raise ValueError(f"{self.path} holds a UNet with {added!r} added conditioning: only SD1.x/2.x and SDXL "
                             "('text_time') pipelines are supported")
        if getattr(unet.config, "time_cond_proj_dim", None):   # the pipelines feed it a guidance-scale embedding
            raise ValueError(f"{self.path} holds a UNet with time_cond_proj_dim={unet.config.time_cond_proj_dim} (a "
                             "guidance-embedded, LCM-style model): stepdistill calls it without that embedding, unlike "
                             "the stock pipelines; give a teacher without it")
        if self.sdxl and not (self.path / "text_encoder_2").is_dir():
            raise FileNotFoundError(f"{self.path} has an SDXL UNet but no text_encoder_2/: it must be a "
                                    "StableDiffusionXLPipeline folder")
        for p in unet.parameters():
            p.requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(self.path / "vae", use_safetensors=True).eval()
        self.vae.requires_grad_(False)
        # SD3/Flux-style VAEs shift their latents, and some SDXL variants normalise them per channel; our latent
        # maps (encode, decode) and the exported SD/SDXL pipelines use the scaling factor alone.
        shifted = {k: self.vae.config.get(k) for k in ("shift_factor", "latents_mean", "latents_std")
                   if self.vae.config.get(k) not in (None, 0, 0.0)}
        if shifted:
            raise ValueError(f"{self.path / 'vae'} sets {shifted}: benchmark={cfg.name} supports VAEs scaled by "
                             "scaling_factor alone (SD1.x/2.x, SDXL); use such a teacher")
        # float32 as the UNet and the VAE: transformers loads a checkpoint's own dtype (a folder saved in fp16, the
        # usual local SD copy, gave fp16 embeddings the fp32 UNet's attention refused), diffusers loads float32
        self.text_encoder = CLIPTextModel.from_pretrained(self.path / "text_encoder", use_safetensors=True).float()
        self.text_encoder.eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.path / "tokenizer")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.text_encoder_2 = self.tokenizer_2 = None
        if self.sdxl:
            from transformers import CLIPTextModelWithProjection
            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(self.path / "text_encoder_2",
                                                                              use_safetensors=True).float().eval()
            self.text_encoder_2.requires_grad_(False)
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(self.path / "tokenizer_2")
            index = json.loads((self.path / "model_index.json").read_text())
            self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        res = self.resolution = at_least("benchmark.resolution",
                                         or_default(cfg.get("resolution"), unet.config.sample_size * self.vae_scale))

        data = cfg.get("data") or {}
        self.prompts = (load_prompts(data["prompts"], data.get("prompt_column")) if data.get("prompts")
                        else list(TOKENIZER_PROMPTS))
        if not data.get("prompts") and self.name == "text_to_image":   # tiny_sd's eight prompts are its design
            log.warning("benchmark=text_to_image without benchmark.data.prompts: the student learns from the %d "
                        "built-in test prompts only; set benchmark.data.prompts=FILE (.txt, .csv, .parquet)",
                        len(self.prompts))
        # the tokenizers too: a changed vocabulary or model_max_length changes every embedding
        parts = ["text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if self.sdxl else [])
        self.embedding_cache = EmbeddingCache("-".join(model_key(self.path / p) for p in parts))
        # read by rows as batches draw them: a prompt set's embeddings need not fit in memory
        self.prompt_table = self.embedding_cache.table(self.prompts, self.encode_prompts)
        negative = str(cfg.get("negative_prompt") or "")
        if self.sdxl and not negative and self.force_zeros_for_empty_prompt:   # as SDXL's own pipeline does
            null = torch.zeros_like(self.prompt_table[[0]])
        else:
            null = self.embedding_cache.get([negative], self.encode_prompts)
        null = self.pack(null)[0]
        self.teacher = TextDenoiser(self.wrap(unet), self.schedule, self.prediction_type, null)
        self.images_encoded = 0   # images this process had to put through the VAE (the rest came from the cache)

        if res % (self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise ValueError(f"benchmark.resolution={res} cannot go through this VAE and UNet: use a multiple of "
                             f"{self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)}")
        self.data_shape = (unet.config.in_channels, res // self.vae_scale, res // self.vae_scale)
        self.guidance = non_negative("benchmark.guidance", or_default(cfg.get("guidance"), 1.0))
        self.teacher_steps = at_least("benchmark.teacher_steps", or_default(cfg.get("teacher_steps"), 25))
        self.num_real = at_least("benchmark.num_real", or_default(cfg.get("num_real"), 256))

    @property
    def conditional(self) -> bool:
        return True

    def wrap(self, unet) -> TextConditionedUNet:
        if self.sdxl:
            return SDXLConditionedUNet(unet, self.text_encoder_2.config.projection_dim)
        return TextConditionedUNet(unet)

    def pack(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cached text embeddings -> the UNet's cond. SDXL: the cache holds states + a pooled row; the six
        size/crop numbers (original = target = this resolution, no crop, as its pipeline's defaults) are added
        here, since they depend on the run's resolution, not on the text."""
        if not self.sdxl:
            return embeddings
        n = embeddings.shape[0]
        p = self.text_encoder_2.config.projection_dim
        time_ids = torch.tensor([self.resolution, self.resolution, 0, 0, self.resolution, self.resolution],
                                dtype=embeddings.dtype).expand(n, 6)
        return pack_sdxl_cond(embeddings[:, :-1], embeddings[:, -1, :p], time_ids)

    # --- roles -------------------------------------------------------------------------------------------
    def make_student_denoiser(self):
        unet = copy.deepcopy(self.teacher.net.unet).train()
        unet.requires_grad_(True)
        return self.student_denoiser(unet)

    def student_denoiser(self, backbone):
        t = self.teacher
        return TextDenoiser(self.wrap(backbone), t.schedule, t.prediction_type, t.null_embedding)

    # --- data --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """SD1.x: the encoder's last hidden states. SDXL (as its pipeline): both encoders' penultimate states,
        concatenated, plus one row holding the second encoder's pooled projection (then zeros)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            ids = self.tokenizer(chunk, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            if not self.sdxl:
                out.append(self.text_encoder(ids)[0])
                continue
            ids_2 = self.tokenizer_2(chunk, padding="max_length", truncation=True,
                                     max_length=self.tokenizer_2.model_max_length, return_tensors="pt").input_ids
            first = self.text_encoder(ids, output_hidden_states=True)
            second = self.text_encoder_2(ids_2, output_hidden_states=True)
            hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
            pooled = second.text_embeds
            row = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[-1])
            row[:, 0, :pooled.shape[-1]] = pooled
            out.append(torch.cat([hidden, row], 1))
        return torch.cat(out)

    def prompt_cond(self, prompts: list[str]) -> torch.Tensor:
        """The UNet's cond for any prompts (through the embedding cache)."""
        return self.pack(self.embedding_cache.get(list(prompts), self.encode_prompts))

    def sample_cond(self, n: int, generator: torch.Generator | None = None):
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator)
        return self.pack(self.prompt_table[idx])

    def eval_cond(self, n: int):
        """Prompts in file order, cycled: every prompt equally represented (the text analogue of balanced
        labels); `eval_labels(n)` names them."""
        return self.pack(self.prompt_table[torch.arange(n) % len(self.prompts)])

    def eval_labels(self, n: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def content_key(self) -> str:
        """The teacher's weights, the prompts and the negative prompt (CFG's unconditional branch)."""
        # the prompts as one JSON list: joined by digest's "|", ["a cat|a dog"] had the key of ["a cat", "a dog"]
        return digest(model_key(self.path), self.cfg.get("negative_prompt") or "", json.dumps(list(self.prompts)))

    def teacher_samples_key(self, n: int) -> str:
        """The cache key of `n` teacher samples standing in for real data: everything they depend on."""
        return digest(self.content_key(), self.guidance, self.teacher_steps, n, self.data_shape)

    @cached_property
    def real_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Real latents with their conds: the VAE latents of `benchmark.data.images` if set, else teacher ODE
        samples standing in for real data. Both are cached on disk."""
        images = (self.cfg.get("data") or {}).get("images")
        if images:
            return self.image_latents(images)
        n = self.num_real
        key = self.teacher_samples_key(n)

        def sample() -> dict:
            from ..train.evaluation import teacher_sample_batched
            gen = torch.Generator().manual_seed(0)
            noise, cond = self.noise(n, gen), self.sample_cond(n, gen)
            return {"latents": teacher_sample_batched(self, noise, cond, batch_size=64,
                                                      progress="teacher samples (cached)"), "cond": cond}

        d = cached_tensors(cache_dir() / "teacher_samples" / f"{key}.safetensors", sample)
        return d["latents"], d["cond"]

    @torch.no_grad()
    def image_latents(self, folder) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latents (the distribution's mean, times the VAE's scaling factor) of an image folder, cached per
        VAE, resolution and file list (paths, sizes, mtimes); their captions' conds."""
        from ..data.images import load_image, load_image_folder
        items = load_image_folder(folder)
        key = digest(model_key(self.path / "vae"), self.resolution, files_stamp([p for p, _ in items]))

        def encode() -> dict:
            from tqdm.auto import tqdm
            scale, out, vae = float(self.vae.config.scaling_factor), [], self.vae_on_teachers_device()
            for i in tqdm(range(0, len(items), 16), desc="VAE latents (cached)", leave=False):
                x = torch.stack([load_image(p, self.resolution) for p, _ in items[i:i + 16]])
                out.append(vae.encode(x.to(vae.device)).latent_dist.mean.cpu() * scale)
            self.images_encoded = len(items)
            return {"latents": torch.cat(out)}

        latents = cached_tensors(cache_dir() / "vae_latents" / f"{key}.safetensors", encode)["latents"]
        return latents, self.prompt_cond([caption for _, caption in items])

    def sample_real(self, n):
        latents, cond = self.real_samples
        idx = torch.randint(0, latents.shape[0], (n,))
        return latents[idx], cond[idx]

    # --- output ------------------------------------------------------------------------------------------
    def vae_on_teachers_device(self):
        """The VAE, moved to where the teacher runs: it is no role, so the run's move to a GPU left it on the CPU,
        where decoding an SD evaluation's samples takes minutes per hundred images."""
        return self.vae.to(next(self.teacher.parameters()).device)

    @torch.no_grad()
    def to_output(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Latents -> images in [0, 1] through the teacher's VAE, decoded on the teacher's device, returned on
        the CPU as the samples are. `batch_size` None: as many images as make ~2 M pixels (8 at 512², 2 at 1024²,
        at most 64): the decoder's activations take ~0.6 GB per 512² image in float32, so 64 at a time were ~38 GB."""
        if batch_size is None:
            batch_size = max(1, min(64, 2**21 // (self.resolution * self.resolution)))
        scale, vae = float(self.vae.config.scaling_factor), self.vae_on_teachers_device()
        out = [vae.decode(x[i:i + batch_size].to(vae.device, torch.float32) / scale).sample.cpu()
               for i in range(0, x.shape[0], batch_size)]
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)

    def fid_reference_images(self):
        """The decoded real latents: the image folder's, or the cached teacher samples."""
        return self.to_output(self.real_samples[0])

    def prepare_evaluation(self) -> None:
        # the teacher samples standing in for real data (on a cache miss, the sharded teacher's sampling): a run
        # whose method never drew them (SiD, DMD) hung at its final evaluation under trainer=fsdp
        self.real_samples

    def evaluate(self, samples, labels=None):
        """latent_fd: Fréchet distance between the samples' latents and the cached teacher samples' latents
        (flattened; no feature network). Meaningful between runs on the same teacher, not across teachers."""
        from ..eval.frechet import gaussian_frechet_distance, nonfinite_rows
        reference, _ = self.real_samples
        samples = samples.float()
        nonfinite = nonfinite_rows(samples)
        # a diverged student's nan/inf latents made the covariance's eigh fail and ended the evaluation
        fd = float("nan") if nonfinite else gaussian_frechet_distance(reference, samples)
        metrics = {"latent_fd": fd,
                   "latent_fd_num_reference": int(reference.shape[0]), "latent_fd_num_samples": int(samples.shape[0]),
                   "num_nonfinite": nonfinite}
        return metrics

    def save_figure(self, samples, labels, path, teacher_samples=None):
        from ..eval.grids import save_image_grid, teacher_above_student
        nrow = min(8, samples.shape[0])
        x = self.to_output(samples[:nrow * 4])
        if teacher_samples is not None:  # teacher rows on top, a grey row, the student rows (same noise/prompts)
            x = teacher_above_student(self.to_output(teacher_samples[:nrow * 4]), x, nrow)
        return save_image_grid(x, path, nrow=nrow, scale=2)

    def config_record(self):
        return {"teacher_resolved": {"path": str(self.path), "guidance": self.guidance,
                                     "teacher_steps": self.teacher_steps, "num_prompts": len(self.prompts)}}
