"""SIGTERM/SIGINT over a whole run: during start-up they end it before anything is written
(Interrupted); in the loop the run saves the current step and stops."""

from __future__ import annotations

import os
import signal
import time


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during start-up: the run stopped before writing anything."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class Preemption:
    """SIGTERM/SIGINT set a flag, never an exception in the middle of a library call. During
    start-up `check` then raises Interrupted (nothing written yet); in the loop `stop_reason` says
    the run must save and stop (all processes agree on it)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def check(self) -> None:
        if self.signal:
            raise Interrupted(self.signal)

    def stop_reason(self, step: int, process_count: int) -> str | None:
        """The signal (or "preemption", a sync point the other processes reached) after `step`."""
        fault_injection_pause(step, self)
        if process_count > 1 and _reached_preemption_sync_point(step):  # all processes must save together
            return self.signal or "preemption"
        return self.signal

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _reached_preemption_sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except Exception:  # no preemption service (not started by jax.distributed on this platform)
        return False


def fault_injection_pause(step: int, preempt: Preemption) -> None:
    """Tests of crash recovery set SC_JAX_PAUSE_AT_STEP=N: the run waits after step N
    (N=0: during start-up, before the state is restored or compiled) until a signal
    arrives, or until it is killed."""
    if os.environ.get("SC_JAX_PAUSE_AT_STEP") == str(step):
        print(f"paused at step {step}", flush=True)
        while preempt.signal is None:
            time.sleep(0.05)
