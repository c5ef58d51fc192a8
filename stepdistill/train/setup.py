"""From a resolved config to the objects of a run: benchmark, roles, method. Shared by every CLI app."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ..benchmarks.base import shared_base
from ..benchmarks.registry import build_benchmark
from ..checks import non_negative, run_folder
from ..methods import method_class
from ..roles import Roles
from .checkpoint import (checkpoint_before, checkpoint_step, damaged_file, latest_checkpoint, list_checkpoints,
                         load_checkpoint)
from .ema import make_ema


@dataclass
class Run:
    cfg: DictConfig
    benchmark: object
    roles: Roles
    method: object
    checkpoint: Path | None = None   # the checkpoint a finished run was loaded from (load_run)

    def student(self):
        """The generator used for sampling, evaluation and export: the EMA copy when there is one."""
        return self.roles["generator_ema"] if "generator_ema" in self.roles else self.roles["generator"]


def resolve_method_cfg(cfg: DictConfig, benchmark) -> None:
    with open_dict(cfg):
        if cfg.method.get("guidance") is None:
            cfg.method.guidance = float(getattr(benchmark, "guidance", 1.0))
        non_negative("method.guidance", cfg.method.guidance)   # 0: the unconditional teacher; 1: no guidance
        if cfg.method.get("guidance", 1.0) != 1.0 and not benchmark.conditional:
            raise ValueError(f"method.guidance={cfg.method.guidance} but the {benchmark.name} teacher is "
                             "unconditional: set method.guidance=1.0")
        for k, v in benchmark.config_record().items():
            cfg.benchmark[k] = v


def apply_attention_backend(roles: Roles, cfg: DictConfig) -> None:
    """`attention.backend`: route every diffusers attention of every role through stepdistill.kernels."""
    backend = str(cfg.get("attention", {}).get("backend", "diffusers"))
    from ..kernels import set_attention_backend
    routed = sum(set_attention_backend(module, backend) for module in roles.values())
    if routed:   # here, not at the first forward (after config.yaml is written), and in one line
        check_attention_backend(backend)
        if backend == "triton":   # a pixel UNet's one-head attention is as wide as its channels (512 in DDPM's)
            from ..kernels.processor import routed_head_dims
            from ..kernels.triton_attention_dims import head_dim_supported
            wide = sorted(d for m in roles.values() for d in routed_head_dims(m) if not head_dim_supported(d))
            if wide:
                raise ValueError(f"attention.backend=triton takes head dims up to 256; these networks have "
                                 f"{wide[-1]}: use attention.backend=auto or sdpa")


def check_attention_backend(backend: str) -> None:
    """A backend this machine cannot run is a ValueError naming what to change."""
    import torch

    from ..kernels.dispatch import triton_available, triton_interpreted, xformers_available
    if backend == "xformers" and not xformers_available():
        raise ValueError("attention.backend=xformers needs xformers installed (pip install 'stepdistill[xformers]'): "
                         "install it or use attention.backend=auto")
    if backend == "triton" and not triton_available():
        raise ValueError("attention.backend=triton needs the triton package (pip install triton): install it or use "
                         "attention.backend=auto")
    if backend == "triton" and not torch.cuda.is_available() and not triton_interpreted():
        raise ValueError("attention.backend=triton needs a CUDA GPU (or TRITON_INTERPRET=1 for CPU tests, slow): use "
                         "attention.backend=auto or sdpa on this machine")


def enable_gradient_checkpointing(roles: Roles) -> None:
    """`model.gradient_checkpointing`: diffusers' activation recomputation on every trainable network."""
    from ..networks.lora import diffusers_unet
    from ..networks.shared_base import AdapterView
    found = False
    critics = [roles["fake_score"]] if "fake_score" in roles else []   # sCM has none
    for den in (*critics, *roles["generator"].step_denoisers):
        net = diffusers_unet(den)
        if isinstance(net, AdapterView):
            # the recomputation in backward runs the shared UNet with whichever adapter a later call switched to
            # (the teacher's, the fake score's), not the one its forward used
            raise ValueError("model.gradient_checkpointing with model.shared_base=true: the backward's recomputation "
                             "would run another role's adapter; set one of them to false")
        if getattr(net, "_supports_gradient_checkpointing", False):
            net.enable_gradient_checkpointing()
            found = True
    if not found:
        raise ValueError("model.gradient_checkpointing needs diffusers UNets that support it (digits, text-to-image); "
                         "set it to false")


