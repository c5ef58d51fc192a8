"""What a built-in benchmark provides to the trainer: a teacher, fresh trainable roles, data and evaluation.

A benchmark is the only place that knows what the data is (2-D points, 8x8 digits, latents); methods and the
trainer see tensors and a ``Denoiser``.
"""
from __future__ import annotations

import torch

from ..checks import at_least, or_default
from ..denoiser import Denoiser
from ..generator import FewStepGenerator
from ..methods.gan import probe_feature_shape
from ..networks.heads import ClassifierHead
from ..roles import Roles
from ..samplers import ddim_sample


def shared_base(model_cfg) -> bool:
    """`model.shared_base`: one frozen network for every role (networks/shared_base.py)."""
    return model_cfg is not None and bool(model_cfg.get("shared_base"))


def generator_timesteps(schedule, method_cfg, generator_cfg):
    """`generator.timesteps` if set; else, for a one-step student of a method with `init_sigma` (SiD's 2.5), the
    schedule's time at that noise-to-signal ratio; else None (the generator's default)."""
    steps = int(generator_cfg.steps)
    if steps < 1:
        raise ValueError(f"generator.steps={generator_cfg.steps}: a generator takes at least 1 step")
    if generator_cfg.get("timesteps") is not None:
        ts = list(generator_cfg.timesteps)
        if len(ts) != steps:   # one count in config.yaml, the one the student has
            raise ValueError(f"generator.timesteps={ts} has {len(ts)} entries but generator.steps={steps}: "
                             f"set generator.steps={len(ts)} too")
        return ts
    init_sigma = method_cfg.get("init_sigma")
    if init_sigma is not None and steps == 1:
        return [schedule.t_at_noise_ratio(float(init_sigma))]
    return None


