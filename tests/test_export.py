"""Export -> load -> sample gives the same samples as stepdistill's own sampler for the same noise."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_unet

from stepdistill.denoiser import NetworkDenoiser
from stepdistill.generator import FewStepGenerator
from stepdistill.schedules import VPSchedule
from stepdistill.train.evaluation import student_sample


class _Run:  # the two attributes export_run reads
    def __init__(self, student, cfg):
        self._student, self.cfg = student, cfg

    def student(self):
        return self._student


@pytest.mark.parametrize("steps", [1, 4])
def test_unconditional_unet_exports_to_stock_ddpm_pipeline(tmp_path, steps):
    from omegaconf import OmegaConf

    from stepdistill.export import export_run
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(), VPSchedule(), "v_prediction"), steps=steps)
    cfg = OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})
    out = export_run(_Run(gen, cfg), tmp_path / "export")
    # the pipeline draws the initial noise and the between-step noise from one generator, in that order
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    ours = student_sample(gen, noise, None, None, g)
    # a process that never imports stepdistill loads the folder with stock diffusers
    code = (
        "import sys, torch, numpy as np\n"
        "from diffusers import DDPMPipeline\n"
        f"pipe = DDPMPipeline.from_pretrained(r'{out}')\n"
        "assert type(pipe.scheduler).__name__ == 'LCMScheduler'\n"
        f"img = pipe(batch_size=3, num_inference_steps={steps}, generator=torch.Generator().manual_seed(7), "
        "output_type='np').images\n"
        f"np.save(r'{tmp_path / 'img.npy'}', img)\n"
        "assert 'stepdistill' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    img = np.load(tmp_path / "img.npy")  # N, H, W, C in [0, 1]
    expected = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(img, expected, atol=2e-5)


def test_few_step_samples_do_not_depend_on_the_chunk_size():
    """student_sample draws the between-step noise for all N first, as one batch of N does: chunks of 7 give
    the samples of one chunk, and of the generator's own one-batch sampling from the same RNG state (so
    training's eval.batch_size, stepdistill-eval and stepdistill-sample agree)."""
    from stepdistill.networks.mlp import TimeMLP
    torch.manual_seed(0)
    gen = FewStepGenerator(NetworkDenoiser(TimeMLP(2, 32, 2), VPSchedule(), "edm", sigma_data=2.0), steps=4)
    noise = torch.randn(20, 2)
    chunked = student_sample(gen, noise, None, None, torch.Generator().manual_seed(5), batch_size=7)
    whole = student_sample(gen, noise, None, None, torch.Generator().manual_seed(5), batch_size=1000)
    one_batch = gen.sample(noise, None, None, torch.Generator().manual_seed(5))
    # (chunks of another size run other matrix-product kernels: last-bit differences, not other noise)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, one_batch, rtol=0, atol=0)
    steps = student_sample(gen, noise, None, None, torch.Generator().manual_seed(5), batch_size=7, every_step=True)
    assert len(steps) == 4 and torch.equal(steps[-1], chunked)


def test_class_conditional_export_matches_student(tmp_path):
    from omegaconf import OmegaConf

    from stepdistill.export import export_run
    from stepdistill.pipelines import ClassConditionalFewStepPipeline
    gen = FewStepGenerator(NetworkDenoiser(tiny_unet(11), VPSchedule(), "v_prediction", null_class=10), steps=2)
    cfg = OmegaConf.create({"benchmark": {"name": "test"}, "method": {"name": "dmd2"}})
    out = export_run(_Run(gen, cfg), tmp_path / "export")
    pipe = ClassConditionalFewStepPipeline.from_pretrained(out)
    assert list(pipe.config.trained_timesteps) == [999, 499]
    labels = torch.tensor([0, 3, 9])
    g = torch.Generator().manual_seed(3)
    ours = student_sample(gen, torch.randn(3, 1, 8, 8, generator=g), labels, None, g)
    theirs = pipe(class_labels=labels, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(theirs, ((ours / 2 + 0.5).clamp(0, 1)), atol=2e-5, rtol=0)
    # K steps at LCM's schedule also work
    assert pipe(class_labels=labels, num_inference_steps=4).shape == (3, 1, 8, 8)


def test_gmm_run_export_matches_sample_cli(gmm_cfg, tmp_path):
    from stepdistill.cli.sample import sample_student
    from stepdistill.cli.train import train
    from stepdistill.pipelines import PointsFewStepPipeline
    result = train(gmm_cfg("trainer.max_steps=10", "generator=four_step"), tmp_path)
    pipe = PointsFewStepPipeline.from_pretrained(result["export"])
    samples, labels = sample_student(tmp_path, 50, seed=5)
    assert labels is None
    theirs = pipe(batch_size=50, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs, samples, atol=1e-5, rtol=1e-5)
