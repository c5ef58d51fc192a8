"""A clean stop on a signal (`trainer.stop_signals`): finish the step, save a checkpoint, exit.

Cluster schedulers announce preemption and time limits with a signal (SLURM sends SIGTERM, or SIGUSR1 ahead of
time with `--signal`), and Ctrl-C sends SIGINT. Without a handler the run dies mid-step and loses every step since
its last checkpoint. With one, the trainer finishes the step it is in, writes a checkpoint of that step, and stops;
`trainer.resume=true` continues exactly from there. A second Ctrl-C stops at once.

Several processes must stop after the same step (a checkpoint is a collective save), but a signal may reach them
at different steps: the trainer asks all of them after every step (`any_process`) and they stop together.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("stepdistill")


class StopRequest:
    """Within the block, the named signals request a stop instead of killing the process. Handlers can only be
    installed from the main thread; elsewhere (a training thread) the block changes nothing."""

    def __init__(self, names):
        # one name is a list of one (`trainer.stop_signals=SIGTERM` was read letter by letter)
        self.names = [str(n).upper() for n in ([names] if isinstance(names, str) else names)]
        unknown = [n for n in self.names if not isinstance(getattr(signal, n, None), signal.Signals)]
        if unknown:
            raise ValueError(f"trainer.stop_signals: unknown signal(s) {unknown}; use names like SIGTERM, SIGUSR1, "
                             "SIGINT, or [] for none")
        uncatchable = [n for n in self.names if n in ("SIGKILL", "SIGSTOP")]
        if uncatchable:   # signal.signal's answer was "[Errno 22] Invalid argument"
            raise ValueError(f"trainer.stop_signals: {uncatchable[0]} cannot be caught (the system stops the process "
                             "itself); use SIGTERM, SIGUSR1 or SIGINT")
        self.received: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, _frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: the user does not want to wait for the step
        self.received = signal.Signals(signum).name
        log.warning("%s received: the run stops after this step and saves a checkpoint", self.received)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
