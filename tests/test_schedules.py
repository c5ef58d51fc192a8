"""Noise schedules (DESIGN §2): VP matches diffusers' DDPMScheduler, EDM and flow follow their closed forms."""
from __future__ import annotations

import pytest
import torch

from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule, betas_for, make_schedule

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def _all_schedules():
    return [VPSchedule(), VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
            EDMSchedule(), FlowSchedule()]


# ---------------------------------------------------------------- VP
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
@pytest.mark.parametrize("beta_start,beta_end", [(0.0001, 0.02), (0.00085, 0.012)])
def test_vp_alphas_cumprod_match_diffusers(beta_schedule, beta_start, beta_end):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                        beta_start=beta_start, beta_end=beta_end).alphas_cumprod.double()
    sched = VPSchedule(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
                       beta_end=beta_end)
    assert sched.alphas_cumprod.shape == ref.shape
    # diffusers computes in float32, we in float64: agreement to float32 rounding.
    torch.testing.assert_close(sched.alphas_cumprod, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_vp_alpha_sigma_from_alphas_cumprod(beta_schedule):
    sched = VPSchedule(beta_schedule=beta_schedule)
    t = torch.tensor([0.0, 1.0, 17.0, 250.0, 500.0, 998.0, 999.0])
    ac = sched.alphas_cumprod[t.long()]
    torch.testing.assert_close(sched.alpha(t).double(), ac.sqrt(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sched.sigma(t).double(), (1 - ac).sqrt(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_vp_is_variance_preserving(beta_schedule):
    sched = VPSchedule(beta_schedule=beta_schedule)
    t = torch.arange(0, 1000, dtype=torch.float32)
    a, s = sched.alpha(t).double(), sched.sigma(t).double()
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a), rtol=0, atol=1e-6)
    # alpha decreases (noise increases) with t
    assert (a[1:] <= a[:-1]).all() and (s[1:] >= s[:-1]).all()
    assert a[0] > 0.99 and a[-1] < 0.1


def test_vp_fraction_endpoints():
    sched = VPSchedule(num_train_timesteps=1000)
    assert sched.t_from_fraction(torch.tensor([0.0]))[0] == 0
    assert sched.t_from_fraction(torch.tensor([1.0]))[0] == 999
    assert sched.t_max == 999.0
    assert sched.discrete


# ---------------------------------------------------------------- EDM
def test_edm_alpha_one_sigma_t():
    sched = EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    t = torch.tensor([0.002, 0.1, 1.0, 3.7, 80.0])
    torch.testing.assert_close(sched.alpha(t), torch.ones_like(t))
    torch.testing.assert_close(sched.sigma(t), t)


def test_edm_fraction_endpoints_and_rho_ramp():
    sched = EDMSchedule(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    u = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sched.t_from_fraction(u), torch.tensor([0.002, 80.0], dtype=torch.float64))
    assert sched.t_max == pytest.approx(80.0)
    # Karras et al. (2022) Eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho
    n = 18
    i = torch.arange(n, dtype=torch.float64)
    karras = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(sched.t_from_fraction(1 - i / (n - 1)), karras)


# ---------------------------------------------------------------- flow
def test_flow_alpha_one_minus_t():
    sched = FlowSchedule(t_min=1e-3)
    t = torch.tensor([1e-3, 0.25, 0.5, 0.9, 1.0])
    torch.testing.assert_close(sched.alpha(t), 1 - t)
    torch.testing.assert_close(sched.sigma(t), t)
    torch.testing.assert_close(sched.alpha(t) + sched.sigma(t), torch.ones_like(t))
    u = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(sched.t_from_fraction(u), torch.tensor([1e-3, 1.0]))


# ---------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("sched", _all_schedules(), ids=lambda s: s.kind)
def test_t_from_fraction_monotone(sched):
    u = torch.linspace(0, 1, 2001)
    t = sched.t_from_fraction(u)
    assert (t[1:] >= t[:-1]).all()
    assert t[-1] > t[0]
    sig = sched.sigma(t).double() / sched.alpha(t).double().clamp_min(1e-12)  # noise-to-signal grows with u
    assert (sig[1:] >= sig[:-1] - 1e-9).all()
    if not sched.discrete:
        assert (t[1:] > t[:-1]).all()


@pytest.mark.parametrize("sched", _all_schedules(), ids=lambda s: s.kind)
def test_sample_t_stays_in_fraction_range(sched):
    torch.manual_seed(0)
    t = sched.sample_t(4000, 0.02, 0.98)
    assert t.shape == (4000,)
    lo, hi = sched.t_from_fraction(torch.tensor([0.02, 0.98], dtype=torch.float64)).tolist()
    if sched.discrete:  # integer timesteps: inside [0.02, 0.98] of [0, T-1]
        T1 = sched.num_train_timesteps - 1
        assert (t / T1 >= 0.02).all() and (t / T1 <= 0.98).all()
        assert torch.equal(t, t.round())
    else:
        eps = 1e-5 * max(abs(lo), abs(hi))
        assert (t >= lo - eps).all() and (t <= hi + eps).all()
    # and actually spreads over the range rather than collapsing to a point
    assert t.min() < lo + 0.1 * (hi - lo) and t.max() > hi - 0.1 * (hi - lo)


@pytest.mark.parametrize("sched", _all_schedules(), ids=lambda s: s.kind)
def test_add_noise_is_alpha_x0_plus_sigma_eps(sched):
    torch.manual_seed(1)
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = sched.sample_t(5)
    a, s = sched.alpha(t), sched.sigma(t)
    expect = a[:, None, None, None] * x0 + s[:, None, None, None] * eps
    torch.testing.assert_close(sched.add_noise(x0, eps, t), expect)


@pytest.mark.parametrize("kind,settings", [
    ("vp", {}),
    ("vp", dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("edm", {}), ("edm", dict(sigma_min=0.01, sigma_max=20.0, rho=5.0)),
    ("flow", {}), ("flow", dict(t_min=0.01, time_scale=1.0))], ids=lambda v: v if isinstance(v, str) else "")
def test_make_schedule_round_trips_config(kind, settings):
    """Non-default settings too: a to_config that kept only the kind passed with the defaults (VP's fractions do
    not depend on its betas at all)."""
    sched = make_schedule(kind, **settings)
    cfg = sched.to_config()
    assert cfg["kind"] == kind and settings.items() <= cfg.items()
    again = make_schedule(**cfg)
    assert again.to_config() == cfg
    u = torch.linspace(0, 1, 11)
    t = sched.t_from_fraction(u)
    torch.testing.assert_close(again.t_from_fraction(u), t)
    for a, b in zip(again.alpha_sigma(t), sched.alpha_sigma(t)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(again.net_time(t), sched.net_time(t))


# ---------------------------------------------------------------- errors
def test_unknown_schedule_kind_names_options():
    with pytest.raises(ValueError) as e:
        make_schedule("cosine_ddpm")
    msg = str(e.value)
    assert "cosine_ddpm" in msg
    for k in ("vp", "edm", "flow"):
        assert k in msg


def test_unknown_beta_schedule_names_options():
    for make in (lambda: VPSchedule(beta_schedule="sigmoid"), lambda: betas_for("sigmoid", 10, 1e-4, 0.02),
                 lambda: make_schedule("vp", beta_schedule="sigmoid")):
        with pytest.raises(ValueError) as e:
            make()
        msg = str(e.value)
        assert "sigmoid" in msg
        for k in BETA_SCHEDULES:
            assert k in msg


@pytest.mark.parametrize("sched, inside, outside", [
    (VPSchedule(), [999.0, 1.0], [1000.0]),   # 0 is in range but refused: the LCM boundary returns the input there
    (EDMSchedule(), [80.0, 0.002], [81.0]),
    (FlowSchedule(), [1.0, 1e-3], [1.5]),
])
def test_generator_timesteps_stay_in_the_schedules_range(sched, inside, outside):
    """A student's timesteps may reach both ends of the teacher's range (every default does) but not past them:
    a VP schedule would clamp the index silently, EDM and flow would extrapolate."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.generator import FewStepGenerator
    from stepdistill.networks.mlp import TimeMLP
    den = NetworkDenoiser(TimeMLP(2, 8, 0), sched, "edm", sigma_data=1.0)
    for steps in (1, 4):
        FewStepGenerator(den, steps=steps)
    FewStepGenerator(den, inside, 2)
    with pytest.raises(ValueError, match="each must lie in the schedule's range"):
        FewStepGenerator(den, outside, 1)


def test_generator_timesteps_on_a_discrete_schedule_are_integers():
    """A VP student at 499.7 read alpha and sigma at row 500, fed the network 499.7, and exported as 499: three
    times for one step. Integers written as floats pass; continuous schedules take any time."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.generator import FewStepGenerator
    from stepdistill.networks.mlp import TimeMLP
    den = NetworkDenoiser(TimeMLP(2, 8, 0), VPSchedule(), "edm", sigma_data=1.0)
    with pytest.raises(ValueError, match=r"a discrete \(VP\) schedule takes integer timesteps.*use \[999, 500\]"):
        FewStepGenerator(den, [999, 499.7])
    assert FewStepGenerator(den, [999.0, 500.0]).timesteps == [999.0, 500.0]
    FewStepGenerator(NetworkDenoiser(TimeMLP(2, 8, 0), EDMSchedule(), "edm", sigma_data=1.0), [80.0, 1.37])


def test_epsilon_prediction_is_refused_where_alpha_reaches_zero():
    """x0 = (x_t - sigma eps) / alpha: rectified flow's alpha is 1 - t, 0 at t = 1 (its samples were NaN there)."""
    from stepdistill.denoiser import NetworkDenoiser
    from stepdistill.networks.mlp import TimeMLP
    with pytest.raises(ValueError, match="'epsilon' on a rectified-flow schedule.*flow_velocity"):
        NetworkDenoiser(TimeMLP(2, 8, 0), FlowSchedule(), "epsilon")
    for prediction in ("flow_velocity", "sample", "edm"):
        NetworkDenoiser(TimeMLP(2, 8, 0), FlowSchedule(), prediction)


@pytest.mark.parametrize("sched", _all_schedules(), ids=lambda s: s.kind)
def test_alpha_sigma_together_are_alpha_and_sigma_exactly(sched):
    """The one-lookup pair (the denoisers' and add_noise's path) gives the same values, bit for bit."""
    t = sched.t_from_fraction(torch.linspace(0, 1, 1001))
    a, s = sched.alpha_sigma(t)
    assert torch.equal(a, sched.alpha(t)) and torch.equal(s, sched.sigma(t))


def test_another_kinds_settings_are_a_clear_error():
    """`benchmark.schedule={kind: edm}` merges into the VP defaults: a TypeError traceback before."""
    with pytest.raises(ValueError, match=r"schedule kind 'edm' has no setting beta_schedule, num_train_timesteps "
                                         r"\(its settings: sigma_min, sigma_max, rho\)"):
        make_schedule("edm", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
