"""Training batches: the keys a method asks for, drawn with torch's global RNG (so resume is exact).

DMD's regression pairs (teacher ODE outputs for fixed noises, Yin et al. 2023 §3.3) are generated once per
run with their own seeded generator and cached in the run folder, so a resumed run reuses the same pairs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


def make_regression_pairs(benchmark, num: int, seed: int, path: Path | None = None, chunk: int = 256) -> dict:
    if path is not None and path.is_file():
        return load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    noise = benchmark.noise(num, gen)
    cond = benchmark.sample_cond(num, gen)
    targets = []
    for i in tqdm(range(0, num, chunk), desc="teacher regression pairs", leave=False):
        c = None if cond is None else cond[i:i + chunk]
        targets.append(benchmark.teacher_sample(noise[i:i + chunk], c))
    pairs = {"noise": noise, "target": torch.cat(targets)}
    if cond is not None:
        pairs["cond"] = cond
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(pairs, str(tmp))
        tmp.replace(path)
    return pairs


class BatchSource:
    def __init__(self, benchmark, keys, batch_size: int, device, pairs: dict | None = None):
        self.benchmark, self.keys, self.batch_size, self.device = benchmark, set(keys), batch_size, device
        self.pairs = pairs
        if {"reg_noise", "reg_target"} & self.keys and pairs is None:
            raise ValueError("this method needs regression pairs but none were made")

    def __call__(self) -> dict:
        n, bm, dev = self.batch_size, self.benchmark, self.device
        batch: dict = {}
        batch["noise"] = bm.noise(n).to(dev)
        cond = bm.sample_cond(n)
        batch["cond"] = None if cond is None else cond.to(dev)
        if "real" in self.keys:
            x, c = bm.sample_real(n)
            batch["real"], batch["real_cond"] = x.to(dev), None if c is None else c.to(dev)
        if "reg_noise" in self.keys:
            idx = torch.randint(0, self.pairs["noise"].shape[0], (n,))
            batch["reg_noise"] = self.pairs["noise"][idx].to(dev)
            batch["reg_target"] = self.pairs["target"][idx].to(dev)
            batch["reg_cond"] = self.pairs["cond"][idx].to(dev) if "cond" in self.pairs else None
        return batch
