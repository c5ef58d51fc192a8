"""Training batches: the keys a method asks for, drawn with torch's global RNG (so resume is exact).

DMD's regression pairs (teacher ODE outputs for fixed noises, Yin et al. 2023 §3.3) are generated once per
run with their own seeded generator and cached in the run folder, so a resumed run reuses the same pairs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import batch_split
from ..data.cache import cached_tensors, digest, save_tensors
from .evaluation import teacher_sample_batched


def regression_pairs_key(benchmark, num: int, seed: int, guidance: float | None = None, chunk: int = 256) -> str:
    """The cache key of the pairs: everything they depend on. The cache sits in the run folder under a fixed name,
    so a rerun there with other settings (pairs, seed, CFG scale, teacher, its sampler), or with the teacher's
    weights or the prompt file rewritten in place (`content_key`), makes them again."""
    settings = OmegaConf.to_yaml(benchmark.cfg) if getattr(benchmark, "cfg", None) is not None else ""
    return digest(num, seed, guidance, chunk, settings, benchmark.config_record(), benchmark.content_key())


def make_regression_pairs(benchmark, num: int, seed: int, path: Path | None = None, chunk: int = 256,
                          guidance: float | None = None, reuse: bool = True) -> dict:
    """`num` teacher ODE noise -> sample pairs; `guidance` is the CFG scale of the teacher the DM loss
    matches (DMD's `method.guidance`; None = the benchmark's), so both terms target the same distribution.
    `path`: their cache, read where it holds them unless `reuse` is false, and written when they are made."""
    def make() -> dict:
        gen = torch.Generator().manual_seed(seed)
        noise = benchmark.noise(num, gen)
        cond = benchmark.sample_cond(num, gen)
        target = teacher_sample_batched(benchmark, noise, cond, batch_size=chunk, progress="teacher regression pairs",
                                        guidance=guidance)
        return {"noise": noise, "target": target, **({} if cond is None else {"cond": cond})}

    if path is None:
        return make()
    key = regression_pairs_key(benchmark, num, seed, guidance, chunk)
    if not reuse:
        tensors = make()
        save_tensors(tensors, path, {"key": key})
        return tensors
    return cached_tensors(path, make, key)


class BatchSource:
    def __init__(self, benchmark, keys, batch_size: int, device, pairs: dict | None = None):
        self.benchmark, self.keys, self.batch_size, self.device = benchmark, set(keys), batch_size, device
        self.pairs = pairs
        if {"reg_noise", "reg_target"} & self.keys and pairs is None:
            raise ValueError("this method needs regression pairs but none were made")

    def __call__(self) -> dict:
        """This process's rows of a global batch (batch_split): every process draws the whole global batch, so
        the rows do not depend on the number of processes."""
        n, bm, dev = self.batch_size, self.benchmark, self.device
        total = batch_split.global_rows(n)

        def mine(t):
            return None if t is None else batch_split.local_rows(t, n).to(dev)

        batch: dict = {"noise": mine(bm.noise(total)), "cond": mine(bm.sample_cond(total))}
        if "real" in self.keys:
            x, c = bm.sample_real(total)
            batch["real"], batch["real_cond"] = mine(x), mine(c)
        if "reg_noise" in self.keys:
            idx = batch_split.randint(0, self.pairs["noise"].shape[0], n)
            batch["reg_noise"] = self.pairs["noise"][idx].to(dev)
            batch["reg_target"] = self.pairs["target"][idx].to(dev)
            batch["reg_cond"] = self.pairs["cond"][idx].to(dev) if "cond" in self.pairs else None
        return batch
