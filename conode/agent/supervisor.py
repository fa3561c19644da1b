"""Guest worker processes: start one, talk to it, notice its death.

Each worker's pipes are served by threads of their own (a writer, a reader for its messages, a reader for its
diagnostics), so the agent's loop never blocks on a worker and never polls a pipe descriptor, which only POSIX
allows: the message reader hands chunks over through a bounded queue and wakes the loop with a Waker signal.
"""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Protocol

import psutil

from conode.agent.pipe import Unpacker, pack
from conode.agent.wake import Signal

log = logging.getLogger("conode.agent")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 15.0, 30.0)
STDERR_TAIL = 20
STDERR_LINE_CHARS = 500
READ_CHUNK = 1 << 16
QUEUED_CHUNKS = 64  # read-ahead from one worker; beyond it the worker waits for the agent (back-pressure)
HAND_OVER_POLL_S = 0.1


class WorkerHandle(Protocol):
    """What the agent needs of a running worker; WorkerProcess is the real one, testing.worker a stand-in."""

    index: int
    pid: int
    stderr_tail: deque[str]

    def exit_code(self) -> int | None: ...

    def send(self, message: dict[str, Any]) -> bool: ...

    def messages(self) -> list[dict[str, Any]]: ...

    def drained(self) -> bool: ...

    def cpu_percent(self) -> float: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...


StartWorker = Callable[[int, "Path | None", "Path | None"], WorkerHandle]  # (index, boot snapshot, resume)


def restart_delay(crashes: int) -> float:
    """How long to wait before restarting a worker after its *crashes*-th crash in a row."""
    return RESTART_BACKOFF_S[min(max(crashes, 1) - 1, len(RESTART_BACKOFF_S) - 1)]


class WorkerProcess:
    """One `python -m conode.agent.worker` child and the threads serving its pipes."""

    def __init__(self, index: int, args: list[str], signal: Callable[[], Signal], label: str | None = None) -> None:
        """*label* names the child in logs (default: guest worker INDEX); any child speaking the pipe will do."""
        self.index = index
        self.label = label or f"guest worker {index}"
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, bufsize=0)
        self.pid = self.process.pid
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._unpacker = Unpacker()
        self._chunks: queue.Queue[bytes] = queue.Queue(maxsize=QUEUED_CHUNKS)
        self._outgoing: queue.Queue[bytes | None] = queue.Queue()
        self._read_all = threading.Event()
        self._discarded = threading.Event()  # killed: nobody will read its messages any more
        self._psutil: psutil.Process | None = None
        for name, target, extra in (("out", self._read_messages, (signal,)), ("err", self._read_diagnostics, ()),
                                    ("in", self._write, ())):
            threading.Thread(target=target, args=extra, daemon=True, name=f"worker-{index}-{name}").start()
        log.info("%s started (pid %d)", self.label, self.pid)

    # --- the pipe threads ------------------------------------------------------------------------------------
    def _read_messages(self, signal: Callable[[], Signal]) -> None:
        wake = signal()
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while (data := stdout.read(READ_CHUNK)) and self._hand_over(data):
                wake()
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the worker is being discarded
        finally:
            self._close(stdout)
            self._read_all.set()
            wake()
            wake.close()

    def _hand_over(self, data: bytes) -> bool:
        """Queue a chunk for the agent, waiting while the queue is full; False once the worker is discarded."""
        while not self._discarded.is_set():
            try:
                self._chunks.put(data, timeout=HAND_OVER_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def _read_diagnostics(self) -> None:
        partial = b""
        try:
            while data := self.process.stderr.read(READ_CHUNK):  # type: ignore[union-attr]
                *lines, partial = (partial + data).split(b"\n")
                partial = partial[-STDERR_LINE_CHARS:]
                for raw in lines:
                    line = raw.decode(errors="replace").strip()[:STDERR_LINE_CHARS]
                    if line:
                        self.stderr_tail.append(line)
                        log.debug("%s: %s", self.label, line)
        except (OSError, ValueError):
            pass
        self._close(self.process.stderr)
        if partial.strip():
            self.stderr_tail.append(partial.decode(errors="replace").strip())

    def _write(self) -> None:
        stdin = self.process.stdin
        while (data := self._outgoing.get()) is not None:
            try:
                stdin.write(data)  # type: ignore[union-attr]
            except (OSError, ValueError):
                break  # the worker is gone; its exit is noticed by the agent's loop
        self._close(stdin)

    @staticmethod
    def _close(stream: Any) -> None:
        """Each pipe is closed by the thread that uses it, once it is done with it."""
        try:
            stream.close()
        except OSError:
            pass

    # --- the agent's side -------------------------------------------------------------------------------------
    def exit_code(self) -> int | None:
        return self.process.poll()

    def send(self, message: dict[str, Any]) -> bool:
        if self.process.poll() is not None:
            return False
        self._outgoing.put(pack(message))
        return True

    def messages(self) -> list[dict[str, Any]]:
        """Messages the worker sent since the last call (never blocks). Raises PipeError on garbage."""
        messages: list[dict[str, Any]] = []
        while True:
            try:
                data = self._chunks.get_nowait()
            except queue.Empty:
                return messages
            messages += self._unpacker.feed(data)

    def drained(self) -> bool:
        """True once everything the worker wrote has been handed to messages() (its pipe reached its end)."""
        return self._read_all.is_set() and self._chunks.empty()

    def cpu_percent(self) -> float:
        try:
            if self._psutil is None:
                self._psutil = psutil.Process(self.pid)
            return self._psutil.cpu_percent(None)
        except psutil.Error:
            return 0.0

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to quit; kill it if it does not within *timeout*."""
        if self.send({"type": "quit"}):
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._discarded.set()
        self._outgoing.put(None)  # the writer thread closes stdin after what is queued


def process_starter(mem_mib: int, cpu_cap: float, signal: Callable[[], Signal]) -> StartWorker:
    """A StartWorker that starts real worker processes."""

    def start(index: int, boot_snapshot: Path | None, resume: Path | None) -> WorkerHandle:
        args = [sys.executable, "-m", "conode.agent.worker", "--mem", str(mem_mib), "--cpu-cap", str(cpu_cap)]
        if boot_snapshot is not None:  # a resumed guest's worker runs its later jobs in fresh guests too
            args += ["--boot-snapshot", str(boot_snapshot)]
        if resume is not None:
            args += ["--resume", str(resume)]
        return WorkerProcess(index, args, signal)

    return start
