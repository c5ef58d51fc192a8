import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("WANDB_MODE", "disabled")
# A subprocess that aborts (SIGABRT, SIGSEGV: a two-process run's gloo threads once did, rarely) prints every
# thread's Python stack to its stderr, which the failing test's message shows.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")
# The Triton kernels run on CPU tensors in Triton's interpreter; it must be on before triton is imported.
try:
    import torch as _torch
    _cuda = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from stepdistill.cli import CONF_DIR  # noqa: E402
from stepdistill.networks.gmm import GMMDenoiser  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest(tmp_path_factory):
    """Temporary files of the suite's subprocesses (torchrun's, the notebook kernels', the CLIs') go under pytest's
    base temp, which pytest prunes, rather than into /tmp, where every run used to leave ~30 directories behind."""
    import tempfile
    tmp = str(tmp_path_factory.mktemp("tmpdir"))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = tmp, tmp
    yield
    tempfile.tempdir = saved[1]
    if saved[0] is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved[0]


def compose_cfg(*overrides, config_name="train"):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base=None):
        return compose(config_name, overrides=list(overrides))


def run_app(module, *args, check=True):
    """An app (`module`: stepdistill.cli.sample, .evaluate, .export, .train, .teacher) run in this process: the
    console script's Hydra main with these arguments, without a new interpreter's ~4 s of importing torch and
    diffusers. Returns what subprocess.run(capture_output=True, text=True) would: returncode, stdout, stderr. The
    console scripts themselves run as subprocesses in test_cli.py (test_usage_errors_answer_before_torch_loads, the
    multirun, the training runs)."""
    import contextlib
    import importlib
    import io
    import logging
    import subprocess
    import sys

    from hydra.core.hydra_config import HydraConfig
    app = importlib.import_module(module)
    out, err, threads, argv = io.StringIO(), io.StringIO(), torch.get_num_threads(), sys.argv
    hydra_config = HydraConfig.instance()
    # the apps' Hydra logging configs add handlers (stepdistill-train's) or disable every existing logger (the
    # others'): the loggers are put back as they were, or later tests' caplog would see nothing
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = [(lg, lg.handlers[:], lg.level, lg.disabled, lg.propagate) for lg in loggers]
    outside_hydra = hydra_config.cfg   # None: code called after this one must not see this run's Hydra config
    sys.argv, code = [module, *args], 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            app.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)   # the apps set their own thread count
        for lg, handlers, level, disabled, propagate in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:], lg.level, lg.disabled, lg.propagate = handlers, level, disabled, propagate
        for lg in logging.root.manager.loggerDict.values():   # loggers made during the app: enabled, as usual
            if isinstance(lg, logging.Logger) and lg not in loggers:
                lg.disabled = False
        hydra_config.cfg = outside_hydra
    proc = subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# Small, fast gmm settings shared by end-to-end tests.
GMM_FAST = ["benchmark=gmm", "benchmark.network.width=64", "benchmark.network.depth=2", "trainer.batch_size=64",
            "method.critic_warmup_steps=4", "eval.every=0", "eval.final=false", "trainer.progress=false",
            "trainer.num_threads=2", "logger.every=5", "logger.curves=false"]   # drawn in test_curves.py


@pytest.fixture
def gmm_cfg():
    def make(*overrides):
        return compose_cfg(*GMM_FAST, *overrides)
    return make


DIGITS_FAST = ["benchmark=digits", "trainer.batch_size=8", "eval.every=0", "eval.final=false",
               "trainer.progress=false", "logger.curves=false"]


def digits_cfg(*overrides):
    return compose_cfg(*DIGITS_FAST, *overrides)


def tiny_unet(num_class_embeds=None, seed=0):
    """A tiny diffusers UNet2DModel on 1x8x8 images (class-conditional with `num_class_embeds`)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, num_class_embeds=num_class_embeds).eval()


def assert_phase_reaches_only(run, phase: str, trained: tuple[str, ...], batch_size: int = 16):
    """One `phase` loss + backward: every parameter of the `trained` roles gets a gradient, no other role's does."""
    from stepdistill.train.batches import BatchSource
    for p in run.roles.parameters():
        p.grad = None
    run.roles.train_only(run.method.phases[phase])
    batch = BatchSource(run.benchmark, run.method.batch_keys, batch_size, "cpu")()
    out = run.method.loss(phase, batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for n in trained for p in run.roles[n].parameters())
    assert all(p.grad is None for n in run.roles if n not in trained for p in run.roles[n].parameters())
    return out


def train_briefly(cfgs, tmp_path):
    """Each config trains to its trainer.max_steps; the generator ends finite."""
    from stepdistill.train.setup import build_run
    from stepdistill.train.trainer import Trainer
    for i, cfg in enumerate(cfgs):
        run = build_run(cfg)
        Trainer(run, tmp_path / f"{i}_{cfg.benchmark.name}").fit()
        assert all(torch.isfinite(p).all() for p in run.roles["generator"].parameters())


class ConditionalMixture(GMMDenoiser):
    """Exact class-conditional teacher: label k is mixture component k alone, label K (null) the whole mixture."""
    conditional = True

    def uncond(self, cond):
        return torch.full_like(cond, self.mixture.means.shape[0])

    def _x0_single(self, x_t, t, cond, alpha_sigma=None):
        a, s = self.schedule.alpha(t).double()[:, None], self.schedule.sigma(t).double()[:, None]
        out = self.mixture.posterior_mean(x_t, a[:, 0], s[:, 0]).double()
        k = cond < self.mixture.means.shape[0]
        mu, var = self.mixture.means[cond[k]], self.mixture.stds[cond[k]][:, None] ** 2
        out[k] = mu + a[k] * var / (a[k] ** 2 * var + s[k] ** 2) * (x_t[k].double() - a[k] * mu)
        return out


def guided(den, x_t, t, cond, w):
    """Classifier-free guidance on a ConditionalMixture's exact x0, written out: uncond + w (cond - uncond)."""
    null = torch.full_like(cond, den.mixture.means.shape[0])
    c, u = den._x0_single(x_t, t, cond), den._x0_single(x_t, t, null)
    return u + w * (c - u)


def generator_output_grad(run, batch, seed):
    """(loss, the gradient of the generator phase's loss at the generator's output for batch["noise"])."""
    gen, outs = run.roles["generator"], []
    forward = gen.forward

    def spy(noise, *args, **kwargs):
        out = forward(noise, *args, **kwargs)
        if noise is batch["noise"]:
            x = out[0] if isinstance(out, tuple) else out   # (x, exit steps) with return_steps
            x.retain_grad()
            outs.append(x)
        return out
    gen.forward = spy
    torch.manual_seed(seed)
    out = run.method.loss("generator", batch, 0)
    out.loss.backward()
    del gen.forward
    return out, outs[0].grad
