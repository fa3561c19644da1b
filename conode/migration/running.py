"""A Guest running on a thread of its own, as a migration drives it: work on its machine thread, pause, resume."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from conode.vm.guest import Guest
from conode.vm.machine import MachineExit

T = TypeVar("T")

PAUSE_RETRY_S = 0.05


class RunningGuest:
    """Runs *guest* (:meth:`Guest.run`) on a thread until it pauses; :meth:`pause` and :meth:`start` again."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.exit: MachineExit | None = None
        self.stopped_ns = 0  # host CLOCK_MONOTONIC when the last run ended: its last instruction
        self.started_ns = 0  # ... when the last run began: its first instruction
        self._lock = threading.Lock()  # between "is it running" and handing it work
        self._running = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._began = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._running

    def start(self) -> None:
        """Run the guest on its thread (it must not be running); return once it runs (started_ns is set)."""
        with self._lock:
            if self._running:
                raise RuntimeError("the guest is already running")
            self._running = True
            self._stopped.clear()
            self._began.clear()
        self._thread = threading.Thread(target=self._run, name=f"guest-{self.guest.guest_id[:8]}", daemon=True)
        self._thread.start()
        self._began.wait()

    def _run(self) -> None:
        try:
            self.started_ns = time.monotonic_ns()
            self._began.set()
            self.exit = self.guest.run()
        finally:
            self.stopped_ns = time.monotonic_ns()
            with self._lock:
                self._running = False
                self.guest.machine.run_calls()  # what was handed over after its last slice
            self._stopped.set()

    def pause(self) -> int:
        """Stop the guest at its next slice boundary; return when it has, with the time of its last instruction."""
        self.guest.machine.pause()
        while not self._stopped.wait(PAUSE_RETRY_S):
            self.guest.machine.pause()  # asked just as it started running: the start forgets an earlier request
        if self._thread is not None:
            self._thread.join()
        return self.stopped_ns

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until the guest stops by itself (its job ended); whether it did."""
        return self._stopped.wait(timeout_s)

    def on_machine_thread(self, fn: Callable[[], T]) -> T:
        """*fn*'s result, computed where the CPU is not running: between two slices, or here if it is stopped."""
        done = threading.Event()
        outcome: list = []

        def call() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # handed back to the caller's thread
                outcome.append((False, exc))
            finally:
                done.set()

        with self._lock:
            if not self._running:
                call()
            else:
                self.guest.machine.call_soon(call)
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value
