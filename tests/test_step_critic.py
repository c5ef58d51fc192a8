"""The step-aware fake score (method.step_aware_critic): a zero-initialised exit-step embedding on the critic's
timestep embedding, trained by the critic phase only, present only where the method asks for it."""
import pytest
import torch

from stepdistill.denoiser import NetworkDenoiser
from stepdistill.methods.distribution_matching import fake_score_loss
from stepdistill.methods.step_critic import StepEmbedding
from stepdistill.networks.mlp import TimeMLP
from stepdistill.schedules import VPSchedule
from stepdistill.train.setup import build_run
from stepdistill.train.trainer import Trainer

from conftest import assert_phase_reaches_only, tiny_unet


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_step_embedding_starts_as_the_plain_critic_then_separates_steps(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        fake = NetworkDenoiser(TimeMLP(2, 32, 2, num_classes=3), VPSchedule(), "edm", sigma_data=2.0, null_class=3)
        x = torch.randn(6, 2)
    else:
        fake = NetworkDenoiser(tiny_unet(num_class_embeds=4), VPSchedule(), "epsilon", null_class=3)
        x = torch.randn(6, 1, 8, 8)
    emb = StepEmbedding(fake.net, num_steps=4)
    t, cond, steps = torch.full((6,), 500.0), torch.randint(0, 3, (6,)), torch.tensor([1, 2, 3, 4, 1, 2])
    plain = fake.x0(x, t, cond)
    with torch.no_grad(), emb.condition(steps):
        torch.testing.assert_close(fake.x0(x, t, cond), plain)  # zero-initialised: the critic is unchanged
    with torch.no_grad():
        emb.table.weight.normal_()
        with emb.condition(steps):
            stepped = fake.x0(x, t, cond)
            guided = fake.x0(x, t, cond, guidance=2.0)  # CFG doubles the batch: the steps repeat
            # each row's two branches see that row's exit step (a wrong row order would mix the steps)
            uncond = fake.x0(x, t, torch.full_like(cond, 3))
        with emb.condition(torch.tensor([1, 1, 1, 1, 1, 1])):
            all_first = fake.x0(x, t, cond)
    same = steps == 1
    torch.testing.assert_close(stepped[same], all_first[same])
    assert (stepped[~same] - all_first[~same]).abs().amax() > 1e-4
    # (a UNet's convolutions round differently at twice the batch: 2e-5; the rows' steps in the wrong order: 0.97)
    torch.testing.assert_close(guided, uncond + 2.0 * (stepped - uncond), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fake.x0(x, t, cond), plain)  # outside the context the hook is gone


def test_critic_loss_trains_the_rows_of_the_steps_it_saw():
    torch.manual_seed(0)
    fake = NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0)
    emb = StepEmbedding(fake.net, num_steps=4)
    assert not any(p is q for p in emb.parameters() for q in fake.parameters())  # the critic is not re-registered
    with emb.condition(torch.tensor([2, 4, 2, 4])):
        fake_score_loss(fake, torch.randn(4, 2)).backward()
    row_norms = emb.table.weight.grad.norm(dim=1)
    assert row_norms[0] == 0 and row_norms[2] == 0 and row_norms[1] > 0 and row_norms[3] > 0


def test_gain_is_the_embeddings_learning_rate_in_units_of_the_critics():
    """Adam's first step moves each table element by lr whatever its gradient's scale, so the embedding a gain-g
    table adds to the time embedding moves g times as far as at gain 1 (DESIGN: the gain is an lr multiplier)."""
    torch.manual_seed(0)
    fake = NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0)
    x, steps = torch.randn(8, 2), torch.tensor([1, 2, 3, 4, 1, 2, 3, 4])
    moved = {}
    for gain in (1.0, 30.0):
        emb = StepEmbedding(fake.net, num_steps=4, gain=gain)
        torch.manual_seed(1)
        with emb.condition(steps):
            fake_score_loss(fake, x).backward()
        fake.zero_grad()
        torch.optim.Adam(emb.parameters(), lr=1e-3, eps=1e-16).step()
        moved[gain] = (emb.gain * emb.table.weight).detach()
    torch.testing.assert_close(moved[30.0], 30 * moved[1.0], rtol=1e-4, atol=1e-9)
    assert moved[1.0].abs().amax() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="step_embedding_gain"):
        StepEmbedding(fake.net, 4, gain=0.0)


def test_step_aware_dmd2_trains_and_only_the_critic_phase_moves_the_embedding(gmm_cfg, tmp_path):
    cfg = gmm_cfg("method=dmd2", "generator=four_step", "method.step_aware_critic=true", "method.critic_steps=1",
                  "method.critic_warmup_steps=0", "trainer.max_steps=6")
    run = build_run(cfg)
    assert "critic_step_embedding" in run.method.phases["critic"]
    trainer = Trainer(run, tmp_path)
    from stepdistill.train.batches import BatchSource
    batches = BatchSource(run.benchmark, run.method.batch_keys, 64, trainer.device)
    table = run.roles["critic_step_embedding"].table.weight
    for _ in range(6):
        before = table.detach().clone()
        phase, logs = trainer.train_step(batches)
        trainer.step += 1
        assert logs is not None and all(torch.isfinite(torch.tensor(v)) for v in logs.values())
        moved = not torch.equal(before, table.detach())
        assert moved == (phase == "critic"), phase
    # checkpoints carry the embedding with the other trainable roles
    assert (trainer.save() / "critic_step_embedding.safetensors").is_file()


