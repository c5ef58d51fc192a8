"""`generator.step_experts`: one network per step. Each step runs its own network, step k's loss reaches only
step k's network, the whole run trains and resumes, and the export samples exactly as the student does."""
import pytest
import torch
from omegaconf import OmegaConf

from stepdistill.denoiser import NetworkDenoiser
from stepdistill.generator import FewStepGenerator
from stepdistill.networks.mlp import TimeMLP
from stepdistill.schedules import VPSchedule
from stepdistill.train.evaluation import student_sample

from conftest import digits_cfg, tiny_unet


def mlp_experts(steps=4, num_classes=None):
    """A K-step student whose steps have visibly different networks (fresh random weights each)."""
    torch.manual_seed(0)
    dens = [NetworkDenoiser(TimeMLP(2, 32, 2, num_classes=num_classes), VPSchedule(), "edm", sigma_data=2.0)
            for _ in range(steps)]
    return FewStepGenerator(dens[0], steps=steps, later_experts=dens[1:]), dens


def test_each_step_runs_its_own_network():
    gen, dens = mlp_experts()
    assert gen.step_experts and gen.timesteps == [999.0, 759.0, 499.0, 259.0]
    # the trained timesteps map to their experts; other times to the expert of the nearest trained one
    assert [gen.denoiser_at(t) for t in (999, 759, 499, 259)] == dens
    assert gen.denoiser_at(880) is dens[0] and gen.denoiser_at(870) is dens[1] and gen.denoiser_at(0) is dens[3]
    # a 4-step sample is the chain through the four networks in turn, with the same between-step draws
    z = torch.randn(6, 2)
    out = gen.sample(z, generator=torch.Generator().manual_seed(4))
    g, x = torch.Generator().manual_seed(4), z
    with torch.no_grad():
        for i, (den, t) in enumerate(zip(dens, gen.timesteps)):
            tt = torch.full((6,), t)
            x0 = den.x0(x, tt)
            c_skip, c_out = gen.boundary_scalings(tt)
            x0 = c_skip[:, None] * x + c_out[:, None] * x0
            if i < 3:
                x = gen.renoise(x0, gen.timesteps[i + 1], torch.randn(x0.shape, generator=g))
    torch.testing.assert_close(out, x0)


@pytest.mark.parametrize("step", [1, 3])
def test_step_k_loss_reaches_only_step_ks_network(step):
    gen, dens = mlp_experts()
    gen(torch.randn(5, 2), step=step).square().sum().backward()
    for k, den in enumerate(dens, start=1):
        grads = [p.grad for p in den.parameters()]
        assert all(g is not None for g in grads) if k == step else all(g is None for g in grads), k


def test_per_sample_exit_steps_train_every_expert():
    """A batch of mixed exit steps sends each sample's gradient to the expert of its own step only."""
    gen, dens = mlp_experts()
    torch.manual_seed(1)
    out, ks = gen(torch.randn(64, 2), return_steps=True)
    assert set(ks.tolist()) == {1, 2, 3, 4}
    out[ks == 2].sum().backward()
    moved = [bool(d.net.inp.weight.grad is not None and d.net.inp.weight.grad.any()) for d in dens]
    assert moved == [False, True, False, False]


def test_expert_count_must_match_the_steps():
    gen, dens = mlp_experts()
    with pytest.raises(ValueError, match="3 networks for 4 steps"):
        FewStepGenerator(dens[0], steps=4, later_experts=dens[1:3])


def test_bad_configs_are_clear_errors():
    from stepdistill.train.setup import build_run
    # timestep 0 on a VP schedule: the boundary condition returns the input noise (a student with no gradient)
    with pytest.raises(ValueError, match=r"generator.timesteps=\[999.0, 0.0\]: at timestep 0 the consistency "):
        FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0), timesteps=[999, 0])
    with pytest.raises(ValueError, match="generator.steps >= 2"):
        build_run(digits_cfg("generator.step_experts=true"))
    from stepdistill.benchmarks.base import Benchmark
    with pytest.raises(ValueError, match="model.shared_base shares one"):   # (digits takes no shared base at all)
        Benchmark(None).later_experts(OmegaConf.create({"step_experts": True, "steps": 4}), shared=True)


