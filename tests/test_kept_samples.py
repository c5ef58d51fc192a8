"""`method.reuse_generator_samples`: a critic phase after a generator phase trains on that phase's samples, as
DMD2's reference code does, and a checkpoint between the two carries them."""
import pytest
import torch

from conftest import compose_cfg
from stepdistill.cli.train import train
from stepdistill.methods.distribution_matching import fake_score_loss
from stepdistill.train.setup import build_run


def _count_calls(module):
    calls = {"n": 0}

    def hook(_m, _i):
        calls["n"] += 1
    return calls, module.register_forward_pre_hook(hook)


def _batch(n=64):
    return {"noise": torch.randn(n, 2), "cond": None, "real": torch.randn(n, 2), "real_cond": None}


@pytest.mark.parametrize("method", ["dmd2", "dmd", "fdistill"])
def test_critic_after_a_generator_phase_trains_on_its_samples(gmm_cfg, method):
    extra = ["method.gan.enabled=false"] if method == "dmd2" else []
    run = build_run(gmm_cfg(f"method={method}", "method.reuse_generator_samples=true", *extra))
    m = run.method
    batch = _batch()
    if method == "dmd":
        batch.update(reg_noise=torch.randn(8, 2), reg_cond=None, reg_target=torch.randn(8, 2))
    m.loss("generator", batch, 10)
    (kept_x, _, _), = m.kept_samples.kept   # one entry: no gradient accumulation
    assert not kept_x.requires_grad
    calls, handle = _count_calls(run.roles["generator"])
    other = _batch()   # the critic ignores this batch's noise: its samples are the generator phase's
    if method == "dmd2":   # without the GAN the critic loss is the denoising loss on the kept samples alone
        state = torch.get_rng_state()
        out = m.loss("critic", other, 11)
        torch.set_rng_state(state)
        expected = fake_score_loss(run.roles["fake_score"], kept_x, None)
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    else:
        m.loss("critic", other, 11)
    assert calls["n"] == 0 and m.kept_samples.kept == []
    m.loss("critic", other, 12)   # a second critic update (critic_steps > 1, warm-up) draws fresh samples
    assert calls["n"] == 1
    handle.remove()


def test_without_the_switch_every_critic_phase_draws_fresh_samples(gmm_cfg):
    run = build_run(gmm_cfg("method=dmd2"))
    run.method.loss("generator", _batch(), 10)
    assert run.method.kept_samples.kept == []
    calls, handle = _count_calls(run.roles["generator"])
    run.method.loss("critic", _batch(), 11)
    assert calls["n"] == 1
    handle.remove()


def test_four_step_critic_sees_the_kept_exit_steps(gmm_cfg):
    """A multi-step student's kept samples keep their exit steps (the step-aware critic is conditioned on them)."""
    run = build_run(gmm_cfg("method=dmd2", "generator=four_step", "method.step_aware_critic=true",
                            "method.reuse_generator_samples=true"))
    run.method.loss("generator", _batch(), 10)
    (x, _, steps), = run.method.kept_samples.kept
    seen = []
    emb = run.roles["critic_step_embedding"]
    real_condition = emb.condition

    def spy(s):
        seen.append(s.clone())
        return real_condition(s)
    emb.condition = spy
    run.method.loss("critic", _batch(), 11)
    assert torch.equal(seen[0], steps) and len(set(steps.tolist())) > 1


def test_resume_between_a_generator_and_a_critic_phase_is_exact(gmm_cfg, tmp_path):
    """Steps 0-3 warm the critic up, then critic / generator alternate: step 21 is a generator phase, so the
    checkpoint after 22 steps holds its samples for the critic phase at step 22."""
    common = ["method=dmd2", "method.reuse_generator_samples=true", "trainer.checkpoint_every=22",
              "trainer.keep_checkpoints=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(gmm_cfg(*common, "trainer.max_steps=30"), straight)
    train(gmm_cfg(*common, "trainer.max_steps=22"), resumed)
    st = torch.load(resumed / "checkpoints/step_0000022/trainer_state.pt", weights_only=True)
    kept = st["method"]["kept_samples"]["kept"]
    assert kept["x"].shape == (64, 2) and kept["cond"] is None
    train(gmm_cfg(*common, "trainer.max_steps=30", "trainer.resume=true"), resumed)
    from safetensors.torch import load_file
    for role in ("generator", "generator_ema", "fake_score", "gan_head"):   # the EMA: what sampling uses
        a, b = (load_file(str(d / f"checkpoints/step_0000030/{role}.safetensors")) for d in (straight, resumed))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{role}.{k}")


def test_methods_that_draw_their_own_critic_samples_refuse_the_switch():
    with pytest.raises(ValueError, match="drop the switch"):
        build_run(compose_cfg("benchmark=gmm", "method=sid", "+method.reuse_generator_samples=true"))