def test_step_aware_critic_needs_a_timestep_embedding():
    class NoTime(torch.nn.Module):
        def forward(self, x, t, cond=None):
            return x
    with pytest.raises(ValueError, match="step_aware_critic"):
        StepEmbedding(NoTime(), 4)


def _step_aware_gan_run(gmm_cfg, *extra):
    run = build_run(gmm_cfg("method=dmd2", "generator=four_step", "method.step_aware_critic=true", *extra))
    with torch.no_grad():   # zero-initialised: make the exit step visible to the critic
        run.roles["critic_step_embedding"].table.weight.normal_()
    from stepdistill.train.batches import BatchSource
    return run, BatchSource(run.benchmark, run.method.batch_keys, 32, "cpu")()


def test_step_aware_gan_tells_real_from_each_steps_outputs(gmm_cfg):
    """method.gan.step_aware: the discriminator loss is the hand computation with every fake sample under its own
    exit step and real row i under fake row i's step; the generator's GAN term changes, its DM term does not."""
    from stepdistill.methods.gan import DiffusionGAN
    run, batch = _step_aware_gan_run(gmm_cfg, "method.gan.step_aware=true")
    m, emb, c = run.method, run.roles["critic_step_embedding"], run.cfg.method
    torch.manual_seed(5)
    got = m.loss("critic", batch, 0).loss
    torch.manual_seed(5)
    with torch.no_grad():
        x, steps = run.roles["generator"](batch["noise"], batch["cond"], return_steps=True)
    assert len(set(steps.tolist())) > 1   # a mixed-step batch, so a wrong pairing would show
    with emb.condition(steps):
        expected = fake_score_loss(run.roles["fake_score"], x, batch["cond"])
        l_d = DiffusionGAN.discriminator_loss(m.gan.logits(batch["real"], batch["real_cond"]),
                                              m.gan.logits(x, batch["cond"]))
    torch.testing.assert_close(got, expected + c.gan.critic_weight * l_d)
    # the same draws with the plain (mixture) discriminator give another loss
    m.gan_step_aware = False
    torch.manual_seed(5)
    assert not torch.allclose(m.loss("critic", batch, 0).loss, got)
    outs = {}
    for aware in (True, False):
        m.gan_step_aware = aware
        torch.manual_seed(6)
        outs[aware] = m.loss("generator", batch, 0).logs
    assert outs[True]["loss_dm"] == outs[False]["loss_dm"]
    assert outs[True]["loss_gan_g"] != outs[False]["loss_gan_g"]


def test_step_aware_gan_gradients_stay_in_their_phase(gmm_cfg):
    run, _ = _step_aware_gan_run(gmm_cfg, "method.gan.step_aware=true", "method.gan.critic_weight=1.0")
    assert_phase_reaches_only(run, "generator", ("generator",))
    assert_phase_reaches_only(run, "critic", ("fake_score", "gan_head", "critic_step_embedding"))


def test_step_aware_gan_needs_the_step_aware_critic(gmm_cfg):
    with pytest.raises(ValueError, match="step_aware_critic=true"):
        build_run(gmm_cfg("method=dmd2", "generator=four_step", "method.gan.step_aware=true"))


def test_dmd2_generator_phase_scores_each_sample_under_its_own_exit_step(gmm_cfg):
    """Catches DMD2.generator_loss showing the fake score another step than each sample's own (e.g.
    `_fake_sees_steps(torch.ones_like(steps))`): with a random step embedding, d loss / d x of every sample is the DM
    gradient (fake.x0 under that sample's exit step - the exact teacher x0) / mean|x - teacher x0| / numel (the
    gmm's batch normaliser), on the replayed draws of the generator, t and the noise."""
    run = build_run(gmm_cfg("method=dmd2", "generator=four_step", "method.step_aware_critic=true",
                            "method.gan.enabled=false"))
    gen, fake, emb = run.roles["generator"], run.roles["fake_score"], run.roles["critic_step_embedding"]
    mix, sched, c = run.roles["teacher"].mixture, gen.schedule, run.cfg.method
    assert run.method.normalizer == "batch" and c.dm_draws == 1
    with torch.no_grad():
        emb.table.weight.normal_()
    outs, forward = [], gen.forward

    def spy(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out[0].requires_grad:
            out[0].retain_grad()
        outs.append(out)
        return out
    gen.forward = spy
    batch = {"noise": torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), "cond": None}
    torch.manual_seed(3)
    run.method.loss("generator", batch, 0).loss.backward()
    x, ks = outs[0]
    assert set(ks.tolist()) == {1, 2, 3, 4}
    torch.manual_seed(3)   # replay: the generator's draws, then the DM term's t and noise
    with torch.no_grad():
        gen(batch["noise"], None, return_steps=True)
    t = sched.sample_t(64, float(c.t_min), float(c.t_max))
    a, s = sched.alpha(t).double(), sched.sigma(t).double()
    x_t = (a[:, None] * x.detach().double() + s[:, None] * torch.randn(64, 2).double()).float()
    real = mix.posterior_mean(x_t, a, s).double()
    with torch.no_grad(), emb.condition(ks):
        fake_x0 = fake.x0(x_t, t).double()
    expected = (fake_x0 - real) / (x.detach().double() - real).abs().mean() / x.numel()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