def test_digits_roles_hold_a_teacher_copy_per_step():
    from stepdistill.train.setup import build_run
    run = build_run(digits_cfg("generator=four_step", "generator.step_experts=true",
                               "model.gradient_checkpointing=true"))
    gen, teacher = run.roles["generator"], run.roles["teacher"].net
    nets = [gen.denoiser.net] + [d.net for d in gen.later_experts]
    assert len({id(n) for n in nets}) == 4
    assert all(n.is_gradient_checkpointing for n in nets)
    for net in nets:   # each starts as the teacher
        for (name, p), q in zip(net.named_parameters(), teacher.parameters()):
            assert torch.equal(p, q), name
    # the generator's optimizer and EMA cover every expert
    n_params = sum(p.numel() for p in gen.parameters())
    assert n_params == 4 * sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in run.roles["generator_ema"].parameters()) == n_params


def test_gmm_experts_train_resume_and_export(gmm_cfg, tmp_path):
    """Every expert moves in a short DMD2 run; 3+3 resumed steps equal 6 straight; the export samples as
    `stepdistill-sample` does."""
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import PointsFewStepPipeline, StepExpertsModel
    from stepdistill.train.setup import build_run, load_run
    extra = ("generator=four_step", "generator.step_experts=true", "method.critic_warmup_steps=0",
             "trainer.checkpoint_every=3")
    start = build_run(gmm_cfg(*extra)).roles["generator"]
    straight = train(gmm_cfg(*extra, "trainer.max_steps=6"), tmp_path / "straight")
    train(gmm_cfg(*extra, "trainer.max_steps=3"), tmp_path / "resumed")
    train(gmm_cfg(*extra, "trainer.max_steps=6", "trainer.resume=true"), tmp_path / "resumed")
    gens = [load_run(tmp_path / d).roles["generator"] for d in ("straight", "resumed")]
    for a, b in zip(gens[0].state_dict().values(), gens[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    nets = [start.denoiser.net] + [d.net for d in start.later_experts]
    trained = [gens[0].denoiser.net] + [d.net for d in gens[0].later_experts]
    for before, after in zip(nets, trained):
        assert not torch.equal(before.inp.weight, after.inp.weight)
    pipe = PointsFewStepPipeline.from_pretrained(straight["export"])
    assert isinstance(pipe.net, StepExpertsModel) and list(pipe.net.config.timesteps) == [999, 759, 499, 259]
    samples, _ = sample_student(tmp_path / "straight", 50, seed=5)
    theirs = pipe(batch_size=50, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs, samples, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conditional", [False, True])
def test_unet_experts_export_samples_as_the_student(tmp_path, conditional):
    from diffusers import DDPMPipeline

    from stepdistill.export import export_run
    from stepdistill.pipelines import ClassConditionalFewStepPipeline
    nce = 11 if conditional else None
    dens = [NetworkDenoiser(tiny_unet(nce, seed=s), VPSchedule(), "v_prediction", null_class=10 if nce else None)
            for s in range(3)]
    gen = FewStepGenerator(dens[0], steps=3, later_experts=dens[1:])
    cfg = OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})

    class _Run:
        def student(self):
            return gen
    run = _Run()
    run.cfg = cfg
    out = export_run(run, tmp_path / "export")
    labels = torch.tensor([0, 3, 9]) if conditional else None
    g = torch.Generator().manual_seed(3)
    ours = (student_sample(gen, torch.randn(3, 1, 8, 8, generator=g), labels, None, g) / 2 + 0.5).clamp(0, 1)
    g = torch.Generator().manual_seed(3)
    if conditional:
        theirs = ClassConditionalFewStepPipeline.from_pretrained(out)(class_labels=labels, generator=g)
    else:   # the stock pipeline, with the experts as its unet
        pipe = DDPMPipeline.from_pretrained(out)
        theirs = torch.from_numpy(pipe(batch_size=3, num_inference_steps=3, generator=g, output_type="np").images)
        theirs = theirs.permute(0, 3, 1, 2)
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)


