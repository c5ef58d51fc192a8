"""A command-line value of a setting the run never reads is refused (cli/unread_settings.py), and each rule is true:
the run trains the same weights whatever the refused setting's value, while under the rule's condition the value
changes them (so the comparison can tell)."""
import pytest
import torch

from stepdistill.cli import compose_config, known_settings
from stepdistill.cli.unread_settings import RULES, method_own_settings, unread_setting

from conftest import GMM_FAST, compose_cfg, run_app

EDM = ("benchmark.schedule.kind=edm", "~benchmark.schedule.num_train_timesteps", "~benchmark.schedule.beta_schedule")

# (a run that never reads `key`, the same run where it is read (None: no control here), key, two values)
CASES = [
    (["method=sid_fewstep"], ["method=sid"], "method.init_sigma", 1.0, 5.0),
    (["method=scm", "generator=four_step"], ["method=dmd2", "generator=four_step"], "generator.per_sample_step",
     "true", "false"),
    (["method=scm"], ["method=dmd2"], "optim.critic.lr", 1e-3, 1e-1),
    (["method=dmd2"], ["method=dmd2", "optim.lr_drop_step=1"], "optim.lr_drop_factor", 0.25, 0.5),
    (["method=dmd2", "method.gan.enabled=false"], ["method=dmd2"], "method.gan.generator_weight", 0.3, 3.0),
    (["method=dmd2", "method.gan.enabled=false"], ["method=dmd2"], "method.gan.t_min", 0.0, 0.5),
    (["method=fdistill", "method.ratio_bins=0"], ["method=fdistill"], "method.ratio_ema", 0.0, 0.9),
    (["method=rcm"], ["method=rcm", "method.weighting=adaptive"], "method.weighting_width", 64, 8),
    (["method=sid", "method.critic_noise=full", *EDM], ["method=sid", *EDM], "method.critic_lognormal",
     "[-1.2,1.2]", "[1.0,0.5]"),
    (["method=dmd", "method.regression.num_pairs=8"], None, "method.regression.lpips_resize", 224, 64),
    (["method=dmd2", "generator=four_step"], None, "method.step_embedding_gain", 30.0, 3.0),
    # reference is lognormal on an EDM teacher only
    (["method=sid"], ["method=sid", *EDM], "method.critic_lognormal", "[-1.2,1.2]", "[1.0,0.5]"),
    (["method=sid"], None, "method.critic_weighting", "reference", "native"),   # the gmm's fake score is EDM
    (["method=fdistill", "method.divergence=rkl"], ["method=fdistill"], "method.ratio_bins", 10, 0),
    (["method=fdistill", "method.divergence=rkl"], ["method=fdistill"], "method.log_ratio_clip", "[-3.0,3.0]",
     "[-0.1,0.1]"),
    (["method=dmd2", "generator=four_step", "generator.train_steps=[4]"], ["method=dmd2", "generator=four_step"],
     "method.dm_above_next_input", "false", "true"),
    (["method=dmd2"], None, "attention.backend", "diffusers", "sdpa"),
    (["method=scm"], ["method=dmd2"], "benchmark.fake_score_from_teacher", "false", "true"),
    (["method=dmd2", "benchmark.means=[[0,3],[3,0],[-3,0]]"], ["method=dmd2"], "benchmark.num_modes", 8, 4),
    (["method=dmd2", "benchmark.network.fourier_features=0"], ["method=dmd2"], "benchmark.network.fourier_scale",
     1.0, 3.0),
    # a benchmark's method: block (gmm's) gives every method these
    (["method=scm"], ["method=dmd2"], "method.critic_steps", 1, 3),
    (["method=scm"], ["method=dmd2"], "method.normalizer", "batch", "sample"),
    (["method=sid"], ["method=dmd2"], "method.gan.critic_weight", 0.1, 3.0),
]


def trained_weights(overrides, tmp_path):
    from stepdistill.train.setup import build_run, checkpoint_roles
    from stepdistill.train.trainer import Trainer
    # 0 warm-up steps: the generator updates from the second step on (scm has no critic, so it reads none)
    cfg = compose_cfg(*GMM_FAST, "++method.critic_warmup_steps=0", "trainer.max_steps=4", "trainer.export=false",
                      "benchmark.network.width=16", "trainer.batch_size=16", *overrides)
    run = build_run(cfg)
    Trainer(run, tmp_path).fit()
    return torch.cat([p.detach().flatten() for m in checkpoint_roles(run.roles).values() for p in m.state_dict().values()
                      if p.is_floating_point()])


@pytest.mark.parametrize("unread, read, key, a, b", CASES, ids=[c[2] + "|" + c[0][0] for c in CASES])
def test_a_setting_the_run_never_reads_is_refused_and_changes_nothing(unread, read, key, a, b, tmp_path):
    with pytest.raises(ValueError, match=rf"^{key}(:| would be ignored)"):
        compose_config(["benchmark=gmm", *unread, f"{key}={b}"])
    same = [trained_weights([*unread, f"{key}={v}"], tmp_path / f"u{i}") for i, v in enumerate((a, b))]
    assert torch.equal(*same), f"{key} changed a run that the check says never reads it"
    if read is not None:
        compose_config(["benchmark=gmm", *read, f"{key}={b}"])   # accepted where it is read
        moved = [trained_weights([*read, f"{key}={v}"], tmp_path / f"r{i}") for i, v in enumerate((a, b))]
        assert not torch.equal(*moved), f"{key} changed nothing where it is read: the comparison cannot tell"


