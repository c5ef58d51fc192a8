"""Prediction-type conversions (DESIGN §2) against closed forms, in float64, for x_t = a x0 + s eps."""
from __future__ import annotations

import math

import pytest
import torch

from stepdistill.prediction import (PREDICTION_TYPES, check_prediction_type, edm_coefficients, eps_from_x0,
                                    score_from_x0, target_for, velocity_from_x0, x0_from_output, x0_from_score)
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

SIGMA_DATA = 0.5
FAMILIES = {"vp": VPSchedule(), "vp_linear": VPSchedule(beta_schedule="linear"), "edm": EDMSchedule(),
            "flow": FlowSchedule()}


def _problem(family: str, seed: int = 0, n: int = 16):
    """Random x0, eps, a, s (float64, broadcastable) drawn from one schedule family, and x_t."""
    g = torch.Generator().manual_seed(seed)
    sched = FAMILIES[family]
    u = torch.rand(n, generator=g, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0  # include both ends of the range
    t = sched.t_from_fraction(u)
    a = sched.alpha(t).double().reshape(n, 1, 1, 1)
    s = sched.sigma(t).double().reshape(n, 1, 1, 1)
    x0 = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64)
    if family == "flow":  # a = 0 at t = 1: the x0-from-eps map is undefined there
        keep = a.flatten() > 1e-6
        a, s, x0, eps = a[keep], s[keep], x0[keep], eps[keep]
    return x0, eps, a, s, a * x0 + s * eps


def _karras_table1(sigma, sd=SIGMA_DATA):
    """(c_in, c_skip, c_out) of Karras et al. (2022), Table 1."""
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    return c_in, c_skip, c_out


def _exact_output(kind, x0, eps, x, a, s):
    """The output a perfect network of each prediction type would produce, from its definition."""
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    if kind == "sample":
        return x0
    if kind == "flow_velocity":
        return eps - x0  # d/dt [(1 - t) x0 + t eps]
    if kind == "edm":
        # EDM applied to y = x / a with sigma_eff = s / a: D(y) = c_skip y + c_out F(c_in y) = x0
        _, c_skip, c_out = _karras_table1(s / a)
        return (x0 - c_skip * (x / a)) / c_out
    raise AssertionError(kind)


def _close(actual, expected, scale=1.0):
    torch.testing.assert_close(actual, expected, rtol=1e-11, atol=1e-11 * scale)


CASES = [(kind, fam) for kind in ("epsilon", "v_prediction", "sample", "edm") for fam in FAMILIES] + [
    ("flow_velocity", "flow")]


@pytest.mark.parametrize("kind,family", CASES)
def test_x0_from_exact_output_recovers_x0(kind, family):
    x0, eps, a, s, x = _problem(family)
    out = _exact_output(kind, x0, eps, x, a, s)
    # conditioning: dividing by a (eps) or by c_out (edm) near the ends of the range amplifies rounding
    scale = float((1 / a).max() * (s + 1).max()) if kind == "epsilon" else 1e3
    _close(x0_from_output(out, x, a, s, kind, sigma_data=SIGMA_DATA), x0, scale)


# epsilon, v_prediction and sample targets: against diffusers' DDPMScheduler and their definitions, below
TARGET_CASES = [("edm", fam) for fam in FAMILIES] + [("flow_velocity", "flow")]


@pytest.mark.parametrize("kind,family", TARGET_CASES)
def test_target_for_is_exact_output(kind, family):
    """EDM's target from Karras Table 1 on y = x / a; flow's is eps - x0, dx_t/dt
    (test_flow_velocity_is_time_derivative)."""
    x0, eps, a, s, x = _problem(family, seed=1)
    out = _exact_output(kind, x0, eps, x, a, s)
    scale = float((1 / s).max()) * 10
    _close(target_for(x0, eps, x, a, s, kind, sigma_data=SIGMA_DATA), out, scale)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "linear"])
