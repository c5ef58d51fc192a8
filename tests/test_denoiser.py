"""NetworkDenoiser (DESIGN §2): CFG in one batched call, derived eps/score/velocity, native denoising loss."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stepdistill.denoiser import NetworkDenoiser
from stepdistill.schedules import EDMSchedule, FlowSchedule, VPSchedule

N_CLASSES = 11  # 10 real classes + the null class
NULL = 10
SIGMA_DATA = 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add sync overhead on a shared 2-core box; restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyCondNet(nn.Module):
    """net(x, t, cond): output depends on x, t and (non-linearly) on the class label."""

    def __init__(self, channels: int = 1, n_classes: int = N_CLASSES):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Embedding(n_classes, channels)
        self.t_lin = nn.Linear(1, channels)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, t, cond):
        h = self.conv(x) + torch.tanh(self.t_lin(t.to(x.dtype)[:, None]))[..., None, None]
        if cond is not None:
            e = self.emb(cond)[..., None, None]
            h = h + e + e * torch.tanh(x)
        return h


_UNET = []


def tiny_unet():
    """A tiny class-conditional diffusers UNet2DModel (built once, then copied: construction is the slow part)."""
    if not _UNET:
        _UNET.append(_build_unet())
    return copy.deepcopy(_UNET[0])


def _build_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=N_CLASSES, layers_per_block=1).eval()


SCHEDULE_FOR = {"epsilon": VPSchedule, "v_prediction": VPSchedule, "sample": VPSchedule,
                "flow_velocity": FlowSchedule, "edm": EDMSchedule}
PRED_TYPES = list(SCHEDULE_FOR)


def _batch(sched, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) * 0.9 + 0.05
    t = sched.t_from_fraction(u)
    x = torch.randn(n, 1, 8, 8, generator=g) * sched.sigma(t).reshape(-1, 1, 1, 1).clamp_min(1.0)
    cond = torch.randint(0, NULL, (n,), generator=g)
    return x, t, cond


def _ab(sched, t):
    return sched.alpha(t).reshape(-1, 1, 1, 1), sched.sigma(t).reshape(-1, 1, 1, 1)


class CallCounter:
    """Forward hook recording the batch size of every backbone call."""

    def __init__(self, module):
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.batches.append(args[0].shape[0])

    def close(self):
        self.handle.remove()


NETS = {"tiny": TinyCondNet, "unet": tiny_unet}


# ---------------------------------------------------------------- classifier-free guidance
@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("pred", PRED_TYPES)
def test_cfg_equals_combination_of_two_unguided_calls(net_name, pred):
    sched = SCHEDULE_FOR[pred]()
    den = NetworkDenoiser(NETS[net_name](), sched, prediction_type=pred, sigma_data=SIGMA_DATA, null_class=NULL)
    x, t, cond = _batch(sched)
    with torch.no_grad():
        x0_c = den.x0(x, t, cond)
        x0_u = den.x0(x, t, torch.full_like(cond, NULL))
        assert (x0_c - x0_u).abs().max() > 1e-4, "the test net must depend on the condition"
        for w in (0.0, 2.5, 7.0):
            guided = den.x0(x, t, cond, guidance=w)
            torch.testing.assert_close(guided, x0_u + w * (x0_c - x0_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("net_name", list(NETS))
def test_guided_path_is_one_batched_forward(net_name):
    sched = VPSchedule()
    den = NetworkDenoiser(NETS[net_name](), sched, null_class=NULL)
    x, t, cond = _batch(sched, n=3)
    counter = CallCounter(den.net)
    try:
        with torch.no_grad():
            den.x0(x, t, cond, guidance=4.0)
            assert counter.batches == [6]
            counter.batches.clear()
            den.x0(x, t, cond, guidance=1.0)
            assert counter.batches == [3]
            counter.batches.clear()
            den.eps(x, t, cond, guidance=2.0)  # derived quantities go through the same single call
            den.score(x, t, cond, guidance=2.0)
            assert counter.batches == [6, 6]
    finally:
        counter.close()


def test_guidance_on_unconditional_denoiser_raises():
    sched = VPSchedule()
    den = NetworkDenoiser(TinyCondNet(), sched, null_class=None)
    x, t, cond = _batch(sched)
    with pytest.raises(ValueError, match="guidance"):
        den.x0(x, t, cond, guidance=3.0)
    with pytest.raises(ValueError, match="guidance"):
        den.x0(x, t, None, guidance=3.0)
    with pytest.raises(ValueError, match="guidance"):
        den.eps(x, t, None, guidance=0.5)
    # guidance 1 is fine without a condition
    with torch.no_grad():
        assert den.x0(x, t, None).shape == x.shape


def test_guidance_with_scalar_time():
    sched = VPSchedule()
    den = NetworkDenoiser(TinyCondNet(), sched, null_class=NULL)
    x, _, cond = _batch(sched)
    with torch.no_grad():
        a = den.x0(x, 500, cond, guidance=3.0)
        b = den.x0(x, torch.full((x.shape[0],), 500.0), cond, guidance=3.0)
        c = den.x0(x, torch.tensor([500.0]), cond, guidance=3.0)   # shape (1,): CFG's doubled batch failed on it
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, b)


# ---------------------------------------------------------------- raw output -> x0 plumbing
@pytest.mark.parametrize("pred", PRED_TYPES)
def test_x0_from_direct_network_call(pred):
    """x0 equals the closed form applied to net(x_in, net_time(t), cond) called by hand."""
    sched = SCHEDULE_FOR[pred]()
    net = TinyCondNet()
    den = NetworkDenoiser(net, sched, prediction_type=pred, sigma_data=SIGMA_DATA, null_class=NULL)
    x, t, cond = _batch(sched, seed=1)
    a, s = _ab(sched, t)
    sd = SIGMA_DATA
    with torch.no_grad():
        if pred == "edm":  # Karras Table 1 (a = 1): D = c_skip x + c_out F(c_in x, c_noise = ln(sigma)/4)
            c_in = 1 / (s**2 + sd**2).sqrt()
            out = net(c_in * x, t.log() / 4, cond)
            expect = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * out
        else:
            t_net = t * 1000 if pred == "flow_velocity" else t
            out = net(x, t_net, cond)
            expect = {"epsilon": lambda: (x - s * out) / a,
                      "v_prediction": lambda: a * x - s * out,  # a^2 + s^2 = 1
                      "sample": lambda: out,
                      "flow_velocity": lambda: x - t.reshape(-1, 1, 1, 1) * out}[pred]()
        torch.testing.assert_close(den.x0(x, t, cond), expect, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(den.raw(x, t, cond), out)


class HalfOutput(nn.Module):
    """A network that answers in float16, as one run in half precision does."""

    def __init__(self):
        super().__init__()
        self.net = TinyCondNet()

    def forward(self, x, t, cond):
        return self.net(x.float(), t, cond).half()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "edm"])
def test_half_precision_inputs_get_fp32_coefficients(pred):
    """x0 is fp32 math on the fp16 x_t and output, with alpha and sigma taken from the schedule in fp32: cast to
    fp16 first, alpha(999) = 0.0064 kept three digits, and x0 = (x_t - sigma eps) / alpha was off by ~5e-4. The
    network still gets x_t in fp16."""
    from stepdistill.prediction import edm_coefficients
    sched = VPSchedule()
    den = NetworkDenoiser(HalfOutput(), sched, prediction_type=pred, sigma_data=SIGMA_DATA, null_class=NULL)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([999.0, 990.0, 700.0])
    x = torch.randn(3, 1, 8, 8, generator=g).half()
    cond = torch.tensor([1, 2, 3])
    a, s = _ab(sched, t)
    with torch.no_grad():
        if pred == "edm":
            c_in, c_skip, c_out = edm_coefficients(a, s, SIGMA_DATA)
            out = den.net((c_in * x.float()).half(), t, cond).float()
            expect = c_skip * x.float() + c_out * out
        else:
            out = den.net(x, t, cond).float()
            expect = (x.float() - s * out) / a if pred == "epsilon" else a * x.float() - s * out
        got = den.x0(x, t, cond)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta_schedule", ["squaredcos_cap_v2", "scaled_linear"])
def test_edm_coefficient_table_gives_the_computed_values(beta_schedule):
    """On a VP schedule in float32 the EDM scalings come from a per-timestep table; they must equal the formula
    applied to the looked-up alpha and sigma bit for bit, so a run gives the same weights as without the table."""
    from stepdistill.prediction import edm_coefficients
    sched = VPSchedule(beta_schedule=beta_schedule)
    den = NetworkDenoiser(TinyCondNet(), sched, prediction_type="edm", sigma_data=0.37)
    t = torch.arange(0.0, 1000.0).flip(0)
    like = torch.zeros(1000, 1, 2, 2)
    rows = den._edm_rows(t, like)
    a, s = (v.reshape(-1, 1, 1, 1) for v in sched.alpha_sigma(t))
    for got, want in zip(rows, (a, s, *edm_coefficients(a, s, 0.37))):
        assert got.shape == (1000, 1, 1, 1) and torch.equal(got, want)
    # float64 and explicit (alpha, sigma) take the formula in their own precision
    rows64 = den._edm_rows(t, like.double())
    assert rows64[2].dtype == torch.float64
    torch.testing.assert_close(rows64[2].float(), rows[2])
    given = (torch.full((1000,), 0.6), torch.full((1000,), 0.8))
    want_c_in = edm_coefficients(given[0], given[1], 0.37)[0].reshape(-1, 1, 1, 1)
    assert torch.equal(den._edm_rows(t, like, given)[2], want_c_in)


# ---------------------------------------------------------------- eps / score / velocity
@pytest.mark.parametrize("pred", PRED_TYPES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_eps_score_velocity_consistent_with_x0(pred, guidance):
    sched = SCHEDULE_FOR[pred]()
    den = NetworkDenoiser(TinyCondNet(), sched, prediction_type=pred, sigma_data=SIGMA_DATA, null_class=NULL)
    x, t, cond = _batch(sched, seed=2)
    a, s = _ab(sched, t)
    with torch.no_grad():
        x0 = den.x0(x, t, cond, guidance)
        eps = den.eps(x, t, cond, guidance)
        score = den.score(x, t, cond, guidance)
        vel = den.velocity(x, t, cond, guidance)
    torch.testing.assert_close(eps, (x - a * x0) / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score, -eps / s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score, -(x - a * x0) / s**2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vel, eps - x0, rtol=1e-5, atol=1e-5)
    # x_t is reproduced from the pair (x0, eps)
    torch.testing.assert_close(a * x0 + s * eps, x, rtol=1e-4, atol=1e-4)


def test_velocity_matches_native_flow_output():
    """For a flow_velocity teacher, velocity() returns the network's own output (unguided)."""
    sched = FlowSchedule()
    den = NetworkDenoiser(TinyCondNet(), sched, prediction_type="flow_velocity", null_class=NULL)
    x, t, cond = _batch(sched, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(den.velocity(x, t, cond), den.raw(x, t, cond), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- denoising loss
class FixedOutputNet(nn.Module):
    """Returns a stored tensor whatever the input, and records what it was fed."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.seen = None

    def forward(self, x, t, cond):
        self.seen = (x.detach().clone(), t.detach().clone(), cond)
        return self.out


def _hand_target(pred, x0, noise, a, s, sd=SIGMA_DATA):
    if pred == "epsilon":
        return noise
    if pred == "v_prediction":
        return a * noise - s * x0
    if pred == "sample":
        return x0
    if pred == "flow_velocity":
        return noise - x0
    if pred == "edm":  # a = 1: F target = (x0 - c_skip x_t) / c_out, Karras Table 1
        xt = x0 + s * noise
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        return (x0 - c_skip * xt) / c_out
    raise AssertionError(pred)


@pytest.mark.parametrize("pred", PRED_TYPES)
def test_denoising_loss_is_native_mse(pred):
    sched = SCHEDULE_FOR[pred]()
    g = torch.Generator().manual_seed(4)
    n = 5
    x0 = torch.randn(n, 1, 4, 4, generator=g)
    noise = torch.randn(n, 1, 4, 4, generator=g)
    t = sched.t_from_fraction(torch.rand(n, generator=g) * 0.9 + 0.05)
    a, s = _ab(sched, t)
    target = _hand_target(pred, x0, noise, a, s)

    # a network that outputs the exact native target has zero loss ...
    net = FixedOutputNet(target.clone())
    den = NetworkDenoiser(net, sched, prediction_type=pred, sigma_data=SIGMA_DATA)
    loss = den.denoising_loss(x0, t, noise=noise)
    assert loss.shape == (n,)
    torch.testing.assert_close(loss, torch.zeros(n), rtol=0, atol=1e-8)

    # ... and was fed x_t = a x0 + s noise (times c_in for EDM) at the schedule's network time
    x_in = a * x0 + s * noise
    if pred == "edm":
        x_in = x_in / (s**2 + SIGMA_DATA**2).sqrt()
    torch.testing.assert_close(net.seen[0], x_in, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.seen[1], sched.net_time(t))

    # ... and any other fixed output gives the hand-computed per-sample MSE
    out = torch.randn(n, 1, 4, 4, generator=g)
    den.net.out = out
    expect = ((out - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(den.denoising_loss(x0, t, noise=noise), expect, rtol=1e-5, atol=1e-6)


def test_denoising_loss_backpropagates_with_unet():
    sched = VPSchedule()
    den = NetworkDenoiser(tiny_unet(), sched, null_class=NULL)
    x0 = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10.0, 700.0])
    loss = den.denoising_loss(x0, t, cond=torch.tensor([3, NULL]))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in den.net.parameters())


def test_unknown_prediction_type_raises():
    with pytest.raises(ValueError, match="epsilon"):
        NetworkDenoiser(TinyCondNet(), VPSchedule(), prediction_type="eps")


def test_a_sharded_or_freshly_built_unet_is_called_as_a_diffusers_unet():
    """FSDP2's fully_shard renames the class (FSDPUNet2DModel, a subclass), and a UNet built in code has no
    config._class_name: such a network was called net(x, t, cond) and returned a UNet2DOutput, not a tensor."""
    from diffusers import UNet2DModel

    from stepdistill.denoiser import _is_diffusers_unet
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=8)
    unet.__class__ = type("FSDPUNet2DModel", (UNet2DModel,), {})
    assert getattr(unet.config, "_class_name", None) is None and _is_diffusers_unet(unet)
    assert not _is_diffusers_unet(torch.nn.Linear(2, 2))
