"""rCM: the schedule (sCM alone through the tangent warm-up, then TTUR with a fake score), the generator loss as
sCM's plus the weighted DMD loss on the student's own samples, gradient paths, a short gmm training."""
import pytest
import torch
from conftest import GMM_FAST, assert_phase_reaches_only, compose_cfg, train_briefly

from stepdistill.methods.distribution_matching import dmd_loss
from stepdistill.methods.scm import SCM
from stepdistill.train.batches import BatchSource
from stepdistill.train.setup import build_run


def _run(*overrides):
    return build_run(compose_cfg(*GMM_FAST, "method=rcm", *overrides))


def test_schedule_is_scm_warmup_then_critic_warmup_then_ttur():
    run = _run("method.warmup_steps=3", "method.critic_warmup_steps=2", "method.critic_steps=2")
    got = [run.method.phase(s) for s in range(11)]
    assert got == ["generator"] * 3 + ["critic"] * 2 + ["critic", "critic", "generator"] * 2
    # rCM's sCM term has no learned weighting (its code: 100 x the summed loss), unlike sCM's default
    assert run.method.phases == {"generator": ("generator",), "critic": ("fake_score",)}
    assert run.method.weighting == "uniform" and "weighting" not in run.roles


def test_generator_loss_is_scm_plus_weighted_dmd_on_student_samples():
    run = _run("method.warmup_steps=5", "method.dmd_weight=0.3")
    m = run.method
    batch = BatchSource(run.benchmark, m.batch_keys, 32, "cpu")()

    def scm_part(step):
        return SCM.generator_loss(m, batch, step)

    torch.manual_seed(1)
    during = m.generator_loss(batch, 4)          # still in the tangent warm-up: sCM alone
    torch.manual_seed(1)
    assert torch.equal(during.loss, scm_part(4).loss) and "loss_dm" not in during.logs

    gen = run.roles["generator"]
    torch.manual_seed(2)
    after = m.generator_loss(batch, 5)
    got = torch.autograd.grad(after.loss, list(gen.parameters()))
    torch.manual_seed(2)
    expected = scm_part(5).loss
    x = gen(torch.randn_like(batch["noise"]), batch["cond"])   # fresh noise, not the sCM noise
    dm, _ = dmd_loss(x, run.roles["teacher"], run.roles["fake_score"], batch["cond"], 1.0, 1.0, (0.02, 0.98), "batch")
    torch.testing.assert_close(after.loss, expected + 0.3 * dm)
    assert after.logs["loss_dm"] == pytest.approx(dm.item())
    # and its gradient: the DMD term reaches the student through its samples (a detached x keeps the value only)
    g_scm = torch.autograd.grad(expected, list(gen.parameters()), retain_graph=True)
    g_dm = torch.autograd.grad(dm, list(gen.parameters()))
    for a, s, d in zip(got, g_scm, g_dm):
        torch.testing.assert_close(a, s + 0.3 * d, rtol=1e-4, atol=1e-7)
    assert sum(d.abs().sum() for d in g_dm) > 1e-3 * sum(s.abs().sum() for s in g_scm)   # a term one can see


def test_gradients_reach_only_each_phase_roles():
    run = _run("method.warmup_steps=0")
    assert_phase_reaches_only(run, "generator", ("generator",))   # sCM + DMD through the student
    run = _run("method.warmup_steps=0", "method.weighting=adaptive")
    assert_phase_reaches_only(run, "generator", ("generator", "weighting"))
    assert_phase_reaches_only(run, "critic", ("fake_score",))


def test_negative_dmd_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="method.dmd_weight must be >= 0"):
        _run("method.dmd_weight=-1")


def test_rcm_trains_on_gmm_one_and_two_steps(tmp_path):
    cfgs = [compose_cfg(*GMM_FAST, "method=rcm", "method.warmup_steps=6", "trainer.max_steps=14", *extra)
            for extra in ([], ["generator=four_step", "generator.steps=2"])]
    train_briefly(cfgs, tmp_path)


def test_only_methods_with_a_critic_build_a_fake_score():
    assert "fake_score" not in build_run(compose_cfg(*GMM_FAST, "method=scm")).roles   # sCM has no critic
    assert "fake_score" in _run().roles
