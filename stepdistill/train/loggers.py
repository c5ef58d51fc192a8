"""Metric sinks: `metrics.jsonl` and the console always; wandb (offline without an API key) or TensorBoard; and
`curves.png`, metrics.jsonl drawn after each evaluation and at the end (`stepdistill/eval/curves.py`)."""
from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

log = logging.getLogger("stepdistill")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def wandb_mode() -> str | None:
    """"offline" where wandb has no API key to sync with, else None: wandb's own choice (WANDB_MODE, a folder's
    `wandb offline`, or online). The key may be in WANDB_API_KEY or in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        found = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):   # no netrc file, or one wandb could not read either
        found = None
    return None if found and found[2] else "offline"


class MetricsLogger:
    def __init__(self, run_dir: Path, backend: str = "console", project: str = "stepdistill", config=None,
                 console: bool = True, resume: bool = False, curves: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.curves = curves   # redraw RUN/curves.png after each evaluation and at close
        self._undrawn = False  # records logged since curves.png was last drawn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        self.console = console
        if backend not in ("console", "wandb", "tensorboard"):
            raise ValueError(f"unknown logger {backend!r}: use logger=console, wandb or tensorboard")
        self.backend, self.project, self.config, self.resume = backend, project, config, resume
        self._wandb = self._tb = None
        # wandb/TensorBoard start before the first update (the trainer calls start()) or with the first row: a
        # resume that fails writes nothing
        self._started = False
        self._purge_step = None   # on resume: TensorBoard drops what a crashed run logged after the checkpoint

    def start(self) -> None:
        if not self._started:
            self._start()

    def _start(self) -> None:
        self._started = True
        run_dir = self.path.parent
        if self.backend == "wandb":
            import wandb
            # one wandb run per run folder: a resume continues it (its id is kept beside metrics.jsonl)
            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if self.resume and id_file.is_file() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            try:
                self._wandb = wandb.init(project=self.project, dir=str(run_dir), config=self.config,
                                         mode=wandb_mode(), id=run_id, resume="allow")
            except Exception as e:   # noqa: BLE001 - wandb's errors (no API key online, no network) have no common base
                raise ValueError(f"logger=wandb could not start ({type(e).__name__}: {' '.join(str(e).split())[:200]}): "
                                 "log in (wandb login), set WANDB_MODE=offline, or use logger=console") from None
        elif self.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=self._purge_step)

    def drop_after(self, step: int, kinds_at_step: tuple[str, ...] = ()) -> None:
        """On resume from the checkpoint of `step`: the rows a crashed run logged after it go, since the resumed run
        logs those steps again (metrics.jsonl holds one row per logged step and kind), and so do the training's rows
        of `kinds_at_step` at `step` itself (a resume with nothing to train evaluates that step again); the rows of
        stepdistill-eval, which name their `source`, stay. A line a crash cut short is dropped with a warning rather
        than ending the resume. Rewritten beside, then renamed, so a kill here leaves the old file."""
        self._purge_step = step + 1   # events of a later step from the crashed run: TensorBoard purges them
        if not self.path.exists():
            return
        text = self.path.read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        kept, cut = [], 0
        for line in lines:
            try:
                rec = json.loads(line)
                rec_step, rec_kind = int(rec["step"]), rec.get("kind")
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                cut += 1
                continue
            redone = rec_step == step and rec_kind in kinds_at_step and "source" not in rec   # the run's own rows
            if rec_step < step or (rec_step == step and not redone):
                kept.append(line)
        if cut:
            log.warning("resume: %d unreadable line(s) of %s dropped (a write cut short by a crash)", cut,
                        self.path.name)
        if len(kept) == len(lines) and (not lines or text.endswith("\n")):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        if len(lines) - len(kept) - cut:
            log.info("resume at step %d: %d rows logged after it dropped from %s", step, len(lines) - len(kept) - cut,
                     self.path.name)

    def log(self, step: int, row: dict, kind: str = "train") -> None:
        rec = {"step": int(step), "kind": kind, **{k: _clean(v) for k, v in row.items()}}
        line = (json.dumps(rec) + "\n").encode()
        with open(self.path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:   # a line a crash cut short must not swallow this row: start it on a line of its own
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)   # appended whatever the position (append mode)
        self._undrawn = True
        if self.console:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            log.info("[%s %d] %s", kind, step, shown)
        if not self._started:
            self._start()
        nums = {f"{kind}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(nums, step=int(step))
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, int(step))
        if kind == "eval" and self.curves:
            self.draw_curves()

    def draw_curves(self) -> str | None:
        from ..eval.curves import save_training_curves
        self._undrawn = False
        try:
            return save_training_curves(self.path.parent)
        except Exception as e:   # noqa: BLE001 - a figure must not end a run that has trained (it is redrawn later)
            log.warning("could not draw %s: %s", self.path.parent / "curves.png", e)
            return None

    def close(self) -> None:
        if self.curves and self._undrawn:   # a run ending in its final evaluation has just drawn it
            self.draw_curves()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
