"""The digits benchmark: data, the shipped teacher and feature network, resolution and path errors."""
import re

import pytest
import torch

from stepdistill.data.digits import load_digits_tensor, to_unit
from stepdistill.networks.digits_features import load_feature_net
from stepdistill.networks.unet import build_digits_unet, check_resolution
from stepdistill.samplers import ddim_sample
from stepdistill.teachers import load_unet_teacher, teacher_info
from stepdistill.benchmarks.digits import SHIPPED_TEACHER


def test_data_shapes_and_range():
    x, y = load_digits_tensor()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))


def test_resolution_errors_say_what_to_change():
    net = build_digits_unet()
    check_resolution(net, 8, 8)
    with pytest.raises(ValueError, match="benchmark.resolution=8"):
        check_resolution(net, 7, 7)
    with pytest.raises(ValueError, match="benchmark.resolution=8"):
        check_resolution(net, 16, 16)


def test_missing_or_wrong_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmark.teacher.path"):
        load_unet_teacher(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet_teacher(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not match the teacher's scheduler"):
        load_unet_teacher(SHIPPED_TEACHER, prediction_type="epsilon")


def test_a_teacher_of_other_channels_or_no_classes_is_one_line(tmp_path):
    """A 3-channel teacher ended in a 50-line shape error at the first probe, an unconditional one in diffusers'
    "class_embedding needs to be initialized"."""
    import re

    from conftest import tiny_unet

    from stepdistill.benchmarks.registry import build_benchmark
    from stepdistill.cli import CONF_DIR
    from hydra import compose, initialize_config_dir
    for name, unet, says in (("uncond", tiny_unet(None), "1 channel(s) and no class embeddings"),):
        root = _teacher_copy(tmp_path, name, unet=unet)
        (root / "stepdistill_teacher.json").unlink()   # its null class would be refused first, in one line too
        with initialize_config_dir(CONF_DIR, version_base=None):
            cfg = compose("train", overrides=["benchmark=digits", f"benchmark.teacher.path={root}"])
        with pytest.raises(ValueError, match=rf"the digits teacher must be a class-conditional UNet2DModel of 1 input "
                                             rf"channel .* this one takes {re.escape(says)}"):
            build_benchmark(cfg.benchmark)


def test_shared_base_on_the_digits_teacher_says_why_it_is_refused():
    """"needs a diffusers network teacher, not UNet2DModel" named a diffusers network: what it lacks is adapters."""
    from hydra import compose, initialize_config_dir

    from stepdistill.cli import CONF_DIR
    from stepdistill.train.setup import build_run
    with initialize_config_dir(CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["benchmark=digits", "model.shared_base=true", "model.lora_rank=4"])
    with pytest.raises(ValueError, match=r"model.shared_base needs a network with diffusers' adapter support .* "
                                         r"not UNet2DModel"):
        build_run(cfg)


def _teacher_copy(tmp_path, name, scheduler=None, unet=None):
    """The shipped teacher's folder with its scheduler config edited, or another UNet in it."""
    import json
    import shutil
    root = tmp_path / name
    shutil.copytree(SHIPPED_TEACHER, root)
    if unet is not None:
        shutil.rmtree(root / "unet")
        unet.save_pretrained(root / "unet")
    if scheduler is not None:
        f = root / "scheduler" / "scheduler_config.json"
        cfg = {k: v for k, v in json.loads(f.read_text()).items() if k not in scheduler or scheduler[k] is not ...}
        cfg.update({k: v for k, v in scheduler.items() if v is not ...})
        f.write_text(json.dumps(cfg))
    return root


def test_teacher_scheduler_and_output_the_loader_cannot_honour_are_clear_errors(tmp_path):
    """A flow-matching scheduler, with no betas at all, became a linear VP schedule; an epsilon teacher on a zero
    terminal SNR schedule (alpha(999) = 0) cannot give x0 at the top timestep. (Trained betas and the rescale
    itself load: tests/test_vp_betas.py.)"""
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "beta_schedule": ..., "beta_start": ...,
            "beta_end": ...}
    for name, edit, message in [
            ("zsnr_eps", {"rescale_betas_zero_snr": True, "prediction_type": "epsilon"},
             "sets rescale_betas_zero_snr .* with prediction_type 'epsilon'"),
            ("flow", flow, "FlowMatchEulerDiscreteScheduler has no beta_schedule")]:
        with pytest.raises(ValueError, match=message):
            load_unet_teacher(_teacher_copy(tmp_path, name, scheduler=edit))
    learned_variance = build_digits_unet(out_channels=2)   # epsilon and variance channels, as in improved DDPM
    with pytest.raises(ValueError, match="maps 1 input channels to 2"):
        load_unet_teacher(_teacher_copy(tmp_path, "variance", unet=learned_variance))
    assert load_unet_teacher(_teacher_copy(tmp_path, "as_shipped", scheduler={})).prediction_type == "v_prediction"


def test_null_class_from_the_record_the_setting_or_the_convention_with_a_warning(tmp_path, caplog):
    """A class-conditional teacher without stepdistill_teacher.json (a third party's) gets its last class as CFG's
    'no label' with a warning, since one trained without label dropout has no such class; the setting overrides
    it and is checked against the UNet's classes."""
    assert load_unet_teacher(SHIPPED_TEACHER).null_class == 10 and not caplog.records
    bare = _teacher_copy(tmp_path, "bare")
    (bare / "stepdistill_teacher.json").unlink()
    with caplog.at_level("WARNING", logger="stepdistill"):
        assert load_unet_teacher(bare).null_class == 10
    assert "set benchmark.teacher.null_class" in caplog.text
    assert load_unet_teacher(bare, null_class=3).null_class == 3
    with pytest.raises(ValueError, match=r"null_class=11: the teacher UNet has 11 class embeddings, use 0\.\.10"):
        load_unet_teacher(bare, null_class=11)
    unconditional = _teacher_copy(tmp_path, "unconditional", unet=build_digits_unet(num_class_embeds=None))
    with pytest.raises(ValueError, match="has no class embeddings, leave it null"):
        load_unet_teacher(unconditional, null_class=0)


def test_benchmark_settings_unset_zero_and_bad():
    """null takes the teacher's recorded default; 0 guidance is the unconditional teacher, not the default (it was,
    through `or`); 0 steps or pixels and a negative scale are one-line errors, as is a feature network path that
    is not there (it failed at the first evaluation, after training)."""
    from conftest import digits_cfg

    from stepdistill.benchmarks.registry import build_benchmark as make_benchmark
    info = teacher_info(SHIPPED_TEACHER)
    default = make_benchmark(digits_cfg().benchmark)
    assert default.guidance == info["default_guidance"] != 0
    assert default.teacher_steps == info["default_sampler_steps"] and default.data_shape == (1, 8, 8)
    unconditional = make_benchmark(digits_cfg("benchmark.guidance=0").benchmark)
    assert unconditional.guidance == 0.0 and unconditional.config_record()["teacher_resolved"]["guidance"] == 0.0
    for override, message in [("benchmark.resolution=0", "benchmark.resolution=0: need an integer >= 1"),
                              ("benchmark.teacher_steps=0", "benchmark.teacher_steps=0: need an integer >= 1"),
                              ("benchmark.guidance=-1", "benchmark.guidance=-1: need a number >= 0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            make_benchmark(digits_cfg(override).benchmark)
    with pytest.raises(FileNotFoundError, match="digits feature network /nope not found"):
        make_benchmark(digits_cfg("benchmark.feature_net=/nope").benchmark)


def test_digits_refuse_a_digit_as_null_class_and_other_resolutions_and_read_the_record_beside_unet(tmp_path):
    """A null class that is a digit's label (an explicit one, or a 10-class teacher's last) made CFG do nothing
    for that digit; a 16x16 teacher with benchmark.resolution=16 trained against 8x8 real images and failed at
    its first evaluation; a path to the folder's unet/ loaded without its record (guidance, steps, null class)."""
    from conftest import digits_cfg

    from stepdistill.benchmarks.registry import build_benchmark as make_benchmark
    with pytest.raises(ValueError, match="benchmark.teacher.null_class=3 is the label of the digit 3"):
        make_benchmark(digits_cfg("benchmark.teacher.null_class=3").benchmark)
    # one class embedding per digit and no record: the loader took the digit 9 as 'no label'; it has none
    import json
    ten = _teacher_copy(tmp_path, "ten", unet=build_digits_unet(num_class_embeds=10))
    record = json.loads((ten / "stepdistill_teacher.json").read_text())
    (ten / "stepdistill_teacher.json").write_text(json.dumps({k: v for k, v in record.items()
                                                             if k not in ("null_class", "default_guidance")}))
    assert make_benchmark(digits_cfg(f"benchmark.teacher.path={ten}").benchmark).teacher.null_class is None
    with pytest.raises(ValueError, match="benchmark.guidance=2.0: the teacher at .* has no null class"):
        make_benchmark(digits_cfg(f"benchmark.teacher.path={ten}", "benchmark.guidance=2").benchmark)
    big = _teacher_copy(tmp_path, "big", unet=build_digits_unet(sample_size=16))
    with pytest.raises(ValueError, match="the digits are 8x8 images"):
        make_benchmark(digits_cfg(f"benchmark.teacher.path={big}", "benchmark.resolution=16").benchmark)
    with pytest.raises(ValueError, match="the digits are 8x8 images"):
        make_benchmark(digits_cfg(f"benchmark.teacher.path={big}").benchmark)
    info = teacher_info(SHIPPED_TEACHER)
    assert teacher_info(SHIPPED_TEACHER / "unet") == info
    inner = make_benchmark(digits_cfg(f"benchmark.teacher.path={SHIPPED_TEACHER / 'unet'}").benchmark)
    assert (inner.guidance, inner.teacher_steps) == (info["default_guidance"], info["default_sampler_steps"])


def test_shipped_teacher_samples_its_labels():
    torch.manual_seed(0)
    teacher = load_unet_teacher(SHIPPED_TEACHER)
    info = teacher_info(SHIPPED_TEACHER)
    assert teacher.prediction_type == "v_prediction" and teacher.null_class == 10
    labels = torch.arange(64) % 10
    x = ddim_sample(teacher, torch.randn(64, 1, 8, 8), 20, labels, float(info["default_guidance"]))
    assert x.shape == (64, 1, 8, 8)
    feats = load_feature_net()
    assert feats.num_features == 64
    acc = (feats.classify(to_unit(x)).argmax(-1) == labels).float().mean().item()
    assert acc >= 0.7
