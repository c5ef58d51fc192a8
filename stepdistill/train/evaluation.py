"""Evaluation hook (DESIGN §7): student samples from fixed noise -> benchmark metrics + a figure.

Evaluation draws from its own seeded ``torch.Generator``, and all of it (sampling, metrics, feature networks built on
first use) runs inside ``fork_rng``, so running it (or not) never changes the training trajectory.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checks import at_least, eval_sample_count, or_default
from .checkpoint import step_dir_name


def student_sample(generator, noise, cond=None, timesteps=None, rng: torch.Generator | None = None,
                   batch_size: int = 1000, every_step: bool = False):
    """Sample the few-step student in chunks; `rng` draws the between-step noise (as LCMScheduler does).
    `every_step`: a list with every step's x0 output instead (the last is the sample).

    The between-step noise is drawn for all N samples first, step by step, as one batch of N draws it (the
    exported pipeline, LCMScheduler): the samples do not depend on `batch_size`, so training's evaluation
    (eval.batch_size), `stepdistill-eval` and `stepdistill-sample` agree for the same seed and N."""
    device = next(generator.parameters()).device
    num_steps = len(generator.timesteps if timesteps is None else timesteps)
    step_noise = [torch.randn(noise.shape, generator=rng, dtype=noise.dtype,
                              device=noise.device if rng is None else rng.device) for _ in range(num_steps - 1)]
    chunks = []
    for i in range(0, noise.shape[0], batch_size):
        c = None if cond is None else cond[i:i + batch_size].to(device)
        out = generator.sample(noise[i:i + batch_size].to(device), c, timesteps, rng, every_step=every_step,
                               step_noise=[z[i:i + batch_size] for z in step_noise])
        chunks.append([x.cpu() for x in out] if every_step else [out.cpu()])  # only the sample, unless asked
    per_step = [torch.cat(steps) for steps in zip(*chunks)]
    return per_step if every_step else per_step[-1]


def teacher_sample_batched(benchmark, noise, cond=None, steps=None, batch_size: int = 1000,
                           progress: str | None = None, guidance: float | None = None) -> torch.Tensor:
    """The teacher's ODE samples in chunks, computed where the teacher lives (a GPU when training runs on one);
    `progress` names a tqdm bar over the chunks. Returns CPU tensors."""
    device = next(benchmark.teacher.parameters()).device
    out = []
    chunks = range(0, noise.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc=progress, leave=False)
    for i in chunks:
        c = None if cond is None else cond[i:i + batch_size].to(device)
        out.append(benchmark.teacher_sample(noise[i:i + batch_size].to(device), c, steps, guidance).cpu())
    return torch.cat(out)


def unused_name(folder: Path, names: list[str]) -> str:
    """The last of `names` with the first suffix ("", "_2", "_3", ...) under which no `folder/{name}{suffix}.png`
    exists: evaluations of one checkpoint (other eval seeds, sample counts) keep each other's figures."""
    n = 1
    while True:
        suffix = "" if n == 1 else f"_{n}"
        if not any((folder / f"{name}{suffix}.png").exists() for name in names):
            return names[-1] + suffix
        n += 1


