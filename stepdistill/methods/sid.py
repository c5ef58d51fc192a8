"""SiD: Score identity Distillation (Zhou et al., ICML 2024, arXiv 2404.04057), one-step, and few-step SiD.

For a generated sample x_g = G(z), noise level t and x_t = a x_g + s eps, with f_real / f_fake the teacher's and
the fake score's x0-predictions at x_t, the generator minimises (per sample, elements averaged)
    L = w · mean( (f_real - f_fake) ∘ ((f_real - x_g) - α (f_real - f_fake)) ),   α = 1.2,
    w = 1 / mean|x_g - f_real|   (per sample, no gradient through it).
Unlike DMD's surrogate, the gradient flows through x_t into the teacher's and the critic's *inputs* (their
parameters stay frozen in this phase): that is SiD's score-identity estimator. Noise levels: t uniform over
[t_min, t_max] of the schedule's range, default [0, 0.8]: SiD's range on EDM's noise ramp, where 0.8 is sigma ~24.4.
On a VP schedule 0.8 is a lower level (sigma/alpha 3.1 on the cosine schedule, 5.1 on SD's); SiD-LSG's VP code
uses [0.02, 0.98] (`method.t_min=0.02 method.t_max=0.98`), which on digits gave no better FD (docs/results.md,
session 34). A one-step generator starts at `init_sigma` (SiD: EDM
sigma 2.5; the time with the same sigma/alpha on VP and flow schedules, e.g. t = 625 on SD's schedule, see
Benchmark.build_roles). The critic is trained with the teacher's denoising loss on detached samples, alternating
1:1 by default, at the noise levels of SiD's code (`critic_noise=reference`): EDM's log-normal sigma (ln sigma ~
N(-1.2, 1.2^2), the teacher's own training distribution) on an EDM teacher, as SiD's `SID_EDMLoss`; the generator
loss's [t_min, t_max] on VP and flow schedules, as SiD-LSG's training loop draws both from one range. `full`
draws the whole range, as DMD's critic (and this SiD before session 37). Its loss (`critic_weighting=reference`)
is SiD-LSG's for a v-prediction teacher: v-MSE times snr / (snr + 1), the MSE of the implied eps; on EDM and eps
teachers the network's own loss, which is SiD's and SiD-LSG's there (`native`: the own loss everywhere).

Guidance for conditional teachers (`cfg_strategy`):
  lsg   SiD-LSG (Zhou et al., ICLR 2025): separate CFG scales for the teacher (`guidance`), for evaluating the fake
        score in the generator loss (`fake_guidance`) and for training it (`fake_train_guidance`: its denoising
        loss regresses the guided output).
  zero  Zero-CFG (few-step SiD, Zhou et al. 2025, arXiv 2505.12674): no CFG on the teacher, and the fake score sees
        no condition at all (the null label / empty prompt), both when evaluated and when trained.
  anti  Anti-CFG (ibid.): no CFG on the teacher, negative CFG on the fake score when evaluated
        (`fake_guidance` < 1, extrapolating away from the condition). With a fake score equal to the teacher,
        scale 2 - k gives the same score difference f_real - f_fake as LSG's teacher scale k (not the same SiD
        loss: its (f_real - x_g) factor then uses the unguided teacher).
Under zero and anti the teacher runs without CFG whatever `guidance` says; a fake-score scale they do not use
must stay 1 (an error otherwise, not a silent no-op).
Whenever the fake score is evaluated or trained at a CFG scale other than 1, its unconditional branch is part of
the prediction, so its training drops the condition of a `fake_cond_dropout` share of rows (default 0.1, as
SiD-LSG's reference turns on context dropout for the fake score in that case); otherwise that branch would stay
the teacher's copy (or untrained) while the generator loss reads it. One difference: the reference drops those
prompts before the generator runs, so its null rows train the fake score on G(z, "") alone; here the generator
always gets its condition and only the fake score's training condition is nulled, so the unconditional branch
learns the generator's output over all conditions, the marginal that CFG's unconditional branch stands for.

`sid_fewstep` (few-step SiD): the generator's K-step outputs are matched as a uniform mixture. Each sample draws
k in 1..K, runs k-1 steps without gradient and trains step k (FewStepGenerator's backward simulation), one network
for all steps; the fake score is trained on the same mixture.
"""
from __future__ import annotations

import torch

