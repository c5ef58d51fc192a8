"""SIM: Score Implicit Matching (Luo et al., NeurIPS 2024, arXiv 2410.16794), one-step, pseudo-Huber distance.

The divergence (SIM Eq. 3.1; here the teacher is p, the generator's noised distribution q_θ,t):
    D(θ) = E_t E_{x_t ~ q_θ,t} d( λ_t (s_p(x_t) - s_q(x_t)) ),   d(y) = sqrt(mean(y²) + c²) - c,   λ_t = σ²/α.
λ_t turns score differences into x0-prediction differences (x0 = (x_t + σ² score)/α), so the distance is taken in
data units at every noise level (that is our weighting w(t)); mean(y²) runs over the C·H·W elements, so c is per
element (the paper's c on the plain norm is c·sqrt(numel)). With f_p, f_q the teacher's and the generator
distribution's x0-predictions, Δ = f_p - f_q and d'(Δ) = Δ / (numel · sqrt(mean Δ² + c²)).

Gradient (SIM's score-gradient theorem, worked out here). x_g = G_θ(z), x_t = α x_g + σ ε, J = ∂x_t/∂θ,
u = d'(Δ):
  ∇D = E[u^T ∇f_p J] - E[u^T ∇f_q J] + E[-u^T ∂_θ f_q]          (paths: samples x_t, and q's own θ)
and differentiating the identity E_q[v^T s_q] = E[v(x_t)^T ∇log q(x_t|x_g)] (Stein / denoising score identity;
∇log q(x_t|x_g) = -ε/σ does not move with θ) for v = λ d'(λ(s_p - s_q)) held fixed turns the last, intractable
term into sample-path terms. In x0 units everything collects into the loss, per sample,
    L = d'(Δ)^T ( (f_p - x_g) - sg(Δ) ),    Δ = f_p(x_t) - f_fake(x_t),
with the fake score standing in for f_q, its parameters (and the teacher's) frozen, and the gradient flowing from
x_g through x_t into both networks' *inputs* and through d'(Δ). (f_p - x_g = λ(s_p - ∇log q(x_t|x_g)): the paper's
bracket; sg = stop-gradient.) Its θ-gradient equals ∇D exactly when f_fake = f_q. The sign: with Δ taken as
teacher minus fake the loss carries a plus; -d'(Δ)^T(f_p - x_g) (a minus, right only when y is fake minus teacher,
as the paper's generator-p / teacher-q naming has it) ascends D. Detaching d'(Δ) altogether drops
E[(∇_x d'(Δ) J)^T (f_fake - x_g)], zero in expectation only when J does not vary with z given x_t (a shift, not a
scale); dropping the - sg(Δ) term alone is also biased. For d = |y|²/2 the loss is SiD's with α = 1/2.
tests/test_sim.py checks sign and scale against finite differences of D for a Gaussian generator with exact
scores, and that the sign-flipped, detached-teacher-input, detached-d' and no-sg(Δ) variants fail that check.

Normaliser (`normalizer`): "none" keeps the exact gradient; "batch" divides the loss by one detached scalar per
batch, mean|x_g - f_p| (a step size that follows the denoising error, as for DMD/SiD on gmm); "sample" divides
each sample's loss by its own mean|x_g - f_p| (SiD's weight; it reweights samples, so D is no longer exactly the
objective). Noise levels t uniform in [t_min, t_max] of the schedule's range. The critic is DMD's: the fake score
trained with the teacher's denoising loss on detached generator samples, alternating 1:1 by default.
"""
from __future__ import annotations

import torch

from .base import LossOut, Method, check_t_range
from .distribution_matching import denoising_error, fake_score_phase
from .sid import predictions_through_inputs

NORMALIZERS = ("none", "sample", "batch")


def check_sim_normalizer(normalizer: str) -> str:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown method.normalizer {normalizer!r} for sim: use one of {', '.join(NORMALIZERS)}")
    return normalizer


def pseudo_huber(delta: torch.Tensor, c: float) -> torch.Tensor:
    """d(Δ) = sqrt(mean(Δ²) + c²) - c per sample, the mean over all but the batch dimension."""
    return (delta.flatten(1).pow(2).mean(1) + c * c).sqrt() - c


def sim_loss(x: torch.Tensor, teacher, fake, cond=None, guidance: float = 1.0, fake_guidance: float = 1.0,
             c: float = 0.1, t_range=(0.02, 0.98), t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, normalizer: str = "none") -> tuple[torch.Tensor, dict]:
    """SIM's generator loss on samples `x` (requiring grad); `teacher` and `fake` are anything with `.schedule` and
    `.x0(x_t, t, cond, guidance)`; `t` and `noise` may be given (tests)."""
    check_sim_normalizer(normalizer)
    f_real, f_fake, xf = predictions_through_inputs(x, teacher, fake, cond, guidance, fake_guidance, t_range, t, noise)
    n = x[0].numel()
    delta = f_real - f_fake
    # u = d'(Δ) · numel, differentiable in x_t (SIM's y carries the input gradient; only θ-in-the-score is frozen)
    u = delta / (delta.flatten(1).pow(2).mean(1) + c * c).sqrt().reshape(-1, *([1] * (x.ndim - 1)))
    per_sample = (u * ((f_real - xf) - delta.detach())).flatten(1).sum(1) / n
    if normalizer != "none":
        with torch.no_grad():
            weight = torch.nan_to_num(1.0 / denoising_error(xf, f_real, normalizer).clamp_min(1e-5).flatten())   # floored as SiD
        per_sample = per_sample * weight
    with torch.no_grad():
        logs = {"score_gap": delta.flatten(1).pow(2).mean(1).sqrt().mean().item(),
                "sim_divergence": pseudo_huber(delta, c).mean().item()}
    return per_sample.mean(), logs


class SIM(Method):   # the base class's roles and phases: teacher, fake score, generator
    name = "sim"

    def __init__(self, models, cfg):
        super().__init__(models, cfg)
        self.normalizer = check_sim_normalizer(str(cfg.get("normalizer", "none")))
        self.c = float(cfg.c)
        if not self.c > 0:
            raise ValueError(f"method.c={cfg.c}: the pseudo-Huber constant must be > 0 (per-element scale of the "
                             "x0 difference, e.g. 0.1)")
        self.t_range = check_t_range(cfg)

    def generator_loss(self, batch, step):
        m, c = self.models, self.cfg
        x = m["generator"](batch["noise"], batch["cond"])
        loss, logs = sim_loss(x, m["teacher"], m["fake_score"], batch["cond"], float(c.guidance),
                              float(c.fake_guidance), self.c, self.t_range,
                              normalizer=self.normalizer)
        logs["loss_sim"] = loss.item()
        return LossOut(loss, logs)

    def critic_loss(self, batch, step):
        return fake_score_phase(self.models, batch, self.kept_samples)