class Benchmark:
    name = "base"
    kind = "points"  # "points" (data space) or "image" (written in [0, 1])
    num_classes: int | None = None
    teacher: Denoiser
    data_shape: tuple[int, ...]
    teacher_steps: int   # the teacher's default sampler steps (benchmark.teacher_steps, or the teacher's record)

    def __init__(self, cfg):
        self.cfg = cfg

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    # --- roles -------------------------------------------------------------------------------------------
    def make_student_denoiser(self) -> Denoiser:
        """A fresh trainable denoiser for the fake score (and, unless overridden below, the generator)."""
        raise NotImplementedError

    def make_generator_denoiser(self) -> Denoiser:
        """A fresh trainable denoiser for the generator and its step experts; made like the fake score's unless a
        benchmark shapes its generator differently."""
        return self.make_student_denoiser()

    def student_denoiser(self, backbone):
        """A denoiser like the teacher's around another backbone (shared-base mode's adapter views)."""
        raise ValueError(f"model.shared_base needs a diffusers UNet teacher; the {self.name} teacher is not one")

    def build_roles(self, method_cfg, generator_cfg, model_cfg=None, fake_score: bool = True) -> Roles:
        """The teacher, the generator and (unless the method has no critic: `fake_score=False`) the fake score,
        plus the method's extra heads."""
        roles = Roles()
        roles["teacher"] = self.teacher
        shared = shared_base(model_cfg)
        if shared:
            fake, gen = self.shared_base_students(model_cfg, generator_cfg)
        else:
            fake, gen = self.make_student_denoiser(), self.make_generator_denoiser()
        # a method without a critic (sCM) would carry a whole unused copy of the teacher: it is dropped here. It
        # is still made first, so from-scratch students draw the same initial weights whatever the method.
        if fake_score:
            roles["fake_score"] = self.as_fake_score(fake)
        del fake
        roles["generator"] = FewStepGenerator(gen, generator_timesteps(gen.schedule, method_cfg, generator_cfg),
                                              int(generator_cfg.steps),
                                              per_sample_step=bool(generator_cfg.get("per_sample_step", True)),
                                              train_steps=generator_cfg.get("train_steps"),
                                              later_experts=self.later_experts(generator_cfg, shared))
        if generator_cfg.get("lora_rank") and not shared:   # shared-base students are adapters already
            from ..networks.lora import DEFAULT_TARGETS, add_lora, diffusers_unet
            for den in roles["generator"].step_denoisers:
                add_lora(diffusers_unet(den), at_least("generator.lora_rank", generator_cfg.lora_rank),
                         generator_cfg.get("lora_alpha"),
                         tuple(generator_cfg.get("lora_targets") or DEFAULT_TARGETS))
        if method_cfg.get("step_aware_critic", False):
            from ..methods.step_critic import StepEmbedding
            gain = method_cfg.get("step_embedding_gain")
            roles["critic_step_embedding"] = StepEmbedding(roles["fake_score"].net, roles["generator"].num_steps,
                                                           **({} if gain is None else {"gain": float(gain)}))
        gan = method_cfg.get("gan")
        if gan is not None and gan.get("enabled", False):
            x = torch.zeros(2, *self.data_shape)
            cond = self.sample_cond(2)
            shape = probe_feature_shape(roles["fake_score"], x, cond, gan.get("feature_module"))
            roles["gan_head"] = ClassifierHead(shape, at_least("method.gan.head_width", gan.get("head_width", 128)))
        return roles

    def as_fake_score(self, den: Denoiser) -> Denoiser:
        """The fake score's denoiser made from a fresh student one (a benchmark may start it from its teacher)."""
        return den

    def later_experts(self, generator_cfg, shared: bool) -> list[Denoiser] | None:
        """`generator.step_experts`: a fresh network (initialised like the generator's) for each step after the
        first, drawn from a random stream of their own, so a run without experts draws the same initial weights for
        every other role (the roles made after the generator drew other weights, from the experts' leftovers)."""
        if not generator_cfg.get("step_experts", False):
            return None
        if shared:
            raise ValueError("generator.step_experts needs a network per step; model.shared_base shares one: "
                             "set one of them to false")
        if int(generator_cfg.steps) < 2:
            raise ValueError("generator.step_experts needs a few-step generator (generator.steps >= 2)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, ())))   # from the run's stream, which stays where it was
            return [self.make_generator_denoiser() for _ in range(int(generator_cfg.steps) - 1)]

    def shared_base_students(self, model_cfg, generator_cfg):
        """Shared-base mode: the fake score and the generator are LoRA adapters on the teacher's own network."""
        from ..networks.lora import DEFAULT_TARGETS, diffusers_unet, set_backbone
        from ..networks.shared_base import AdapterView, SharedBase
        if type(self).student_denoiser is Benchmark.student_denoiser:
            self.student_denoiser(None)   # raises the clear error
        shared = SharedBase(diffusers_unet(self.teacher))
        targets = tuple(model_cfg.get("lora_targets") or generator_cfg.get("lora_targets") or DEFAULT_TARGETS)
        rank = at_least("model.lora_rank", or_default(model_cfg.get("lora_rank"), 16))
        gen_rank = generator_cfg.get("lora_rank")   # null or 0: the model's rank
        shared.add("fake_score", rank, model_cfg.get("lora_alpha"), targets)
        shared.add("generator", at_least("generator.lora_rank", gen_rank) if gen_rank else rank,
                   generator_cfg.get("lora_alpha") or model_cfg.get("lora_alpha"), targets)
        set_backbone(self.teacher, AdapterView(shared, None))
        return (self.student_denoiser(AdapterView(shared, "fake_score")),
                self.student_denoiser(AdapterView(shared, "generator")))

    # --- data --------------------------------------------------------------------------------------------
    def sample_cond(self, n: int, generator: torch.Generator | None = None):
        if not self.conditional:
            return None
        return torch.randint(0, self.num_classes, (n,), generator=generator)

    def eval_cond(self, n: int):
        """Conditions for evaluation and `stepdistill-sample`: balanced labels (every class equally often)."""
        if not self.conditional:
            return None
        return torch.arange(n) % self.num_classes

    def eval_labels(self, n: int):
        """What `stepdistill-sample` writes beside the samples: the class labels of eval_cond(n), if any."""
        return self.eval_cond(n)

    def sample_real(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, *self.data_shape, generator=generator)

    def teacher_sample(self, noise, cond=None, steps: int | None = None, guidance: float | None = None) -> torch.Tensor:
        """The teacher's default multi-step ODE sampler (DDIM); `steps` and the CFG scale `guidance` default to the
        benchmark's `teacher_steps` and `guidance`."""
        return ddim_sample(self.teacher, noise, int(steps or self.teacher_steps), cond,
                           self.guidance if guidance is None else float(guidance))

    # --- output ------------------------------------------------------------------------------------------
    def to_output(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> what `stepdistill-sample` writes (images in [0, 1])."""
        return x

    def fid_reference_images(self) -> torch.Tensor:
        """The real images (N×C×H×W in [0, 1]) that Inception FID compares samples with."""
        raise ValueError(f"eval.fid.inception_weights needs an image benchmark; {self.name} has no images")

    def prepare_evaluation(self) -> None:
        """Make what `evaluate` reads that takes the teacher, on every process: under trainer=fsdp rank 0 alone
        scores, and a sharded teacher runs only with every process in its forwards."""

    def evaluate(self, samples: torch.Tensor, labels=None) -> dict:
        raise NotImplementedError

    def save_figure(self, samples: torch.Tensor, labels, path, teacher_samples=None) -> str:
        raise NotImplementedError

    def config_record(self) -> dict:
        """Resolved facts written into the run's config.yaml (e.g. the mixture's means)."""
        return {}

    def content_key(self) -> str:
        """What the files the benchmark reads hold (the teacher's weights, a prompt list), for cache keys: its
        config names them by path, and a path keeps its name when the file behind it changes. "" when it reads
        none (the analytic gmm)."""
        return ""