from .. import batch_split
from ..prediction import eps_mse_weight_of_v
from .base import LossOut, Method, check_t_range
from .distribution_matching import check_normalizer, denoising_error

CFG_STRATEGIES = ("lsg", "zero", "anti")
CRITIC_NOISE = ("reference", "loss_range", "lognormal", "full")


def predictions_through_inputs(x, teacher, fake, cond=None, guidance: float = 1.0, fake_guidance: float = 1.0,
                               t_range=(0.0, 0.8), t=None, noise=None, fake_cond=None):
    """Noise x at t (drawn in t_range unless given) and return the teacher's and the fake score's x0-predictions
    and x, in at least fp32 (float64 stays float64). Nothing is detached: the gradient reaches x through both
    networks' inputs, the estimator of the score-identity family (SiD, SIM)."""
    sched = teacher.schedule
    if t is None:
        t = sched.sample_t(x.shape[0], *t_range, device=x.device)
    noise = batch_split.randn_like(x) if noise is None else noise
    x_t = sched.add_noise(x, noise, t)
    dt = torch.promote_types(x.dtype, torch.float32)
    f_real = teacher.x0(x_t, t, cond, guidance).to(dt)
    f_fake = fake.x0(x_t, t, cond if fake_cond is None else fake_cond, fake_guidance).to(dt)
    return f_real, f_fake, x.to(dt)


def sid_loss(x: torch.Tensor, teacher, fake, cond=None, guidance: float = 1.0, fake_guidance: float = 1.0,
             alpha: float = 1.2, t_range=(0.0, 0.8), t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, normalizer: str = "sample", fake_cond=None,
             with_weight: bool = False):
    """SiD's generator loss on samples `x` (requiring grad) and its logs; `t` and `noise` may be given (tests).
    `normalizer="batch"` takes the weight's mean|x_g - f_real| over the whole batch (one scalar), as
    `method.normalizer` does for DMD on low-dimensional data. `fake_cond`: the fake score's condition, if not
    `cond` (Zero-CFG passes the null condition). `with_weight`: also return the weight w (no gradient; shape
    (N, 1, ...) per sample, or one value), which SiDA puts on its adversarial term too."""
    f_real, f_fake, xf = predictions_through_inputs(x, teacher, fake, cond, guidance, fake_guidance, t_range, t,
                                                    noise, fake_cond)
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        # floored at 1e-5 as in SiD's code (`weight_factor ... .clip(min=0.00001)`): a sample on the teacher's
        # prediction would get weight 1/0
        weight = torch.nan_to_num(1.0 / denoising_error(xf, f_real, normalizer).clamp_min(1e-5))
    diff = f_real - f_fake
    per_sample = (weight * diff * ((f_real - xf) - alpha * diff)).mean(dim=dims)
    logs = {"score_gap": diff.flatten(1).norm(dim=1).mean().item()}
    return (per_sample.mean(), logs, weight) if with_weight else (per_sample.mean(), logs)


def with_null_rows(den, cond: torch.Tensor, share: float) -> torch.Tensor:
    """`cond` with each row replaced by the null condition (label / empty prompt) with probability `share`:
    classifier-free guidance's condition dropout, drawn for the global batch (batch_split)."""
    drop = batch_split.rand(cond.shape[0], device=cond.device) < share
    return torch.where(drop.view(-1, *([1] * (cond.dim() - 1))), den.uncond(cond), cond)