def test_vp_targets_give_back_x0_through_diffusers_ddpm_step(kind, beta_schedule):
    """Catches a wrong epsilon, v or sample target (sign, a and s swapped, the other type's target): fed as a
    perfect network's output to diffusers' DDPMScheduler.step with that prediction_type, the target gives back x0
    (its pred_original_sample) at every timestep, ends included; the v target is also DDPMScheduler.get_velocity."""
    from diffusers import DDPMScheduler
    ddpm = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=kind, clip_sample=False)
    ddpm.alphas_cumprod = ddpm.alphas_cumprod.double()   # diffusers' own alphas, taken in float64
    g = torch.Generator().manual_seed(4)
    ts = torch.cat([torch.tensor([0, 999]), torch.randint(1, 999, (14,), generator=g)])
    x0 = torch.randn(16, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 2, 3, 3, generator=g, dtype=torch.float64)
    x = ddpm.add_noise(x0, eps, ts)
    ac = ddpm.alphas_cumprod[ts].reshape(16, 1, 1, 1)
    tgt = target_for(x0, eps, x, ac.sqrt(), (1 - ac).sqrt(), kind)
    back = torch.cat([ddpm.step(tgt[i:i + 1], int(ts[i]), x[i:i + 1], generator=g).pred_original_sample
                      for i in range(16)])
    scale = float((1 - ac).sqrt().max() / ac.sqrt().min()) if kind == "epsilon" else 1.0
    torch.testing.assert_close(back, x0, rtol=1e-9, atol=1e-10 * scale)
    if kind == "v_prediction":
        torch.testing.assert_close(tgt, ddpm.get_velocity(x0, eps, ts), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_v_target_is_the_angular_velocity_on_any_schedule(family):
    """Catches a wrong v target on EDM and flow schedules (where diffusers has no v): Salimans & Ho's v = d z / d phi
    for z = cos(phi) x0 + sin(phi) eps, phi = atan2(s, a), times sqrt(a^2 + s^2) (x_t = sqrt(a^2 + s^2) z), by a
    central difference in phi."""
    x0, eps, a, s, x = _problem(family, seed=5)
    phi, r, h = torch.atan2(s, a), (a**2 + s**2).sqrt(), 1e-6
    dz = ((torch.cos(phi + h) - torch.cos(phi - h)) * x0 + (torch.sin(phi + h) - torch.sin(phi - h)) * eps) / (2 * h)
    torch.testing.assert_close(target_for(x0, eps, x, a, s, "v_prediction"), r * dz, rtol=1e-7,
                               atol=1e-7 * float(r.max()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_epsilon_target_re_noises_to_x_t_and_sample_target_is_x0(family):
    """The epsilon target is the noise that makes x_t from x0 through the forward process (a x0 + s target = x_t);
    the sample target is x0 itself."""
    x0, eps, a, s, x = _problem(family, seed=6)
    _close(a * x0 + s * target_for(x0, eps, x, a, s, "epsilon"), x, 10.0)
    _close(target_for(x0, eps, x, a, s, "sample"), x0)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_target_round_trip_any_schedule(kind, family):
    """x0_from_output inverts target_for for every (a, s), whatever the family."""
    x0, eps, a, s, x = _problem(family, seed=2)
    keep = (a.flatten() > 1e-3) & (s.flatten() > 1e-3)
    x0, eps, a, s, x = x0[keep], eps[keep], a[keep], s[keep], x[keep]
    tgt = target_for(x0, eps, x, a, s, kind, sigma_data=SIGMA_DATA)
    _close(x0_from_output(tgt, x, a, s, kind, sigma_data=SIGMA_DATA), x0, 1e4)


def test_flow_velocity_is_time_derivative():
    """For a = 1 - t, s = t the flow target is dx_t/dt (finite difference in float64)."""
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)[:, None]
    h = 1e-6
    xt = lambda tt: (1 - tt) * x0 + tt * eps  # noqa: E731
    fd = (xt(t + h) - xt(t - h)) / (2 * h)
    tgt = target_for(x0, eps, xt(t), 1 - t, t, "flow_velocity")
    torch.testing.assert_close(tgt, fd, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(velocity_from_x0(x0, xt(t), 1 - t, t), fd, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_score_eps_closed_forms(family):
    x0, eps, a, s, x = _problem(family, seed=3)
    keep = s.flatten() > 1e-3
    x0, eps, a, s, x = x0[keep], eps[keep], a[keep], s[keep], x[keep]
    _close(eps_from_x0(x0, x, a, s), eps, 1e3)
    score = score_from_x0(x0, x, a, s)
    _close(score, -eps / s, float((1 / s**2).max()) * 10)
    _close(x0_from_score(score, x, a, s), x0, 1e3)
    # round trip the other way too, from an arbitrary score field
    sc = torch.randn_like(x)
    _close(score_from_x0(x0_from_score(sc, x, a, s), x, a, s), sc, float((1 / s**2).max()) * 10)


def test_score_of_gaussian_is_exact():
    """For x0 = const c, p_t = N(a c, s^2 I) and grad log p_t(x) = -(x - a c)/s^2 = score_from_x0(c, ...)."""
    torch.manual_seed(0)
    c = torch.randn(1, 3, dtype=torch.float64)
    a, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    logp = (-0.5 * ((x - a * c) ** 2).sum(1) / s**2).sum()
    (g,) = torch.autograd.grad(logp, x)
    _close(score_from_x0(c.expand(6, 3), x.detach(), a, s), g)


def test_edm_coefficients_match_karras_table1_at_alpha_one():
    sigma = torch.tensor([0.002, 0.01, 0.3, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    for sd in (0.5, 1.0, 0.25):
        c_in, c_skip, c_out = edm_coefficients(torch.ones_like(sigma), sigma, sd)
        r_in, r_skip, r_out = _karras_table1(sigma, sd)
        _close(c_in, r_in)
        _close(c_skip, r_skip)
        _close(c_out, r_out)
        # explicit formulas, spelled out once more
        _close(c_skip, sd**2 / (sigma**2 + sd**2))
        _close(c_out, sigma * sd / torch.sqrt(sigma**2 + sd**2))
        _close(c_in, 1 / torch.sqrt(sigma**2 + sd**2))


def test_edm_coefficients_general_alpha_act_on_scaled_input():
    """For a != 1 the coefficients are Table 1 at sigma = s/a, acting on y = x/a."""
    a = torch.tensor([0.2, 0.7, 0.99], dtype=torch.float64)
    s = torch.sqrt(1 - a**2)
    c_in, c_skip, c_out = edm_coefficients(a, s, SIGMA_DATA)
    r_in, r_skip, r_out = _karras_table1(s / a)
    _close(c_in, r_in / a)
    _close(c_skip, r_skip / a)
    _close(c_out, r_out)


def test_unknown_prediction_type_raises():
    x = torch.zeros(2, 3)
    a = s = torch.ones(2, 1)
    for call in (lambda: check_prediction_type("velocity"),
                 lambda: x0_from_output(x, x, a, s, "velocity"),
                 lambda: target_for(x, x, x, a, s, "velocity")):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "velocity" in msg
        for k in PREDICTION_TYPES:
            assert k in msg


def test_prediction_types_listed():
    assert set(PREDICTION_TYPES) == {"epsilon", "v_prediction", "sample", "flow_velocity", "edm"}
    for k in PREDICTION_TYPES:
        assert check_prediction_type(k) == k
    assert math.isfinite(SIGMA_DATA)