def test_step_experts_model_takes_one_timestep_per_call():
    from stepdistill.pipelines import StepExpertsModel
    _, dens = mlp_experts(steps=2)
    model = StepExpertsModel.from_experts([d.net for d in dens], [999, 499])
    x = torch.randn(3, 2)
    assert model.expert_index(torch.tensor(700)) == 1 and model.expert_index(900) == 0
    torch.testing.assert_close(model(x, torch.full((3,), 999.0)), dens[0].net(x, torch.full((3,), 999.0)))
    with pytest.raises(ValueError, match="one timestep per call"):
        model(x, torch.tensor([999.0, 499.0, 499.0]))


def test_flow_experts_export_routes_by_their_float_timesteps(tmp_path):
    """The export stored a flow student's trained times [1.0, 0.75, 0.5, 0.25] as int()s, [1, 0, 0, 0]: the
    exported model routed every later step to the wrong expert."""
    from stepdistill.export import export_run
    from stepdistill.pipelines import PointsFewStepPipeline
    from stepdistill.schedules import make_schedule
    sched = make_schedule("flow")
    torch.manual_seed(0)
    dens = [NetworkDenoiser(TimeMLP(2, 32, 2), sched, "flow_velocity") for _ in range(4)]
    gen = FewStepGenerator(dens[0], steps=4, later_experts=dens[1:])

    class _Run:
        cfg = OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})

        def student(self):
            return gen
    pipe = PointsFewStepPipeline.from_pretrained(export_run(_Run(), tmp_path / "export"))
    assert list(pipe.net.config.timesteps) == pytest.approx(gen.timesteps)
    for i, t in enumerate(gen.timesteps):
        assert pipe.net.expert_index(torch.tensor(t)) == i


def test_experts_leave_the_other_roles_initial_weights_and_untrained_experts_are_named(gmm_cfg, caplog):
    """The experts drew from the run's random stream while the generator was built, so the GAN head (made later)
    started elsewhere than in the same run without experts; and experts of steps outside generator.train_steps
    stayed their initial networks (on gmm, random MLPs) without a word."""
    from stepdistill.train.setup import build_run
    common = ("method=dmd2", "generator=four_step", "method.step_aware_critic=true")
    torch.manual_seed(0)
    plain = build_run(gmm_cfg(*common)).roles
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="stepdistill"):
        experts = build_run(gmm_cfg(*common, "generator.step_experts=true")).roles
    assert "never trained" not in caplog.text
    for role in ("fake_score", "gan_head", "critic_step_embedding"):
        for a, b in zip(plain[role].state_dict().values(), experts[role].state_dict().values()):
            assert torch.equal(a, b), role
    with caplog.at_level("WARNING", logger="stepdistill"):
        build_run(gmm_cfg(*common, "generator.step_experts=true", "generator.train_steps=[4]"))
    assert "the networks of steps 1, 2, 3 are never trained" in caplog.text


def test_dm_noise_bounds_are_checked_on_exit_steps_only(gmm_cfg):
    """Step 1's range [0.991, 0.980] is empty, but with generator.train_steps=[4] step 1 is never an exit step."""
    from stepdistill.train.setup import build_run
    args = ("method=dmd2", "generator=four_step", "generator.timesteps=[999,990,500,100]",
            "method.dm_above_next_input=true")
    with pytest.raises(ValueError, match="exit step 1's DM noise range"):
        build_run(gmm_cfg(*args))
    build_run(gmm_cfg(*args, "generator.train_steps=[4]"))
