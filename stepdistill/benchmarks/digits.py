"""`digits`: scikit-learn's 8x8 handwritten digits, class-conditional; the shipped UNet2DModel teacher."""
from __future__ import annotations

import copy
import logging
from functools import cached_property
from pathlib import Path

import torch

from ..checks import at_least, non_negative, or_default
from ..denoiser import NetworkDenoiser
from ..teachers import load_unet_teacher, teacher_info
from .base import Benchmark

log = logging.getLogger("stepdistill")

SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher"
FD_RESAMPLES = 50   # bootstrap resamples behind `fd_bootstrap_std`
PR_K = 3            # precision/recall's k-th neighbour (Kynkäänniemi et al.)


class DigitsBenchmark(Benchmark):
    name = "digits"
    kind = "image"
    num_classes = 10

    def __init__(self, cfg):
        super().__init__(cfg)
        from ..data.digits import load_digits_tensor
        from ..networks.unet import check_resolution

        self.path = Path(cfg.teacher.path) if cfg.teacher.get("path") else SHIPPED_TEACHER
        self.teacher = load_unet_teacher(self.path, cfg.teacher.get("prediction_type"), cfg.teacher.get("null_class"))
        self.info = teacher_info(self.path)
        unet = self.teacher.net.config   # the digits are one grey channel and 10 classes (a 50-line shape error before)
        if unet.in_channels != 1 or (unet.num_class_embeds or 0) < self.num_classes:
            raise ValueError(f"benchmark.teacher.path={self.path}: the digits teacher must be a class-conditional "
                             f"UNet2DModel of 1 input channel and a class embedding per digit (at least "
                             f"{self.num_classes}; the shipped one has {self.num_classes + 1}, CFG's null class "
                             f"last); this one takes {unet.in_channels} channel(s) and "
                             f"{unet.num_class_embeds or 'no'} class embeddings")
        null = self.teacher.null_class
        if null is not None and null < self.num_classes:   # a digit's own label: CFG would do nothing for that digit
            if cfg.teacher.get("null_class") is not None or self.info.get("null_class") is not None:
                raise ValueError(f"benchmark.teacher.null_class={null} is the label of the digit {null}: CFG's 'no "
                                 f"label' class must be {self.num_classes} or above (the shipped teacher's is "
                                 f"{self.num_classes}), or null for a teacher without one")
            # one class embedding per digit and no record: the loader's convention took the digit 9 as 'no label';
            # this teacher has none, so it runs without CFG
            self.teacher.null_class = None
            log.warning("the teacher at %s has one class embedding per digit and so no null class: it runs without "
                        "classifier-free guidance (guidance 1)", self.path)
        self.images, self.labels = load_digits_tensor()
        side = self.images.shape[-1]
        res = at_least("benchmark.resolution", or_default(cfg.get("resolution"), side))
        size = unet.sample_size
        if res != side or size not in (side, [side, side], (side, side)):
            # the real images (the GAN's, the regression's) and the feature network are 8x8: a 16x16 teacher trained
            # on 8x8 reals and failed at its first evaluation
            raise ValueError(f"benchmark.resolution={res} with a teacher of sample_size {size}: the digits are "
                             f"{side}x{side} images, and so is the feature network's input; leave "
                             f"benchmark.resolution at {side} (or null) with a {side}x{side} teacher")
        check_resolution(self.teacher.net, res, res)
        self.data_shape = (1, res, res)
        self.guidance = non_negative("benchmark.guidance",
                                     or_default(cfg.get("guidance"), self.info.get("default_guidance", 1.0)))
        if self.guidance != 1.0 and self.teacher.null_class is None:
            raise ValueError(f"benchmark.guidance={self.guidance}: the teacher at {self.path} has no null class, so "
                             "no classifier-free guidance: set benchmark.guidance=1")
        self.teacher_steps = at_least("benchmark.teacher_steps",
                                      or_default(cfg.get("teacher_steps"), self.info.get("default_sampler_steps", 20)))
        if cfg.get("feature_net"):   # checked now, not at the first evaluation after training
            from ..networks.digits_features import feature_net_path
            feature_net_path(cfg.feature_net)

    def make_student_denoiser(self):
        net = copy.deepcopy(self.teacher.net).train()
        for p in net.parameters():
            p.requires_grad_(True)
        return self.student_denoiser(net)

    def student_denoiser(self, backbone):
        t = self.teacher
        return NetworkDenoiser(backbone, t.schedule, t.prediction_type, t.sigma_data, t.null_class)

    def sample_real(self, n):
        idx = torch.randint(0, self.images.shape[0], (n,))
        return self.images[idx], self.labels[idx]

    def sample_cond(self, n, generator=None):
        # uniformly random labels (from `generator` where given, so an evaluation's labels are reproducible)
        return torch.randint(0, self.num_classes, (n,), generator=generator)

    def to_output(self, x):
        return ((x.float() + 1) / 2).clamp(0, 1)

    @cached_property
    def feature_net(self):
        from ..networks.digits_features import load_feature_net
        return load_feature_net(self.cfg.get("feature_net"))

    def fid_reference_images(self):
        return self.to_output(self.images)

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """The feature network's (N, num_features) features of [0, 1] images, float64 on the CPU (the network is
        frozen and in eval mode: `load_feature_net`)."""
        device = next(self.feature_net.parameters()).device
        with torch.no_grad():
            return torch.cat([self.feature_net(x.to(device)).double().cpu() for x in images01.split(500)])

    @cached_property
    def real_features(self) -> torch.Tensor:
        return self.features(self.to_output(self.images))

    def evaluate(self, samples, labels=None):
        from ..eval.fid import frechet_distance
        from ..eval.frechet import bootstrap_std, nonfinite_rows
        from ..eval.precision_recall import precision_recall
        n, nonfinite = samples.shape[0], nonfinite_rows(samples)
        if nonfinite:   # a diverged student: to_output would clamp inf into a valid image, and argmax(nan) is 0
            nan = float("nan")
            metrics = {"fd": nan, "fd_num_real": int(self.images.shape[0]), "fd_num_samples": n, "precision": nan,
                       "recall": nan, "fd_bootstrap_std": nan, "num_nonfinite": nonfinite}
            if labels is not None:
                metrics.update(class_accuracy=nan, class_accuracy_num_samples=int(labels.numel()))
            return metrics
        fake01 = self.to_output(samples)
        out = frechet_distance(self.to_output(self.images), fake01, self.feature_net)
        metrics = {"fd": out["fd"], "fd_num_real": out["num_real"], "fd_num_samples": out["num_fake"]}
        # the same feature space: precision (samples on the data's manifold) and recall (data the samples cover),
        # and how much the FD would move with another set of as many samples (a 1000-sample FD moves by ~0.2)
        fake_features = self.features(fake01)
        if n > PR_K:
            pr = precision_recall(self.real_features, fake_features, PR_K)
            metrics.update(precision=pr["precision"], recall=pr["recall"], pr_k=pr["k"], pr_num_real=pr["num_real"],
                           pr_num_samples=pr["num_fake"])
        else:   # the samples' manifold needs k + 1 points: too few to say (eval.num_samples 2 or 3)
            metrics.update(precision=float("nan"), recall=float("nan"), pr_k=PR_K, pr_num_samples=n)
        metrics.update(fd_bootstrap_std=bootstrap_std(self.real_features, fake_features, FD_RESAMPLES),
                       fd_bootstrap_resamples=FD_RESAMPLES)
        if labels is not None:
            with torch.no_grad():
                pred = self.feature_net.classify(fake01).argmax(-1)
            metrics["class_accuracy"] = (pred == labels).float().mean().item()
            metrics["class_accuracy_num_samples"] = int(labels.numel())
        metrics["num_nonfinite"] = 0
        return metrics

    def save_figure(self, samples, labels, path, teacher_samples=None):
        from ..eval.grids import save_image_grid, teacher_above_student
        def arrange(s):
            x = self.to_output(s[:100])
            if labels is not None:  # one row per class where possible, so conditioning is visible at a glance
                x = x[torch.argsort(labels[:x.shape[0]], stable=True)]
            return x

        x = arrange(samples)
        if teacher_samples is not None:  # teacher on top, a grey row, the student below (same noise and labels)
            x = teacher_above_student(arrange(teacher_samples), x, 10)
        return save_image_grid(x, path, nrow=10)

    def content_key(self) -> str:
        from ..data.cache import model_key
        return model_key(self.path)

    def config_record(self):
        return {"teacher_resolved": {"path": str(self.path), "guidance": self.guidance,
                                     "teacher_steps": self.teacher_steps}}
