"""The one training loop (DESIGN §4). It asks the method which phase a step is, computes that phase's loss and
steps only that phase's optimizer; it never knows which method it runs.

Per step: phase -> requires_grad on that phase's roles only -> loss (autocast) -> non-finite guard -> backward
(repeated per micro-batch under `trainer.grad_accum_steps`) -> clip -> optimizer + LR schedule -> EMA (generator
phases) -> log / eval / checkpoint.
"""
from __future__ import annotations

import datetime
import itertools
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs
from accelerate.state import AcceleratorState, PartialState
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .. import batch_split
from ..checks import NonFiniteError, at_least, eval_sample_count, non_negative
from ..data.cache import cache_holds
from .batches import BatchSource, make_regression_pairs, regression_pairs_key
from .checkpoint import (checkpoint_before, damaged_file, latest_checkpoint, load_checkpoint,
                         load_sharded_checkpoint, save_checkpoint)
from .distributed import all_finite, any_process, average_gradients, mean_over_processes, weight_spread
from .ema import EMA
from .evaluation import Evaluator
from .fsdp import (WRAP_DEFAULT, check_fsdp_supported, full_optimizer_state, full_state_dicts,
                   load_full_optimizer_state, shard_roles)
from .loggers import MetricsLogger
from .optim import clip_gradients, lr_lambda, make_adamw, phase_update_counts
from .resume_check import SHOWN, config_differences, mismatch_message
from .setup import Run, checkpoint_roles
from .stop_signals import StopRequest

log = logging.getLogger("stepdistill")


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def _accelerator(mixed_precision: str) -> Accelerator:
    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision; a
    # notebook or test that trains twice in one process (fp32, then bf16) must not need a restart. Outside
    # a distributed launch nothing else holds that state, so start it afresh when the precision changes.
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and not PartialState().use_distributed:
        AcceleratorState._reset_state()
    # one micro-batch per backward as accelerate sees it: the trainer accumulates itself (trainer.grad_accum_steps),
    # and without a plugin accelerate took ACCELERATE_GRADIENT_ACCUMULATION_STEPS from the environment (an
    # accelerate config) and divided every loss by it, on top of the trainer's own division
    # COLLECTIVE_TIMEOUT: rank 0 alone evaluates, checkpoints and exports while the other ranks wait in the next
    # collective, and NCCL's 10-minute default would kill a run whose evaluation (an SD FID) takes longer
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])


