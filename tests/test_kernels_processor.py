"""FlashAttnProcessor: diffusers models give the same outputs and gradients through stepdistill.kernels as
through their own processors, and `attention.backend` installs it on every role of a run."""
import pytest
import torch

pytest.importorskip("triton")

from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from stepdistill.kernels import FlashAttnProcessor, set_attention_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":      # exact fp32 convolutions and products, so that only the attention path differs
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def tiny_sd_unet():
    """The tiny_sd teacher's UNet: self-attention over 16 and 4 latent pixels, cross-attention to 7 tokens."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8).to(DEVICE)


def output_and_grads(model, *inputs):
    model.zero_grad()
    out = model(*inputs).sample
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_close(a, b, tol=1e-4):
    assert ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("backend", ["triton", "sdpa", "math"])
def test_unet2dcondition_same_output_and_grads(backend):
    unet = tiny_sd_unet()
    unet.set_attn_processor(AttnProcessor2_0())
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    t = torch.tensor([10, 500], device=DEVICE)
    text = torch.randn(2, 7, 32, device=DEVICE)
    ref_out, ref_grads = output_and_grads(unet, x, t, text)
    n = set_attention_backend(unet, backend)
    assert n == len(unet.attn_processors) == 8     # self + cross in 4 transformer blocks (down, mid, 2 up)
    assert all(isinstance(p, FlashAttnProcessor) for p in unet.attn_processors.values())
    out, grads = output_and_grads(unet, x, t, text)
    assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-3)


def tiny_digits_unet():
    """The digits teacher's architecture: one mid-block attention with head_dim 8 (padded to 16 inside)."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).to(DEVICE)


def test_unet2dmodel_mid_attention_with_padded_head_dim():
    unet = tiny_digits_unet()
    x = torch.randn(3, 1, 8, 8, device=DEVICE)
    t = torch.tensor([1, 200, 900], device=DEVICE)
    ref = unet(x, t).sample
    assert set_attention_backend(unet, "triton") == 1
    assert_close(unet(x, t).sample, ref)


def test_jvp_through_a_unet_matches_plain_attention():
    """What sCM does on digits: torch.func.jvp through the teacher's UNet2DModel architecture under no_grad,
    with a tangent on the input. Through the Triton processor (the fused forward+JVP kernel, head_dim 8 padded)
    the output and its tangent match the model's own attention in plain matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    unet = tiny_digits_unet()
    x = torch.randn(3, 1, 8, 8, device=DEVICE)
    dx = torch.randn_like(x)
    t = torch.tensor([1, 200, 900], device=DEVICE)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        ref, ref_tangent = torch.func.jvp(lambda a: unet(a, t).sample, (x,), (dx,))
    set_attention_backend(unet, "triton")
    with torch.no_grad():
        out, tangent = torch.func.jvp(lambda a: unet(a, t).sample, (x,), (dx,))
    assert_close(out, ref)
    assert_close(tangent, ref_tangent)


def test_attention_mask_goes_to_sdpa():
    """The kernels take no mask: a masked call must still honour it (through SDPA)."""
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16).to(DEVICE)
    x = torch.randn(2, 5, 32, device=DEVICE)
    ctx = torch.randn(2, 6, 16, device=DEVICE)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], device=DEVICE)
    mask = (1.0 - keep) * -10000.0     # diffusers' additive convention
    attn.set_processor(AttnProcessor2_0())
    ref = attn(x, ctx, attention_mask=mask)
    attn.set_processor(FlashAttnProcessor("triton"))
    assert_close(attn(x, ctx, attention_mask=mask), ref)
    assert not torch.allclose(attn(x, ctx), ref, atol=1e-3)    # the mask mattered


def test_a_masked_call_under_forward_ad_and_the_math_backend_in_fp16():
    """A masked call went to SDPA whatever the backend, whose CPU kernels have no forward-mode AD; the math backend
    multiplied unscaled fp16 q·k, which overflowed to NaN where SDPA did not."""
    from diffusers.models.attention_processor import Attention

    from stepdistill.kernels.dispatch import math_attention
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 6, 16)
    mask = (1.0 - torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])) * -10000.0
    tx = torch.randn_like(x)
    attn.set_processor(AttnProcessor2_0())
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref, ref_t = torch.func.jvp(lambda h: attn(h, ctx, attention_mask=mask), (x,), (tx,))
    for backend in ("math", "auto"):
        attn.set_processor(FlashAttnProcessor(backend))
        out, tangent = torch.func.jvp(lambda h: attn(h, ctx, attention_mask=mask), (x,), (tx,))
        assert_close(out, ref)
        assert_close(tangent, ref_t)
    q, k, v = (torch.randn(1, 2, 8, 64) * 6 + 34).half(), (torch.randn(1, 2, 8, 64) * 6 + 34).half(), \
        torch.randn(1, 2, 8, 64).half()
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = math_attention(q, k, v, 64 ** -0.5)
    assert torch.isfinite(out).all() and (out.double() - exact).abs().max() < 0.05


def test_layers_of_another_layout_keep_their_processor_and_wide_heads_refuse_triton(monkeypatch):
    """Attention with added key/value projections (IF / unCLIP's simple cross-attention) failed at the first
    forward under every backend; a one-head attention wider than triton's 256 passed the setup check and failed
    at the first forward."""
    from diffusers.models.attention_processor import Attention
    from omegaconf import OmegaConf

    from stepdistill.train.setup import apply_attention_backend
    added = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16, added_kv_proj_dim=16)
    before = type(added.processor)
    assert set_attention_backend(added, "sdpa") == 0 and type(added.processor) is before
    wide = torch.nn.ModuleDict({"net": Attention(query_dim=288, heads=1, dim_head=288)})
    cfg = OmegaConf.create({"attention": {"backend": "triton"}})
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # the device check, first, passes on the CPU
    with pytest.raises(ValueError, match=r"attention.backend=triton takes head dims up to 256; these networks have "
                                         r"288: use attention.backend=auto or sdpa"):
        apply_attention_backend({"generator": wide}, cfg)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention.backend='fast' is not known"):
        set_attention_backend(torch.nn.Linear(2, 2), "fast")
    assert set_attention_backend(tiny_sd_unet(), "diffusers") == 0


def test_attention_backend_config_reaches_every_role(gmm_cfg):
    """On digits every role (teacher, fake score, generator, EMA) gets the processor; the default leaves the
    models' own processors; the first generator output is unchanged by the switch."""
    from conftest import compose_cfg
    from stepdistill.train.setup import build_run

    def first_sample(run):
        torch.manual_seed(1)
        gen = run.roles["generator"]
        noise = torch.randn(2, *run.benchmark.data_shape)
        return gen(noise, run.benchmark.sample_cond(2))

    def processors(module):
        return [m.processor for m in module.modules() if hasattr(m, "processor")]

    plain = build_run(compose_cfg("benchmark=digits", "trainer.progress=false"))
    assert processors(plain.roles["teacher"])
    assert not any(isinstance(p, FlashAttnProcessor) for p in processors(plain.roles["teacher"]))
    run = build_run(compose_cfg("benchmark=digits", "trainer.progress=false", "attention.backend=math"))
    for name in ("teacher", "fake_score", "generator", "generator_ema"):
        procs = processors(run.roles[name])
        assert procs and all(isinstance(p, FlashAttnProcessor) and p.backend == "math" for p in procs), name
    with torch.no_grad():
        assert_close(first_sample(run), first_sample(plain))
    with pytest.raises(ValueError, match="attention.backend='nope'"):
        build_run(compose_cfg("benchmark=gmm", "attention.backend=nope"))
