"""`stepdistill-bench [benchmark=gmm|digits] [methods=dmd,dmd2] [steps=N]`: the cost of one training iteration.

Per method (each in a fresh process, so peak memory is its own): network evaluations per iteration (forward
calls of any backbone or GAN head, teacher included, counting a CFG call's doubled batch as one call), seconds per
iteration, the share of iteration time spent outside network forward/backward (forward time from hooks around
each backbone; the whole backward pass is counted as network time) and the part of that share the update itself
takes (`optimizer`: zero_grad, gradient clipping, the optimizer step and the generator's EMA; the rest is the
method's own tensor ops, the batch source and Python), peak memory (CUDA peak allocated on a
GPU, else the process's peak resident set) and the activations one generator-phase loss keeps for backward
(`saved_activation_bytes`: what backpropagating through the teacher costs SiD and SIM, device-independent; one
micro-batch's under `trainer.grad_accum_steps`).
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..checks import at_least
from . import CONF_DIR, pipe_table, unknown_setting


class _Timer:
    """Seconds inside the outermost of nested enter/exit pairs, and how many outermost pairs there were: a network
    called inside another (a critic that wraps the exact teacher) is timed and counted once."""

    def __init__(self):
        self.seconds, self.calls, self._depth, self._t0 = 0.0, 0, 0, 0.0

    def enter(self, *_):
        if self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += 1

    def exit(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.calls += 1
            self.seconds += time.perf_counter() - self._t0

    def wrap(self, fn):
        def timed(*a, **kw):
            self.enter()
            try:
                return fn(*a, **kw)
            finally:
                self.exit()
        return timed


def _time_networks(nets, timer: _Timer) -> list:
    # always_call: DMD2's GAN cuts the critic's forward at its bottleneck by raising; the post hook must still
    # close that call, or the nesting count never returns to zero and later calls go uncounted
    return [h for n in nets for h in (n.register_forward_pre_hook(timer.enter),
                                      n.register_forward_hook(timer.exit, always_call=True))]


def _time_update(trainer, timer: _Timer):
    """Time the update after backward (zero_grad, clipping, the optimizer step, the EMA) into `timer`; returns a
    function that takes the timers out again (bench_one also runs inside other processes)."""
    from ..train import trainer as trainer_module
    # the step through torch's step hooks, not a wrapper: an LR scheduler warns when optimizer.step is replaced
    # after it was built. Nested: OptimisticAdamW's step calls AdamW's, and both may run the hooks.
    handles = [h for opt in trainer.optimizers.values()
               for h in (opt.register_step_pre_hook(timer.enter), opt.register_step_post_hook(timer.exit))]
    patched = [(opt, "zero_grad") for opt in trainer.optimizers.values()]
    patched += [(trainer.ema, "update")] if trainer.ema is not None else []
    clip = trainer_module.clip_gradients
    for obj, name in patched:   # instance attributes over the class's methods
        setattr(obj, name, timer.wrap(getattr(obj, name)))
    trainer_module.clip_gradients = timer.wrap(clip)

    def undo():
        for h in handles:
            h.remove()
        for obj, name in patched:
            delattr(obj, name)
        trainer_module.clip_gradients = clip
    return undo


def saved_activation_bytes(run, batches) -> int:
    """Bytes autograd keeps for backward in one generator-phase loss (each storage once, parameters excluded):
    the activation memory a method pays, which is what backpropagating through the teacher and the critic (SiD,
    SIM) adds, measured the same way on any device."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in run.roles.parameters()}
    seen: set = set()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            pack.total += st.nbytes()
        return t

    pack.total = 0
    run.roles.train_only(run.method.phases["generator"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run.method.loss("generator", batches(), 0)
    del out
    return pack.total


def bench_one(benchmark: str, method: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    # The trainer needs a run directory; nothing it writes there is a result, so none is left behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="stepdistill-bench-") as run_dir:
        return _bench_in(run_dir, benchmark, method, steps, warmup, overrides)


def _whole_iterations(method, start: int, steps: int) -> int:
    """At least `steps` updates from `start`, ending with a generator update: whole iterations only."""
    n = steps
    while method.phase(start + n - 1) != "generator":
        n += 1
        if n > steps + 1000:
            raise ValueError("no generator update in the timed steps: raise steps=")
    return n


def _bench_in(run_dir: str, benchmark: str, method_name: str, steps: int, warmup: int, overrides: list[str]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from ..networks.gmm import GMMDenoiser
    from ..train.batches import BatchSource, make_regression_pairs
    from ..train.setup import build_run
    from ..train.trainer import Trainer

    with initialize_config_dir(CONF_DIR, version_base=None):
        base = compose("train", overrides=[f"benchmark={benchmark}", f"method={method_name}"])
        # the steady state: no critic-only warm-up, and no tangent warm-up (sCM, rCM), during which rCM trains its
        # student alone; a warm-up the command line sets is kept
        steady = [f"method.{k}=0" for k in ("critic_warmup_steps", "warmup_steps") if k in base.method]
        cfg = compose("train", overrides=[f"benchmark={benchmark}", f"method={method_name}", "eval.every=0", *steady,
                                          *overrides])
    torch.set_num_threads(int(cfg.trainer.num_threads or torch.get_num_threads()))
    run = build_run(cfg)
    trainer = Trainer(run, run_dir)
    pairs = None
    if "reg_noise" in run.method.batch_keys:
        pairs = make_regression_pairs(run.benchmark, 256, 0, guidance=float(cfg.method.guidance))
    accum = int(cfg.trainer.get("grad_accum_steps", 1))   # the trainer asks for one micro-batch at a time
    batches = BatchSource(run.benchmark, run.method.batch_keys, int(cfg.trainer.batch_size) // accum, trainer.device,
                          pairs)
    nets = [m.net for m in run.roles.modules() if hasattr(m, "net") and isinstance(m.net, torch.nn.Module)]
    nets += [m for name, m in run.roles.items() if name.endswith("_head")]  # DMD2's GAN classifier is a network too
    teacher = run.roles["teacher"]
    method = run.method
    # warm up to the end of a generator update, then time whole iterations: `steps` updates or a few more, up to
    # the next generator update (3 updates of DMD's critic, generator cycle counted one critic update twice)
    while trainer.step < warmup or (trainer.step > 0 and method.phase(trainer.step - 1) != "generator"):
        trainer.train_step(batches)
        trainer.step += 1
    timed = _whole_iterations(method, trainer.step, steps)
    iterations = sum(method.phase(trainer.step + i) == "generator" for i in range(timed))
    saved = saved_activation_bytes(run, batches)
    forward, backward, update = _Timer(), _Timer(), _Timer()
    handles = _time_networks(nets, forward)
    if isinstance(teacher, GMMDenoiser):  # the analytic teacher has no network: count and time its exact x0
        teacher._x0_single = forward.wrap(teacher._x0_single)
    trainer.accelerator.backward = backward.wrap(trainer.accelerator.backward)
    untime_update = _time_update(trainer, update)
    try:   # clip_gradients is patched module-wide: restore it even if a step fails
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(timed):
            trainer.train_step(batches)
            trainer.step += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        for h in handles:
            h.remove()
    finally:
        untime_update()
    net_time = forward.seconds + backward.seconds
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # one "iteration" = one generator update and its critic updates (none for sCM)
    return {"benchmark": benchmark, "method": method_name, "updates_per_iteration": timed / iterations,
            "network_evals_per_iteration": forward.calls / iterations,
            "seconds_per_iteration": total / iterations, "outside_network_share": 1 - net_time / total,
            "optimizer_share": update.seconds / total,
            "peak_memory_mb": peak / 2**20, "generator_saved_mb": saved / 2**20, "device": str(trainer.device),
            "batch_size": int(cfg.trainer.batch_size), "grad_accum_steps": accum}


def _batch(row: dict) -> str:
    k = row.get("grad_accum_steps", 1)
    return str(row["batch_size"]) if k == 1 else f"{row['batch_size']} = {k} x {row['batch_size'] // k}"


def table(rows: list[dict]) -> str:
    head = ("benchmark", "method", "batch", "updates/iter", "net evals/iter", "s/iter", "outside nets",
            "of it optimizer", "peak MB", "gen. saved MB")
    return pipe_table(head, [[r["benchmark"], r["method"], _batch(r), f"{r['updates_per_iteration']:g}",
                              f"{r['network_evals_per_iteration']:.1f}", f"{r['seconds_per_iteration']:.3f}",
                              f"{100 * r['outside_network_share']:.1f}%", f"{100 * r['optimizer_share']:.1f}%",
                              f"{r['peak_memory_mb']:.0f}",
                              f"{r['generator_saved_mb']:.1f}"] for r in rows])


def check_bench_overrides(benchmarks, methods, overrides: list[str]) -> None:
    """Each training override's type against its default under every benchmark/method pair, before any child
    runs: `trainer.batch_size=abc` ended a child in a traceback whose last line did not name the setting."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from .override_types import check_values, split_overrides
    from . import setting_of_another_choice
    from .unread_settings import unread_setting
    values = split_overrides(overrides)[1]   # the bench takes its group choices as benchmark= and methods= only
    failed = []
    with initialize_config_dir(CONF_DIR, version_base=None):
        for bm in benchmarks:
            for m in methods:
                choices = [f"benchmark={bm}", f"method={m}"]
                try:
                    cfg = compose("train", overrides=[*choices, *overrides])
                except HydraException:
                    failed.append(choices)
                    continue
                check_values(compose("train", overrides=choices), cfg, values)
                msg = unread_setting(cfg, [key for key, _ in values])
                if msg:
                    raise ValueError(f"{' '.join(choices)}: {msg}")
    for choices in failed:   # a setting of another benchmark's or method's (benchmark.radius on digits) is named;
        msg = setting_of_another_choice("train", [*choices, *overrides])   # else the child ends with Hydra's words
        if msg:
            raise ValueError(f"{' '.join(choices)}: {msg}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    loose = [a for a in argv if "=" not in a]
    if loose:   # dropped before: `trainer.batch_size 64` ran at the default batch
        sys.exit(f"stepdistill-bench: error: {loose[0]!r} is not a setting: give each as key=value "
                 "(benchmark=, methods=, steps=, warmup= or a training override such as trainer.batch_size=128)")
    args = dict(a.split("=", 1) for a in argv if "." not in a.split("=")[0])
    extra = [a for a in argv if "." in a.split("=")[0]]
    if "one" in args:  # child process: one method, JSON out
        print(json.dumps(bench_one(args["benchmark"], args["one"], int(args["steps"]), int(args["warmup"]), extra)))
        return
    unknown = sorted(set(args) - {"benchmark", "methods", "steps", "warmup"})
    if unknown:   # a training setting needs its group's prefix (trainer.batch_size=...), or it would be ignored
        sys.exit(f"stepdistill-bench: error: unknown setting {unknown[0]!r}: use benchmark=, methods=, steps=, "
                 "warmup= or a training override with its group (e.g. trainer.batch_size=128)")
    benchmarks = args.get("benchmark", "gmm,digits").split(",")
    methods = args.get("methods", "dmd,dmd2").split(",")
    try:
        steps, warmup = at_least("steps", args.get("steps", 30)), at_least("warmup", args.get("warmup", 5), 0)
    except ValueError as e:
        sys.exit(f"stepdistill-bench: error: {e}")
    for group, names in (("benchmark", benchmarks), ("method", methods)):   # Hydra's own message is a search path
        known = sorted(f.stem for f in (Path(CONF_DIR) / group).glob("*.yaml"))
        for name in names:
            if name not in known:
                sys.exit(f"stepdistill-bench: error: unknown {group} {name!r}: use one of {', '.join(known)}")
    msg = unknown_setting(extra)   # a misspelt training setting, not Hydra's advice to add it with "+"
    if msg:
        sys.exit(f"stepdistill-bench: error: {msg}")
    try:
        check_bench_overrides(benchmarks, methods, extra)
    except ValueError as e:
        sys.exit(f"stepdistill-bench: error: {e}")
    rows = []
    for bm in benchmarks:
        for m in methods:
            cmd = [sys.executable, "-m", "stepdistill.cli.bench", f"one={m}", f"benchmark={bm}",
                   f"steps={steps}", f"warmup={warmup}", *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:   # e.g. an unknown method or override: the child's own last line says which
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                sys.exit(f"stepdistill-bench: error: benchmark={bm} method={m} failed: {last}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(rows))


if __name__ == "__main__":
    main()
