"""The notebooks run top to bottom (at tiny settings)."""
import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_OVERRIDES", "trainer.max_steps=20 method.critic_warmup_steps=4 eval.every=0 "
                       "eval.num_samples=200 eval.batch_size=200 benchmark.network.width=32")
    nb = nbformat.read(NOTEBOOKS / "01_quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the training curves, the samples' plot
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "sliced_w2" in printed and "ratio" in printed and "2000 samples each" in printed   # student vs teacher


def _execute(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_method_comparison_notebook_executes(tmp_path, monkeypatch):
    # every default method: DMD has its own recipe (its step count) and the only teacher regression pairs
    monkeypatch.setenv("COMPARISON_METHODS", "dmd,dmd2,sid,scm")
    # the critic's warm-up under the methods with a critic: sCM has none, and refuses the setting
    monkeypatch.setenv("COMPARISON_OVERRIDES", "trainer.max_steps=12 eval.every=0 eval.num_samples=200 "
                       "eval.batch_size=200 benchmark.network.width=32 logger.every=4")
    monkeypatch.setenv("COMPARISON_RECIPES", json.dumps({m: ["method.critic_warmup_steps=4"] for m in ("dmd", "dmd2", "sid")}))
    outputs = _execute("02_method_comparison.ipynb", tmp_path)
    shown = [o.get("data", {}) for o in outputs]
    table = next(d["text/markdown"] for d in shown if "text/markdown" in d)
    assert all(f"| gmm | {m} |" in table for m in ("dmd", "dmd2", "sid", "scm"))   # a row per method
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert printed.count("at the final evaluation") == 4 and "HQ nan" not in printed   # each run's own HQ
    assert sum("image/png" in d for d in shown) == 3   # the comparison figure, its metric curves, the losses


def test_export_notebook_executes(tmp_path, monkeypatch):
    # 6 steps: two generator updates after digits DMD2's two critic updates each (at 2 the student never trained, so
    # the export of an untrained copy of the teacher was checked)
    monkeypatch.setenv("EXPORT_OVERRIDES", "trainer.max_steps=6 eval.every=0 eval.num_samples=100 eval.batch_size=100")
    outputs = _execute("03_export_to_diffusers.ipynb", tmp_path)
    assert any("image/png" in o.get("data", {}) for o in outputs)   # the 1- and 4-step grids
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "UNet2DModel LCMScheduler trained at timesteps [999]" in printed
    assert "largest pixel difference" in printed