def test_the_messages_say_what_is_read_where():
    msg = unread_setting(compose_config(["benchmark=gmm", "method=scm"]), ["method.critic_steps"])
    assert msg == ("method.critic_steps: method=scm never reads it (only method=dmd or dmd2 or fdistill or rcm or sid or "
                   "sid_fewstep or sida or sim read it; a benchmark's defaults put it in every method's config): "
                   "leave it out")
    msg = unread_setting(compose_config(["benchmark=gmm", "generator=four_step"]), ["method.init_sigma"])
    assert msg == ("method.init_sigma would be ignored: it is read only with a one-step student without explicit "
                   "timesteps (generator.steps=1, generator.timesteps=null)")
    # where the condition holds, or for the settings of a method's own file, nothing is said
    cfg = compose_config(["benchmark=gmm", "method=sida", "model.shared_base=true", *EDM])
    assert unread_setting(cfg, ["method.adv.generator_weight", "method.init_sigma", "model.lora_rank",
                                "generator.lora_alpha", "optim.critic.lr", "method.critic_lognormal"]) is None


def test_lora_settings_outside_shared_base_mode_are_refused():
    """A LoRA student of its own (generator.lora_rank) reads generator.lora_*; model.lora_* are the shared base's."""
    with pytest.raises(ValueError, match=r"^model.lora_rank would be ignored: it is read only with model.shared_base"):
        compose_config(["benchmark=digits", "model.lora_rank=4"])
    with pytest.raises(ValueError, match=r"^generator.lora_alpha would be ignored: .*generator.lora_rank=R"):
        compose_config(["benchmark=digits", "generator.lora_alpha=8"])
    compose_config(["benchmark=digits", "generator.lora_rank=4", "generator.lora_alpha=8"])
    compose_config(["benchmark=digits", "model.shared_base=true", "model.lora_rank=4", "generator.lora_alpha=8"])


def test_text_to_image_data_settings_need_their_data():
    with pytest.raises(ValueError, match=r"^benchmark.num_real would be ignored: .*benchmark.data.images=null"):
        compose_config(["benchmark=tiny_sd", "benchmark.data.images=/data", "benchmark.num_real=8"])
    with pytest.raises(ValueError, match=r"^benchmark.data.prompt_column would be ignored: .*benchmark.data.prompts"):
        compose_config(["benchmark=tiny_sd", "benchmark.data.prompt_column=caption"])
    compose_config(["benchmark=tiny_sd", "benchmark.num_real=8", "benchmark.data.prompts=/p.csv",
                    "benchmark.data.prompt_column=caption"])


def test_an_experiment_presets_own_method_key_is_not_refused():
    """`method.experiment_for` is in no method file: an experiment preset's, which build_run reads."""
    compose_config(["benchmark=gmm", "experiment=sid_from_scratch", "method=sid", "method.experiment_for=[sid]"])


def test_fsdp_settings_need_fsdp():
    with pytest.raises(ValueError, match=r"^trainer.fsdp.reshard_after_forward would be ignored: .*trainer=fsdp"):
        compose_config(["benchmark=gmm", "trainer=fsdp", "trainer.fsdp.enabled=false",
                        "trainer.fsdp.reshard_after_forward=false"])
    compose_config(["benchmark=gmm", "trainer=fsdp", "trainer.fsdp.reshard_after_forward=false"])


def test_every_rule_names_settings_that_exist():
    """A renamed setting must not leave a rule that checks nothing."""
    for rule in RULES:
        for key in rule.keys + rule.but:
            assert key in known_settings() or (key.endswith(".") and any(k.startswith(key) for k in known_settings())), key
    assert "method.critic_steps" in method_own_settings("rcm")   # its own file's
    assert "method.p_std" in method_own_settings("rcm")          # inherited from scm.yaml
    assert "method.critic_steps" not in method_own_settings("scm")
    assert "method.gan" in method_own_settings("fdistill") and "method.alpha" in method_own_settings("sid_fewstep")


def test_the_command_line_and_the_bench_refuse_it(tmp_path):
    proc = run_app("stepdistill.cli.train", "benchmark=gmm", "method=scm", "method.critic_steps=5",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stepdistill-train: error: method.critic_steps: method=scm never reads it" in proc.stderr
    from stepdistill.cli.bench import check_bench_overrides
    with pytest.raises(ValueError, match=r"^benchmark=gmm method=scm: method.critic_steps: method=scm never reads it"):
        check_bench_overrides(["gmm"], ["dmd2", "scm"], ["method.critic_steps=2"])
    check_bench_overrides(["gmm"], ["dmd2", "rcm"], ["method.critic_steps=2"])
