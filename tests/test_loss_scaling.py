"""fp16 loss scaling (`trainer.mixed_precision=fp16` on a GPU): accelerate's backward multiplies the loss by its
GradScaler's scale, and the trainer must unscale before clipping, back off on an overflow and checkpoint the
scale. accelerate makes a scaler only on a GPU, so these tests give the CPU accelerator one (torch's CPU
GradScaler works the same way)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli.train import train
from stepdistill.train import trainer as trainer_mod

ROLES = ("generator", "fake_score", "gan_head")


class _Scaler(torch.amp.GradScaler):
    """torch's CPU GradScaler; its first `overflows` scaled losses are made infinite, as an fp16 overflow would."""

    def __init__(self, overflows: int, **kw):
        super().__init__("cpu", **kw)
        self.overflows = overflows

    def scale(self, outputs):
        out = super().scale(outputs)
        if self.overflows > 0:
            self.overflows -= 1
            return out * float("inf")
        return out


@pytest.fixture
def scaled(monkeypatch):
    """make(init_scale, growth_interval, overflows): every Trainer built from then on gets a `_Scaler`."""
    real = trainer_mod._accelerator
    scalers = []

    def make(init_scale: float, growth_interval: int = 1000, overflows: int = 0):
        def accelerator(mixed_precision):
            acc = real(mixed_precision)
            acc.scaler = _Scaler(overflows, init_scale=init_scale, growth_interval=growth_interval)
            scalers.append(acc.scaler)
            return acc
        monkeypatch.setattr(trainer_mod, "_accelerator", accelerator)
        return scalers
    return make


def _weights(run_dir: Path, step: int) -> dict:
    return {r: load_file(str(run_dir / f"checkpoints/step_{step:07d}/{r}.safetensors")) for r in ROLES}


def _assert_same(a: dict, b: dict):
    for role in a:
        for k in a[role]:
            torch.testing.assert_close(a[role][k], b[role][k], rtol=0, atol=0, msg=f"{role}.{k}")


def test_scaled_gradients_are_unscaled_before_clipping(gmm_cfg, scaled, tmp_path):
    """A power-of-two loss scale is exact in float arithmetic: once unscaled, the run is the unscaled run to the
    bit. Unscaled after clipping (or never), the 4096-times larger norm would be clipped at every step."""
    cfg = ["method=dmd2", "trainer.max_steps=12", "trainer.checkpoint_every=12"]
    train(gmm_cfg(*cfg), tmp_path / "plain")
    scalers = scaled(2.0 ** 12)
    train(gmm_cfg(*cfg), tmp_path / "scaled")
    assert scalers and scalers[-1].get_scale() == 2.0 ** 12   # no overflow, no growth yet
    _assert_same(_weights(tmp_path / "plain", 12), _weights(tmp_path / "scaled", 12))


def test_overflow_backs_the_scale_off_without_stopping_the_run(gmm_cfg, scaled, tmp_path):
    """Three overflows in a row, more than trainer.max_nonfinite_steps allows for non-finite losses: each update is
    skipped and halves the scale, and the run goes on."""
    scalers = scaled(2.0 ** 12, overflows=3)
    train(gmm_cfg("method=dmd2", "trainer.max_steps=20", "trainer.checkpoint_every=20",
                  "trainer.max_nonfinite_steps=2", "logger.every=1"), tmp_path)
    assert scalers[-1].get_scale() == 2.0 ** 9
    for role in _weights(tmp_path, 20).values():
        assert all(torch.isfinite(v).all() for v in role.values())
    st = torch.load(tmp_path / "checkpoints/step_0000020/trainer_state.pt", weights_only=True)
    assert st["grad_scaler"]["scale"] == 2.0 ** 9 and not any(st["nonfinite_in_a_row"].values())
    import json
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}
    # the three skipped updates (trainer steps 0-2, logged as 1-3) have no loss to log; the fourth has
    assert not any("critic/loss" in rows[s] for s in (1, 2, 3)) and "critic/loss" in rows[4]


def test_resume_restores_the_loss_scale(gmm_cfg, scaled, tmp_path):
    """The scale grows every 3 good steps; a resumed run continues from the checkpoint's scale and growth count."""
    common = ["method=dmd2", "trainer.checkpoint_every=10", "trainer.keep_checkpoints=5"]
    scaled(2.0 ** 12, growth_interval=3)
    train(gmm_cfg(*common, "trainer.max_steps=20"), tmp_path / "straight")
    train(gmm_cfg(*common, "trainer.max_steps=10"), tmp_path / "resumed")
    train(gmm_cfg(*common, "trainer.max_steps=20", "trainer.resume=true"), tmp_path / "resumed")
    a, b = (torch.load(d / "checkpoints/step_0000020/trainer_state.pt", weights_only=True)["grad_scaler"]
            for d in (tmp_path / "straight", tmp_path / "resumed"))
    assert a == b and a["scale"] == 2.0 ** 18
    _assert_same(_weights(tmp_path / "straight", 20), _weights(tmp_path / "resumed", 20))