def eval_inputs(benchmark, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    noise = benchmark.noise(n, gen)
    cond = benchmark.eval_cond(n)
    return noise, cond, gen


class Evaluator:
    def __init__(self, run, run_dir: Path):
        self.run, self.run_dir = run, Path(run_dir)
        self.cfg = run.cfg.eval
        at_least("eval.batch_size", self.cfg.batch_size)
        self._teacher_cache: dict = {}
        self._fid = None   # InceptionReference: the reference images' Inception features, kept across evaluations
        self.check_models()

    def check_models(self) -> None:
        """The local FID and CLIP models the evaluations will read, and whether the benchmark can use them: found
        at the first evaluation before, a missing file ended a run after all its training, with no export."""
        from ..benchmarks.base import Benchmark
        bm = self.run.benchmark
        weights = (self.cfg.get("fid") or {}).get("inception_weights")
        clip_model = (self.cfg.get("clip") or {}).get("model")
        if weights:
            if type(bm).fid_reference_images is Benchmark.fid_reference_images:
                bm.fid_reference_images()   # its error names the setting
            from ..eval.fid import check_inception_weights
            check_inception_weights(weights)
        if clip_model:
            if not isinstance(bm.eval_labels(1), list):
                raise ValueError(f"eval.clip.model needs a text-conditioned benchmark, not {bm.name}")
            from ..eval.clip import check_clip_folder
            check_clip_folder(clip_model)

    @torch.no_grad()
    def evaluate(self, step: int, teacher_reference: bool = False, steps: int | None = None,
                 score: bool = True, num_samples: int | None = None, figure_tag: str = "") -> dict:
        """`score=False` samples (student, and teacher if asked) and stops there: the other processes of a
        sharded run, whose forwards rank 0's sampling needs. `num_samples`: this evaluation's sample count
        (default `eval.num_samples`), drawn from the same seed. `figure_tag` ends the sample grid's file name
        (stepdistill-eval's "_eval": its grid must not replace the one training wrote for this step)."""
        with self._own_rng():
            return self._evaluate(step, teacher_reference, steps, score, num_samples, figure_tag)

    def _own_rng(self):
        """Everything an evaluation draws comes from a forked RNG, restored after it: the sampling, and also a
        feature network built on first use (digits) or per call (Inception FID), whose random initial weights
        moved training's stream, so a run with evaluations took other batches than one without."""
        device = next(self.run.roles["generator"].parameters()).device
        return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def _evaluate(self, step, teacher_reference, steps, score, num_samples, figure_tag) -> dict:
        bm = self.run.benchmark
        outputs, noise, cond, _ = self._sample_chain(steps, every_step=False, num_samples=num_samples)
        samples = outputs[-1]
        teacher = self.teacher_samples(noise, cond) if teacher_reference else None
        bm.prepare_evaluation()   # on every process, scoring or not
        if not score:
            return {}
        metrics = {f"student_{k}": v for k, v in self.benchmark_metrics(samples, cond).items()}
        if teacher_reference:
            metrics.update({f"teacher_{k}": v for k, v in self.benchmark_metrics(teacher, cond).items()})
            metrics["teacher_steps"] = bm.teacher_steps
            if bm.conditional:
                metrics["teacher_guidance"] = self.teacher_guidance
        # a re-evaluation at another step count must not overwrite the grid training wrote for this step
        suffix = "" if steps is None else f"_{int(steps)}steps"
        name = f"{step_dir_name(step)}{suffix}{figure_tag}"
        fig = self.run_dir / "samples" / f"{unused_name(self.run_dir / 'samples', [name]) if figure_tag else name}.png"
        bm.save_figure(samples, cond, fig, teacher_samples=teacher)
        metrics["figure"] = str(fig)
        return metrics

    @torch.no_grad()
    def evaluate_every_step(self, step: int, steps: int | None = None) -> dict:
        """The metrics of each step's x0 output on the K-step sampling chain (same noise and between-step draws
        as `evaluate`; the last step's are the sample's), keyed `student_step{k}_{metric}`, and a figure per
        step: where a multi-step student gains or loses quality along its chain."""
        with self._own_rng():
            return self._evaluate_every_step(step, steps)

    def _evaluate_every_step(self, step: int, steps: int | None) -> dict:
        outputs, _, cond, ts = self._sample_chain(steps, every_step=True)
        metrics: dict = {"timesteps": ts, "figures": []}
        names = [f"{step_dir_name(step)}_{len(ts)}steps_step{k}" for k in range(1, len(ts) + 1)]
        tag = unused_name(self.run_dir / "samples", names)[len(names[-1]):]   # "" or an earlier run's "_2", "_3"..
        for k, samples in enumerate(outputs, start=1):
            metrics.update({f"student_step{k}_{key}": v for key, v in self.benchmark_metrics(samples, cond).items()})
            fig = self.run_dir / "samples" / f"{names[k - 1]}{tag}.png"
            self.run.benchmark.save_figure(samples, cond, fig)
            metrics["figures"].append(str(fig))
        return metrics

    def _sample_chain(self, steps: int | None, every_step: bool, num_samples: int | None = None):
        """The student's K-step chain from the fixed eval noise, in eval mode: (every step's x0 output, or just
        the sample's, the noise, the conditions, the timesteps)."""
        bm, seed = self.run.benchmark, int(self.cfg.seed)
        key = "eval.num_samples" if num_samples is None else "eval.final_num_samples"
        n = eval_sample_count(key, or_default(num_samples, self.cfg.num_samples))
        student = self.run.student()
        was_training = student.training
        student.eval()
        noise, cond, gen = eval_inputs(bm, n, seed)   # in the callers' forked RNG (_own_rng)
        ts = student.sampling_timesteps(steps)   # the trained timesteps at the trained count
        outputs = student_sample(student, noise, cond, ts, gen, int(self.cfg.batch_size), every_step)
        outputs = outputs if every_step else [outputs]
        student.train(was_training)
        return outputs, noise, cond, [float(t) for t in ts]

    def benchmark_metrics(self, samples, cond) -> dict:
        """The benchmark's own metrics, plus Inception FID against the benchmark's reference images where
        `eval.fid.inception_weights` names local weights, and the CLIP score of the decoded images where
        `eval.clip.model` names a local CLIP model (text-conditioned benchmarks: each image against its prompt)."""
        bm = self.run.benchmark
        metrics = bm.evaluate(samples, cond)
        weights = (self.cfg.get("fid") or {}).get("inception_weights")
        clip_model = (self.cfg.get("clip") or {}).get("model")
        if not (weights or clip_model):
            return metrics
        images = bm.to_output(samples)   # decoded once for both (a VAE pass on text-to-image benchmarks)
        device = next(self.run.roles["generator"].parameters()).device   # Inception and CLIP run where the run does
        if weights:   # the reference images' Inception features once per run (its eval settings are fixed)
            from ..eval.fid import InceptionReference
            if self._fid is None:
                self._fid = InceptionReference(weights, bm.fid_reference_images, device=device)
            out = self._fid(images)
            metrics.update({"fid": out["fd"], "fid_num_real": out["num_real"], "fid_num_samples": out["num_fake"]})
        if clip_model:
            prompts = bm.eval_labels(samples.shape[0])
            if not isinstance(prompts, list):
                raise ValueError(f"eval.clip.model needs a text-conditioned benchmark, not {bm.name}")
            from ..eval.clip import clip_score
            metrics.update(clip_score(images, prompts, clip_model, device=device))
        return metrics

    @property
    def teacher_guidance(self) -> float:
        """The CFG scale of the teacher the student is distilled from: `method.guidance` (build_run resolves an
        unset one to the benchmark's default), not `benchmark.guidance`, which a sweep over method.guidance leaves
        where it was."""
        return float(self.run.cfg.method.guidance)

    def teacher_samples(self, noise, cond):
        """The teacher's samples from the eval noise at the distilled CFG scale, computed once per sample count."""
        n = noise.shape[0]
        if n not in self._teacher_cache:   # inside evaluate's forked RNG
            self._teacher_cache[n] = teacher_sample_batched(self.run.benchmark, noise, cond,
                                                            batch_size=int(self.cfg.batch_size),
                                                            guidance=self.teacher_guidance)
        return self._teacher_cache[n]