class SiD(Method):   # the base class's roles and phases: teacher, fake score, generator; 1:1 alternation
    name = "sid"
    trains_unconditional_fake = True   # fake_cond_dropout: LSG's fake_guidance has a trained null branch

    def __init__(self, models, cfg):
        super().__init__(models, cfg)
        self.normalizer = check_normalizer(cfg.get("normalizer", "sample"))
        self.t_range = check_t_range(cfg)
        self.critic_noise, self.critic_lognormal = self._check_critic_noise(cfg, models["fake_score"].schedule)
        fake_type = getattr(models["fake_score"], "prediction_type", None)   # None: an exact (analytic) score
        self.critic_eps_weighted = self._check_critic_weighting(cfg, fake_type)
        self.strategy = str(cfg.get("cfg_strategy", "lsg"))
        if self.strategy not in CFG_STRATEGIES:
            raise ValueError(f"unknown method.cfg_strategy {self.strategy!r}: use one of {', '.join(CFG_STRATEGIES)}")
        # (teacher scale, fake scale in the generator loss, fake scale when trained)
        if self.strategy == "lsg":
            self.scales = (float(cfg.guidance), float(cfg.fake_guidance), float(cfg.get("fake_train_guidance", 1.0)))
        elif self.strategy == "zero":
            self.scales = (1.0, 1.0, 1.0)
        else:
            if not float(cfg.fake_guidance) < 1.0:
                raise ValueError(f"method.cfg_strategy=anti needs method.fake_guidance < 1 (negative guidance on the "
                                 f"fake score, e.g. 0.5 or -1), got {cfg.fake_guidance}")
            self.scales = (1.0, float(cfg.fake_guidance), 1.0)
        unused = [k for k in (("fake_guidance", "fake_train_guidance") if self.strategy == "zero"
                              else ("fake_train_guidance",) if self.strategy == "anti" else ())
                  if float(cfg.get(k, 1.0)) != 1.0]
        if unused:
            raise ValueError(f"method.cfg_strategy={self.strategy} does not use method.{unused[0]} "
                             f"(={cfg[unused[0]]}): set it to 1.0, or use method.cfg_strategy=lsg")
        dropout = cfg.get("fake_cond_dropout")
        if dropout is None:   # the unconditional branch is read exactly when a fake scale is not 1
            dropout = 0.1 if self.scales[1:] != (1.0, 1.0) else 0.0
        self.fake_cond_dropout = float(dropout)
        if not 0.0 <= self.fake_cond_dropout < 1.0:
            raise ValueError(f"method.fake_cond_dropout={dropout}: need a share in [0, 1) (null = 0.1 when a "
                             "fake-score CFG scale is not 1, else 0)")
        if self.fake_cond_dropout == 0.0 and self.scales[1:] != (1.0, 1.0):   # as Method refuses for the others
            raise ValueError(f"method.fake_cond_dropout=0 with fake-score CFG scales {self.scales[1:]}: the fake "
                             "score's unconditional branch would never train; keep a share > 0 (null = 0.1)")
        if not getattr(models["teacher"], "conditional", False) and (self.strategy != "lsg" or self.scales != (1, 1, 1)):
            raise ValueError(f"method.cfg_strategy={self.strategy} with scales (teacher, fake, fake training) "
                             f"{self.scales} needs a conditional teacher; this one is unconditional: set "
                             "method.cfg_strategy=lsg and method.guidance, fake_guidance, fake_train_guidance to 1.0")
        given = cfg.get("fake_cond_dropout")
        if given is not None and float(given) > 0:   # read nowhere in these cases: an error, as the unused scales
            where = ("under method.cfg_strategy=zero" if self.strategy == "zero" else
                     "with an unconditional teacher" if not getattr(models["teacher"], "conditional", False) else None)
            if where:
                raise ValueError(f"method.fake_cond_dropout={given} is not used {where}: set it to null")

    @staticmethod
    def _check_critic_weighting(cfg, prediction_type: str | None) -> bool:
        """`method.critic_weighting`: whether the critic's loss is weighted to eps-space MSE. `reference` is SiD's
        code: SiD-LSG (VP teachers) regresses eps, or v weighted by snr / (snr + 1), which is the same loss; SiD on
        EDM trains with EDM's own loss, the network's native one, as is eps-MSE for an eps teacher. `native`: the
        network's own loss everywhere (for a v-prediction teacher v-MSE, x0's error weighted by snr + 1 where
        eps-MSE weights it by snr: far more weight at high noise)."""
        mode = str(cfg.get("critic_weighting", "reference"))
        if mode not in ("reference", "native"):
            raise ValueError(f"unknown method.critic_weighting {mode!r}: use reference (SiD's code: eps-space MSE on "
                             "VP teachers) or native (the teacher's own denoising loss)")
        return mode == "reference" and prediction_type == "v_prediction"

    @staticmethod
    def _check_critic_noise(cfg, schedule) -> tuple[str, tuple[float, float] | None]:
        """`method.critic_noise`, with `reference` resolved to what SiD's code does on this kind of schedule, and
        `method.critic_lognormal`'s (P_mean, P_std)."""
        mode = str(cfg.get("critic_noise", "reference"))
        if mode not in CRITIC_NOISE:
            raise ValueError(f"unknown method.critic_noise {mode!r}: use one of {', '.join(CRITIC_NOISE)}")
        if mode == "reference":
            mode = "lognormal" if schedule.kind == "edm" else "loss_range"
        if mode == "lognormal" and schedule.kind != "edm":
            raise ValueError(f"method.critic_noise=lognormal draws EDM sigmas, but this teacher's schedule is "
                             f"{schedule.kind!r}: use loss_range or full (reference picks loss_range here)")
        if mode != "lognormal":
            return mode, None
        value = cfg.get("critic_lognormal", (-1.2, 1.2))
        try:
            p_mean, p_std = (float(v) for v in value)
        except (TypeError, ValueError):
            p_mean, p_std = 0.0, 0.0
            value = f"{value} (not two numbers)"
        if not p_std > 0:
            raise ValueError(f"method.critic_lognormal={value}: give [P_mean, P_std] of ln sigma, P_std > 0 "
                             "(SiD's code: [-1.2, 1.2])")
        return mode, (p_mean, p_std)

    def critic_t(self, n: int, device) -> torch.Tensor:
        """The critic's noise levels (`method.critic_noise`): the generator loss's [t_min, t_max] (SiD-LSG's code
        on VP), EDM's log-normal sigma, ln sigma ~ N(P_mean, P_std^2) clamped to the schedule's range (SiD's code
        on EDM: the teacher's own training distribution), or uniform over the whole range (DMD's critic)."""
        sched = self.models["fake_score"].schedule
        if self.critic_noise == "full":
            return sched.sample_t(n, 0.0, 1.0, device=device)
        if self.critic_noise == "loss_range":
            return sched.sample_t(n, *self.t_range, device=device)
        p_mean, p_std = self.critic_lognormal
        sigma = (batch_split.randn(n, device=device) * p_std + p_mean).exp()
        return sigma.clamp(sched.sigma_min, sched.sigma_max)

    def fake_cond(self, cond):
        """The fake score's condition: the null one under Zero-CFG."""
        return self.models["fake_score"].uncond(cond) if self.strategy == "zero" and cond is not None else cond

    def generator_loss(self, batch, step):
        x = self.models["generator"](batch["noise"], batch["cond"])
        loss, logs = self.sid_term(x, batch["cond"])
        logs["loss_sid"] = loss.item()
        return LossOut(loss, logs)

    def sid_term(self, x, cond, **kw):
        c = self.cfg
        return sid_loss(x, self.models["teacher"], self.models["fake_score"], cond, self.scales[0], self.scales[1],
                        float(c.alpha), self.t_range, normalizer=self.normalizer,
                        fake_cond=self.fake_cond(cond), **kw)

    def fake_score_loss(self, x_fake, cond, t=None, noise=None) -> torch.Tensor:
        """The critic's denoising loss on detached samples (t from `critic_t` unless given), at LSG's training
        scale, with Zero-CFG's null condition, and with `fake_cond_dropout` of the rows unconditional."""
        fake = self.models["fake_score"]
        if t is None:
            t = self.critic_t(x_fake.shape[0], x_fake.device)
        per_sample = fake.denoising_loss(x_fake.detach(), t, self.fake_train_cond(cond), noise,
                                         guidance=self.scales[2])
        if self.critic_eps_weighted:   # SiD-LSG's code: eps-space MSE (its v-MSE times snr / (snr + 1))
            a, s = fake.coeffs(fake._as_batch_t(t, x_fake), per_sample, dtype=per_sample.dtype)
            per_sample = per_sample * eps_mse_weight_of_v(a, s)
        return per_sample.mean()

    def fake_train_cond(self, cond):
        """The fake score's condition when it is trained: Zero-CFG's null one, else `fake_cond_dropout` of the
        rows null (no random draw at 0, so runs at CFG scales 1 are unchanged)."""
        cond = self.fake_cond(cond)
        if self.fake_cond_dropout > 0 and cond is not None and self.strategy != "zero":
            cond = with_null_rows(self.models["fake_score"], cond, self.fake_cond_dropout)
        return cond

    def critic_loss(self, batch, step):
        with torch.no_grad():
            x = self.models["generator"](batch["noise"], batch["cond"])
        loss = self.fake_score_loss(x, batch["cond"])
        return LossOut(loss, {"loss_fake_score": loss.item()})


class SiDFewStep(SiD):
    name = "sid_fewstep"

    def __init__(self, models, cfg):
        super().__init__(models, cfg)
        if models["generator"].num_steps < 2:
            raise ValueError("method=sid_fewstep needs a multi-step generator: add generator=four_step "
                             "(or generator.steps=K with K >= 2); for one step use method=sid")