def build_run(cfg: DictConfig, with_method: bool = True) -> Run:
    torch.manual_seed(int(cfg.seed))
    benchmark = build_benchmark(cfg.benchmark)
    resolve_method_cfg(cfg, benchmark)
    meant_for = cfg.method.get("experiment_for")   # an experiment preset written for some methods only
    if meant_for and cfg.method.name not in meant_for:
        raise ValueError(f"this experiment preset is for method={' or '.join(meant_for)}, not {cfg.method.name}: "
                         f"add method={meant_for[0]}")
    cls = method_class(cfg.method.name)
    cls.check_benchmark(cfg.method, benchmark)
    model_cfg = cfg.get("model")
    roles = benchmark.build_roles(cfg.method, cfg.generator, model_cfg, fake_score=cls.uses_fake_score)
    if float(cfg.trainer.get("ema_decay", 0) or 0) > 0:
        if shared_base(model_cfg):
            from ..networks.shared_base import shared_ema
            roles["generator_ema"] = shared_ema(roles["generator"])
        else:
            roles["generator_ema"] = make_ema(roles["generator"])
    apply_attention_backend(roles, cfg)
    if model_cfg is not None and model_cfg.get("gradient_checkpointing"):
        enable_gradient_checkpointing(roles)
    method = cls(roles, cfg.method) if with_method else None
    return Run(cfg, benchmark, roles, method)


def checkpoint_roles(roles: Roles) -> dict:
    """Every role with trainable state: all but the frozen teacher."""
    return {n: m for n, m in roles.items() if n not in Roles.FROZEN}


def load_run(run_dir: str | Path, overrides: list[str] | None = None, checkpoint: str | None = None,
             device: str | None = None) -> Run:
    """Rebuild a finished (or running) run from its config.yaml and its latest checkpoint, on `device` (None: the
    CPU)."""
    run_dir = run_folder(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    ckpt = find_checkpoint(run_dir, checkpoint)
    run = build_run(cfg, with_method=False)
    try:
        load_checkpoint(ckpt, checkpoint_roles(run.roles))
    except Exception as e:   # a file damaged after it was written: one line naming it and what to load instead
        damage = damaged_file(ckpt)
        if damage is None:
            raise
        earlier = checkpoint_before(Path(run_dir) / "checkpoints", ckpt)
        fallback = (f"pass checkpoint={checkpoint_step(earlier)} for the one before it" if earlier
                    else "no earlier checkpoint is left")
        raise ValueError(f"checkpoint {ckpt} is damaged ({damage}): {fallback}") from e
    for m in run.roles.values():
        m.eval()
    if device is not None:   # the teacher among the roles: its samples (teacher references) are made there too
        run.roles.to(device)
    run.checkpoint = ckpt
    return run


def find_checkpoint(run_dir: Path, checkpoint: str | int | Path | None = None) -> Path:
    """`checkpoint`: None = the run's latest, a step number (e.g. 3000) = that step's, else a checkpoint folder
    (a path, or one relative to run_dir: checkpoints/step_0003000 or step_0003000)."""
    root = Path(run_dir) / "checkpoints"
    if checkpoint is None:
        ckpt = latest_checkpoint(root)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {root}: train first (or pass checkpoint=PATH)")
        return ckpt
    if str(checkpoint).isdigit():
        found = {checkpoint_step(c): c for c in list_checkpoints(root)}
        if int(checkpoint) not in found:
            raise FileNotFoundError(f"checkpoint={checkpoint}: {root} has no checkpoint of that step; it has steps "
                                    f"{sorted(found) or 'none'}")
        return found[int(checkpoint)]
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_absolute() and not (ckpt / "trainer_state.pt").is_file():   # a folder of run_dir, as named there
        ckpt = next((c for c in (Path(run_dir) / ckpt, root / ckpt) if (c / "trainer_state.pt").is_file()), ckpt)
    if not (ckpt / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint} is not a checkpoint folder (no trainer_state.pt): give a "
                                "step number or a checkpoints/step_XXXXXXX folder")
    return ckpt