def refuse_accelerate_sharding(distributed_type) -> None:
    """An accelerate config's DeepSpeed, FSDP or Megatron plugin is never applied (the trainer does not call
    accelerator.prepare): the run went on as plain data parallel with whole replicas, or failed at the first
    backward (DeepSpeed's engine is made by prepare)."""
    name = getattr(distributed_type, "value", str(distributed_type))
    if name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        raise ValueError(f"accelerate launch with a {name} config: stepdistill shards with its own trainer=fsdp "
                         "(FSDP2) and does not apply accelerate's plugins; launch with a plain multi-GPU config "
                         "(accelerate launch --multi_gpu) and set trainer=fsdp to shard")


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class Trainer:
    def __init__(self, run: Run, run_dir: Path):
        self.run, self.cfg, self.run_dir = run, run.cfg, Path(run_dir)
        tc = self.cfg.trainer
        self.accelerator = _accelerator(tc.mixed_precision)
        refuse_accelerate_sharding(self.accelerator.distributed_type)
        self.device = self.accelerator.device
        if str(tc.mixed_precision) == "fp16" and self.device.type == "cpu":
            log.warning("trainer.mixed_precision=fp16 on the CPU runs in float32 (accelerate has no fp16 autocast "
                        "there): use bf16 for half precision on the CPU, or no")
        # multi-process (accelerate launch): trainer.batch_size is the global batch, split over the processes;
        # rank 0 alone logs, evaluates, checkpoints and exports
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.rank == 0
        # gradient accumulation: each process computes its rows in `accum` micro-batches, one after another
        self.accum = at_least("trainer.grad_accum_steps", tc.get("grad_accum_steps", 1))   # 2.5 ran as 2
        shards = self.world * self.accum
        at_least("trainer.batch_size", tc.batch_size)   # 64.9 trained on 64 rows
        at_least("trainer.max_steps", tc.max_steps)   # 0 trained nothing and exported the untrained student
        for key, value in (("trainer.checkpoint_every", tc.checkpoint_every),
                           ("trainer.keep_checkpoints", tc.keep_checkpoints), ("eval.every", self.cfg.eval.every),
                           ("logger.every", self.cfg.logger.every)):   # 0 = never (keep: all), not below
            at_least(key, value, 0)
        at_least("trainer.max_nonfinite_steps", tc.max_nonfinite_steps)
        if int(self.cfg.eval.every) > 0 or self.cfg.eval.final:
            eval_sample_count("eval.num_samples", self.cfg.eval.num_samples,
                              " (or turn evaluations off: eval.every=0 eval.final=false)")
        if self.cfg.eval.get("final_num_samples") is not None:
            at_least("eval.final_num_samples", self.cfg.eval.final_num_samples, 2)   # null: eval.num_samples
        # 1 would freeze the EMA at the initial generator, which evaluation, sampling and export then use
        if not 0 <= float(tc.ema_decay) < 1:
            raise ValueError(f"trainer.ema_decay={tc.ema_decay}: need a decay in [0, 1) (0 = no EMA; 0.999 averages "
                             "~1000 updates)")
        if int(tc.batch_size) % shards:
            into = f" x {self.accum} micro-batches (trainer.grad_accum_steps)" if self.accum > 1 else ""
            raise ValueError(f"trainer.batch_size={tc.batch_size} does not split over {self.world} processes{into}: "
                             f"use a multiple of {shards}")
        # every rank keeps the same RNG state and takes its rows of each global-batch draw (batch_split), so N
        # processes compute what one process does with the same global batch
        batch_split.set_split(self.rank, self.world)
        run.roles.to(self.device)
        fc = tc.get("fsdp") or {}
        self.fsdp = bool(fc.get("enabled", False)) and self.world > 1
        if fc.get("enabled", False) and self.world == 1:   # it ran unsharded without a word
            log.warning("trainer=fsdp with one process: there is nothing to shard over, so the networks are whole "
                        "(start it with accelerate launch --multi_gpu --num_processes N to shard them)")
        if self.fsdp:   # before the optimizers and the EMA: they hold the sharded parameters
            check_fsdp_supported(self.cfg)
            shard_roles(run.roles, self.device, self.world, list(fc.get("wrap", WRAP_DEFAULT)),
                        bool(fc.get("reshard_after_forward", True)))
        self.method = run.method
        statistic = self.method.batch_statistic()
        if self.accum > 1 and self.main and statistic:
            # documented (README, "Gradient accumulation"), and said here, since the gmm's default is batch
            log.warning("trainer.grad_accum_steps=%d with %s: that batch statistic is taken over each micro-batch, "
                        "so the update is not the one-batch update (it does not depend on the process count)",
                        self.accum, statistic)
        self.optimizers, self.schedulers, self.phase_params = {}, {}, {}
        self.role_params = run.roles.parameter_lists()  # the roles are fixed from here on
        updates = phase_update_counts(self.method, int(tc.max_steps))
        if "generator" in updates and updates["generator"] == 0:   # a run that exports its initial network, silently
            first = next(s for s in itertools.count() if self.method.phase(s) == "generator")
            mc = self.cfg.method
            log.warning("trainer.max_steps=%d leaves the generator no update: its first comes at step %d, after "
                        "method.critic_warmup_steps=%s warm-up steps and method.critic_steps=%s critic updates; the "
                        "student stays its initial network: raise trainer.max_steps above %d", int(tc.max_steps),
                        first + 1, mc.get("critic_warmup_steps") or 0, mc.get("critic_steps", 1), first)
        drop_step = self.cfg.optim.get("lr_drop_step")   # a trainer step; each phase drops at its own update count
        if drop_step is not None:
            drop_step = at_least("optim.lr_drop_step", drop_step, 0)
        drop_factor = non_negative("optim.lr_drop_factor", self.cfg.optim.get("lr_drop_factor", 1.0))
        if drop_factor == 0:
            raise ValueError("optim.lr_drop_factor=0 would stop training at optim.lr_drop_step: need a factor > 0")
        drops = phase_update_counts(self.method, drop_step) if drop_step is not None else {}
        # read once: OmegaConf lookups in the step loop were ~3% of a gmm step
        self.grad_clip: dict[str, float] = {}
        for phase, names in self.method.phases.items():
            oc = self.cfg.optim[phase]
            if len(oc.betas) != 2 or not all(0 <= float(b) < 1 for b in oc.betas):
                raise ValueError(f"optim.{phase}.betas={list(oc.betas)}: give Adam's two decay rates, each in [0, 1)")
            warmup = at_least(f"optim.{phase}.warmup_steps", oc.get("warmup_steps", 0) or 0, 0)   # null: none
            clip = non_negative(f"optim.{phase}.grad_clip", oc.get("grad_clip", 0) or 0)
            self.grad_clip[phase] = clip if clip > 0 else float("inf")   # 0 = no clipping
            params = self.phase_params[phase] = run.roles.parameters_of(names)
            # torch's own messages ("Invalid learning rate: -1") do not say which role's setting it was
            opt = make_adamw(params, float(oc.get("optimism", 0.0)), lr=non_negative(f"optim.{phase}.lr", oc.lr),
                             betas=tuple(oc.betas),
                             weight_decay=non_negative(f"optim.{phase}.weight_decay", oc.weight_decay))
            self.optimizers[phase] = opt
            self.schedulers[phase] = torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(warmup, updates[phase], self.cfg.optim.schedule,
                               drops.get(phase), drop_factor))
        self.ema_decay = float(tc.ema_decay)
        self.max_nonfinite = int(tc.max_nonfinite_steps)
        self.ema = EMA(run.roles["generator_ema"], run.roles["generator"]) if "generator_ema" in run.roles else None
        self.step = 0
        # per phase: with one count, a phase that always fails between finite updates of the other never stopped
        self.nonfinite_in_a_row = dict.fromkeys(self.method.phases, 0)
        self.resumed_from: Path | None = None
        self.saved_step: int | None = None   # the step of the last checkpoint written or loaded
        # each phase's latest logged values: a train row shows both phases, the one that ran last and the other
        self.last_logs: dict = {}
        self.evaluator = Evaluator(run, self.run_dir)
        self.logger = (MetricsLogger(self.run_dir, self.cfg.logger.backend, config=OmegaConf.to_container(self.cfg),
                                     resume=bool(tc.resume), curves=bool(self.cfg.logger.get("curves", True)))
                       if self.main else None)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state(self, method: dict, optimizers: dict | None = None) -> dict:
        """The trainer's state. `method`: the method's state (its kept samples, gathered from every process);
        `optimizers`: their states where the caller has gathered them (trainer=fsdp), else this process's."""
        scaler = self.accelerator.scaler
        return {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row, "last_logs": dict(self.last_logs),
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "optimizers": optimizers or {k: o.state_dict() for k, o in self.optimizers.items()},
                "method": method,
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "rng_cpu": torch.get_rng_state(),
                # this process's device only: with batch_split every process's device stream is the same, so
                # rank 0's cuda:0 state is the one each rank restores on its own device
                "rng_cuda": [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []}

    def save(self) -> Path | None:
        """Checkpoint this step, once: the end of a run whose last step was a checkpoint step (or a stop right
        after one) has nothing new to write, and rewriting a step in place is the one save with a window in
        which that step's folder is missing."""
        if self.step == self.saved_step:   # the same on every process: all skip the gathers together
            return None
        roles, optimizers = checkpoint_roles(self.run.roles), None
        if self.fsdp:   # every process takes part in gathering the whole weights and optimizer states
            roles = full_state_dicts(roles)
            optimizers = {k: full_optimizer_state(self.run.roles, o) for k, o in self.optimizers.items()}
        method = self.method.state_dict()   # every process takes part in gathering the kept samples
        path = (save_checkpoint(self.run_dir / "checkpoints", self.step, roles, self.state(method, optimizers),
                                keep=int(self.cfg.trainer.keep_checkpoints)) if self.main else None)
        self.saved_step = self.step
        return path

    def resume(self) -> None:
        """Load the latest checkpoint (once). `train()` calls it before rewriting config.yaml, so a resume that
        does not fit leaves the run folder as it was; `fit()` calls it otherwise."""
        if self.resumed_from is not None:
            return
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"trainer.resume=true but {self.run_dir / 'checkpoints'} holds no checkpoint: "
                                    "drop trainer.resume or point hydra.run.dir at an earlier run")
        try:
            st = self._load_checkpoint(ckpt)
        except Exception as e:   # another config's roles or shapes, or a file damaged since it was written
            damage = damaged_file(ckpt)
            if damage is not None:
                earlier = checkpoint_before(self.run_dir / "checkpoints", ckpt)
                fallback = (f"move {ckpt} aside to resume from {earlier}" if earlier
                            else "no earlier checkpoint is left: start a new run in another hydra.run.dir")
                raise ValueError(f"trainer.resume=true but checkpoint {ckpt} is damaged ({damage}): "
                                 f"{fallback}") from e
            if not isinstance(e, (RuntimeError, ValueError, KeyError, FileNotFoundError)):
                raise
            raise ValueError(mismatch_message(ckpt, self.run_dir / "config.yaml", self.cfg, e)) from e
        self.step = int(st["step"])
        counts = st["nonfinite_in_a_row"]   # one int for every phase in checkpoints written before the per-phase count
        self.nonfinite_in_a_row = {p: int(counts.get(p, 0) if isinstance(counts, dict) else counts)
                                   for p in self.method.phases}
        if self.accelerator.scaler is not None and st.get("grad_scaler"):   # fp16: the loss scale goes on
            self.accelerator.scaler.load_state_dict(st["grad_scaler"])
        self.method.load_state_dict(st.get("method", {}), self.device)   # older checkpoints have none
        self.last_logs = dict(st.get("last_logs", {}))   # the next train row's other phase: as a straight run logs it
        torch.set_rng_state(st["rng_cpu"])
        if st["rng_cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["rng_cuda"][0], self.device)
        self.resumed_from, self.saved_step = ckpt, self.step
        if self.main:
            self.logger.drop_after(self.step)
            self._report_changed_settings()
        log.info("resumed from %s at step %d", ckpt, self.step)

    def _report_changed_settings(self) -> None:
        """A resume that fits may still run with other settings than the run's config.yaml (a lower learning rate on
        purpose, or a setting added since with a new default): say which, before config.yaml is rewritten."""
        saved = self.run_dir / "config.yaml"
        if not saved.is_file():
            return
        diffs = [d for d in config_differences(OmegaConf.load(saved), self.cfg) if not d.startswith("trainer.max_steps:")]
        if diffs:
            more = f" (and {len(diffs) - SHOWN} more)" if len(diffs) > SHOWN else ""
            log.warning("resume: this run changes %s%s against %s", "; ".join(diffs[:SHOWN]), more, saved)

    def _load_checkpoint(self, ckpt: Path) -> dict:
        """Weights, optimizer and scheduler states into this trainer's objects; the rest of the state returned."""
        if self.fsdp:   # every process reads the whole weights and keeps its shards
            st = load_sharded_checkpoint(ckpt, checkpoint_roles(self.run.roles))
            for k, o in self.optimizers.items():
                load_full_optimizer_state(self.run.roles, o, st["optimizers"][k], self.phase_params[k])
        else:
            st = load_checkpoint(ckpt, checkpoint_roles(self.run.roles))
            for k, o in self.optimizers.items():
                o.load_state_dict(st["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(st["schedulers"][k])
        self._apply_configured_hyperparameters()
        return st

    def _apply_configured_hyperparameters(self) -> None:
        """After a resume, the configured learning rate, betas and weight decay, not the checkpoint's: loading an
        optimizer and an LR scheduler restores the values they were built with, so a resume that changes
        `optim.*.lr` (a second stage at a lower rate) would silently run at the old one while config.yaml records
        the new. The configured values are the optimizer's `defaults` (built from this config; a state dict does not
        load them). Unchanged settings give the same values (the rate is the scheduler's own base x multiplier)."""
        for phase, opt in self.optimizers.items():
            sched, built = self.schedulers[phase], opt.defaults
            lr = built["lr"]
            if sched.base_lrs[0] != lr:
                log.info("resume: optim.%s.lr %g (the checkpoint's was %g)", phase, lr, sched.base_lrs[0])
            sched.base_lrs = [lr] * len(opt.param_groups)
            for group, fn in zip(opt.param_groups, sched.lr_lambdas):
                group.update(initial_lr=lr, lr=lr * fn(sched.last_epoch), betas=built["betas"],
                             weight_decay=built["weight_decay"])
            sched._last_lr = [g["lr"] for g in opt.param_groups]

    # --- one step ------------------------------------------------------------------------------------------
    def train_step(self, batch_source: BatchSource) -> tuple[str, dict | None]:
        """One update of the phase this step belongs to: its logs, or None where the update was skipped."""
        phase = self.method.phase(self.step)
        self.run.roles.train_only(self.method.phases[phase], self.role_params)
        opt = self.optimizers[phase]
        try:
            return phase, self._update(phase, opt, batch_source)
        finally:   # freed after every update, made or skipped: each role's gradients were held through the other
            opt.zero_grad(set_to_none=True)   # phase's steps (~3.4 GB per SD1.5 UNet in fp32)

    def _update(self, phase: str, opt, batch_source: BatchSource) -> dict | None:
        finite, logs = self._accumulate_gradients(phase, batch_source)
        grad_norm = float("nan")
        # fp16 on a GPU: accelerate's backward multiplies the loss by its GradScaler's scale. The gradients are
        # unscaled before clipping (after the cross-process average, so every rank sees the same overflow), and
        # the scaler's update() after each backward lowers the scale on an overflow and raises it after a run of
        # good steps.
        scaler = self.accelerator.scaler
        overflow = False
        if finite:
            average_gradients(self.phase_params[phase])
            if scaler is not None:
                scaler.unscale_(opt)
            params = [p for p in self.phase_params[phase] if p.grad is not None]
            grad_norm = clip_gradients(params, self.grad_clip[phase])
            finite = math.isfinite(grad_norm)
            if scaler is not None:
                # a scale >= 1 that overflowed is the scaler's business (it backs off), not a diverging run
                overflow = not finite and scaler.get_scale() >= 1.0
                scaler.update()
        if not finite:   # no update: neither does the method keep what it gathered from this step
            self.method.discard_step(self.step)
        if overflow:
            log.info("fp16 gradient overflow at step %d: %s update skipped, loss scale now %g", self.step, phase,
                     scaler.get_scale())
            return None
        if not finite:  # skip the update, keep the weights, stop after several in a row
            self.nonfinite_in_a_row[phase] += 1
            log.warning("non-finite %s loss/gradient at step %d: update skipped (%d %s updates in a row)", phase,
                        self.step, self.nonfinite_in_a_row[phase], phase)
            if self.nonfinite_in_a_row[phase] >= self.max_nonfinite:
                saved = latest_checkpoint(self.run_dir / "checkpoints")
                resume = (f"; trainer.resume=true continues from {saved.name}, saved before these updates" if saved
                          else "")
                raise NonFiniteError(f"{self.max_nonfinite} non-finite {phase} updates in a row (last at step "
                                     f"{self.step}): lower optim.{phase}.lr, set optim.{phase}.grad_clip, or use "
                                     f"trainer.mixed_precision=no{resume}")
            return None
        self.nonfinite_in_a_row[phase] = 0
        opt.step()
        self.schedulers[phase].step()
        if phase == "generator" and self.ema is not None:
            self.ema.update(self.ema_decay)
        values = mean_over_processes(logs, self.device)
        return {f"{phase}/{k}": v for k, v in {**values, "grad_norm": grad_norm}.items()}

    def _accumulate_gradients(self, phase: str, batch_source: BatchSource) -> tuple[bool, dict]:
        """Loss and backward of each micro-batch (one without gradient accumulation); returns whether every loss
        on every process was finite, and the logs averaged over the micro-batches. Each micro-batch starts from
        the step's RNG state and keeps its rows of every draw (batch_split), so K micro-batches of B/K rows make
        the draws, and sum to the gradient, of one batch of B rows. After a non-finite loss the remaining
        micro-batches still run their losses, without backward, so kept samples and the RNG end where they would."""
        k = self.accum
        rng = _rng_state(self.device) if k > 1 else None
        finite, logs = True, []
        for i in range(k):
            if i:
                _set_rng_state(rng, self.device)
            with batch_split.micro_batch(i, k):
                with self.accelerator.autocast():
                    out = self.method.loss(phase, batch_source(), self.step)
                loss = out.loss.item()   # one read of the loss for the check and the log (small ops count on the gmm)
                finite = all_finite(math.isfinite(loss), self.device) and finite
                if finite:   # the micro-batches' mean is the whole batch's loss
                    self.accelerator.backward(out.loss / k if k > 1 else out.loss)
            logs.append({"loss": loss, **out.logs})
            del out
        if k == 1:
            return finite, logs[0]
        # a maximum over the step's rows is the micro-batches' maximum, not their mean (as across processes)
        return finite, {key: max(row[key] for row in logs) if key.endswith("_max") else sum(row[key] for row in logs) / k
                        for key in logs[0]}

    # --- the loop ------------------------------------------------------------------------------------------
    def _stopped(self, signal_name: str | None, t0: float) -> dict:
        """After a stop signal: a checkpoint of the last finished step; no final evaluation, no export."""
        self.save()
        name = signal_name or "a signal to another process"
        if self.main:
            log.warning("stopped by %s at step %d: checkpoint saved; continue with trainer.resume=true", name, self.step)
            self.logger.log(self.step, {"stopped_by": name}, kind="train")
            self.logger.close()
        return {"train_seconds": time.time() - t0, "stopped_by": name, "stopped_at_step": self.step}

    def _evaluate(self, teacher_reference: bool = False, num_samples: int | None = None) -> dict:
        """Rank 0 evaluates and logs. Sharded networks (trainer=fsdp) need every process in each forward: all
        sample the same fixed noise, rank 0 alone scores and writes."""
        if not (self.main or self.fsdp):
            return {}
        metrics = self.evaluator.evaluate(self.step, teacher_reference=teacher_reference, score=self.main,
                                          num_samples=num_samples)
        if self.main:
            self.logger.log(self.step, metrics, kind="eval")
        return metrics

    def fit(self) -> dict:
        tc, ec = self.cfg.trainer, self.cfg.eval
        if tc.resume:
            self.resume()   # a no-op where train() has resumed already
            if self.step >= int(tc.max_steps):
                log.warning("trainer.max_steps=%d but the checkpoint is at step %d: nothing to train; the run "
                            "evaluates and exports step %d (raise trainer.max_steps to train on)",
                            int(tc.max_steps), self.step, self.step)
                if self.main and ec.final:   # its final evaluation replaces the one logged at that step before
                    self.logger.drop_after(self.step, kinds_at_step=("eval",))
        pairs = None
        if "reg_noise" in self.method.batch_keys:
            rc, bm = self.cfg.method.regression, self.run.benchmark
            num, seed, guidance = int(rc.num_pairs), int(self.cfg.seed) + 1, float(self.cfg.method.guidance)
            cache, reuse = self.run_dir / "regression_pairs.safetensors", True
            if self.fsdp:
                # the sharded teacher's sampling takes every process: all read the cache, or all make the pairs (a
                # resume had rank 0 read them while the others sampled, and waited for it forever)
                key = regression_pairs_key(bm, num, seed, guidance)
                reuse = all_finite(cache_holds(cache, key), self.device)
            # every rank makes the same pairs (seeded); rank 0 alone writes the cache
            path = cache if self.main or (self.fsdp and reuse) else None
            pairs = make_regression_pairs(bm, num, seed, path, guidance=guidance, reuse=reuse)
        batches = BatchSource(self.run.benchmark, self.method.batch_keys,
                              int(tc.batch_size) // (self.world * self.accum), self.device, pairs)
        for m in self.run.roles.values():
            m.train()
        self.run.roles["teacher"].eval()
        if self.main:   # wandb or TensorBoard now, not with the first row: a failing start ended the run after training
            self.logger.start()
        t0 = time.time()
        bar = tqdm(total=int(tc.max_steps), initial=self.step, desc=f"{self.cfg.method.name}", dynamic_ncols=True,
                   disable=not (tc.progress and self.main))
        with StopRequest(tc.get("stop_signals") or []) as stop:
            while self.step < int(tc.max_steps):
                phase, logs = self.train_step(batches)
                self.step += 1
                bar.update(1)
                if logs:
                    self.last_logs.update(logs)
                    bar.set_postfix({k.split("/")[0][:3] + "_loss": f"{v:.3g}" for k, v in self.last_logs.items()
                                     if k.endswith("/loss")}, refresh=False)
                every = int(self.cfg.logger.every)
                if self.main and ((every > 0 and self.step % every == 0) or self.step == int(tc.max_steps)):
                    lr = self.schedulers["generator"].get_last_lr()[0]
                    self.logger.log(self.step, {**self.last_logs, "lr_generator": lr, "seconds": time.time() - t0},
                                    kind="train")
                if int(ec.every) > 0 and self.step % int(ec.every) == 0 and self.step < int(tc.max_steps):
                    self._evaluate()
                if int(tc.checkpoint_every) > 0 and self.step % int(tc.checkpoint_every) == 0:
                    if any(self.nonfinite_in_a_row.values()):   # the weights may be what made the updates blow up:
                        log.warning("step %d: no checkpoint in the middle of non-finite updates", self.step)
                    else:                                       # a resume with a lower lr starts before them
                        self.save()
                if any_process(stop.requested, self.device):   # every process stops after the same step
                    break
        bar.close()
        if self.step < int(tc.max_steps):
            return self._stopped(stop.received, t0)
        spread = weight_spread([p for ps in self.phase_params.values() for p in ps])   # every rank takes part
        self.save()
        result = {"train_seconds": time.time() - t0}
        if self.world > 1:
            result["processes"], result["weight_spread_across_processes"] = self.world, spread
            if self.main:
                self.logger.log(self.step, {"processes": self.world, "weight_spread_across_processes": spread},
                                kind="train")
        if ec.final:
            result.update(self._evaluate(bool(ec.teacher_reference), ec.get("final_num_samples")))
        if not self.main:
            return result
        self.logger.close()
        return result
