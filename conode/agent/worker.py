"""A guest worker: one process, one cooperative guest, jobs run inside it.

The agent starts one worker per core it offers (``python -m conode.agent.worker``), so a guest crash takes down
only its own process. Messages from the agent arrive on stdin, messages to the agent leave on stdout, both as
length-prefixed msgpack (pipe.py):

- agent → worker: ``run`` (job, argv, inputs, outputs), ``cancel`` (job), ``quit``;
- worker → agent: ``ready`` (guest, speed), ``output`` (job, stream, data), ``finished`` (job, status, outputs,
  missing, runtime_s), ``failed`` (job, reason).

Each job runs in ``/job/<id>`` in the guest: inputs are written there first, outputs are read from there after.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any, Callable

from conode.agent.pipe import PipeError, Unpacker, pack
from conode.errors import ConodeError
from conode.vm.guest_agent import GuestAgentClient
from conode.vm.guest_image import BASE_CMDLINE, load_guest_image
from conode.vm.machine import CoMachine, MachineConfig, MachineExit

CALIBRATION_LOOPS = 300


class _Job:
    """One job's progress through staging, running and collecting outputs."""

    def __init__(self, worker: "GuestWorker", job: int, argv: list[str], inputs: dict[str, bytes],
                 outputs: list[str]) -> None:
        self.worker = worker
        self.job = job
        self.argv = argv
        self.inputs = inputs
        self.wanted = outputs
        self.directory = f"/job/{job}"
        self.started = time.monotonic()
        self.command: int | None = None
        self.status: int | None = None
        self.collected: dict[str, bytes] = {}
        self.missing: list[str] = []
        self.cancelled = False

    def start(self) -> None:
        pending = len(self.inputs)
        if not pending:
            self._run()
            return
        remaining = [pending]

        def staged(error: str | None, name: str) -> None:
            if error is not None:
                self.worker.send({"type": "failed", "job": self.job, "reason": f"staging {name}: {error}"})
                self.worker.forget(self.job)
                return
            remaining[0] -= 1
            if remaining[0] == 0:
                self._run()

        for name, data in self.inputs.items():
            self.worker.agent.put_file(f"{self.directory}/{name}", data,
                                       lambda error, name=name: staged(error, name))

    def _run(self) -> None:
        if self.cancelled:
            return
        self.command = self.worker.agent.run(self.argv, self, cwd=self.directory)

    # CommandHandler
    def on_output(self, stream: str, data: bytes) -> None:
        self.worker.send({"type": "output", "job": self.job, "stream": stream, "data": data})

    def on_exit(self, status: int) -> None:
        self.status = status
        self._collect(list(self.wanted))

    def on_error(self, message: str) -> None:
        self.worker.send({"type": "failed", "job": self.job, "reason": f"in-guest agent: {message}"})
        self.worker.forget(self.job)

    def _collect(self, remaining: list[str]) -> None:
        if not remaining:
            self._finish()
            return
        path = remaining.pop(0)

        def got(data: bytes | None, error: str | None) -> None:
            if data is None:
                self.missing.append(path)
            else:
                self.collected[path] = data
            self._collect(remaining)

        self.worker.agent.fetch_file(f"{self.directory}/{path}", got)

    def _finish(self) -> None:
        if not self.cancelled:
            self.worker.send({"type": "finished", "job": self.job, "status": self.status, "outputs": self.collected,
                              "missing": self.missing, "runtime_s": time.monotonic() - self.started})
        self.worker.agent.run(["rm", "-rf", self.directory], _Discard())
        self.worker.forget(self.job)


class _Discard:
    def on_output(self, stream: str, data: bytes) -> None:
        pass

    def on_exit(self, status: int) -> None:
        pass

    def on_error(self, message: str) -> None:
        pass


class _Calibration(_Discard):
    """Times a fixed shell loop in the guest: the node's guest speed, in loop iterations per second."""

    def __init__(self, done: Callable[[float], None]) -> None:
        self._started = time.monotonic()
        self._done = done

    def on_exit(self, status: int) -> None:
        self._done(CALIBRATION_LOOPS / max(time.monotonic() - self._started, 1e-6))


class GuestWorker:
    def __init__(self, mem_mib: int, out_fd: int) -> None:
        self._out_fd = out_fd
        self._out_lock = threading.Lock()
        image = load_guest_image()
        self.machine = CoMachine(MachineConfig(mem_mib=mem_mib), lambda data: None, self._from_guest)
        self.agent = GuestAgentClient(self.machine.channel.send)
        self.agent.on_ready = self._on_guest_ready
        self.jobs: dict[int, _Job] = {}
        self._ready = False
        self._waiting: list[dict[str, Any]] = []
        self.machine.boot(image.kernel, image.initrd, BASE_CMDLINE + " quiet")

    def _from_guest(self, data: bytes) -> None:
        self.agent.feed(data)

    def send(self, message: dict[str, Any]) -> None:
        data = pack(message)
        with self._out_lock:
            view = memoryview(data)
            while view:
                written = os.write(self._out_fd, view)
                view = view[written:]

    def forget(self, job: int) -> None:
        self.jobs.pop(job, None)

    def _on_guest_ready(self, guest: str) -> None:
        loop = f"i=0; while [ $i -lt {CALIBRATION_LOOPS} ]; do i=$((i+1)); done"

        def calibrated(speed: float) -> None:
            self._ready = True
            self.send({"type": "ready", "guest": guest, "speed": speed})
            for message in self._waiting:
                self.handle(message)
            self._waiting.clear()

        self.agent.run(["sh", "-c", loop], _Calibration(calibrated))

    def handle(self, message: dict[str, Any]) -> None:
        """A message from the agent (on the machine thread)."""
        kind = message.get("type")
        if kind == "quit":
            self.machine.pause()
            return
        if not self._ready:
            self._waiting.append(message)
            return
        if kind == "run":
            job = _Job(self, int(message["job"]), list(message["argv"]), dict(message["inputs"]),
                       list(message["outputs"]))
            self.jobs[job.job] = job
            job.start()
        elif kind == "cancel":
            job = self.jobs.get(int(message["job"]))
            if job is not None:
                job.cancelled = True
                if job.command is not None:
                    self.agent.kill(job.command, 9)

    def run(self) -> MachineExit:
        return self.machine.run()


def _read_commands(worker: GuestWorker, in_fd: int) -> None:
    unpacker = Unpacker()
    while True:
        try:
            data = os.read(in_fd, 1 << 16)
        except OSError:
            data = b""
        if not data:  # the agent is gone: stop the guest
            worker.machine.call_soon(lambda: worker.handle({"type": "quit"}))
            return
        try:
            messages = unpacker.feed(data)
        except PipeError:
            worker.machine.call_soon(lambda: worker.handle({"type": "quit"}))
            return
        for message in messages:
            worker.machine.call_soon(lambda message=message: worker.handle(message))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conode-worker", description="Run jobs in one cooperative guest.")
    parser.add_argument("--mem", type=int, default=128, help="guest memory in MiB")
    args = parser.parse_args(argv)
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the message stream
    try:
        os.nice(19)  # the owner's work always comes first
    except OSError:
        pass
    try:
        worker = GuestWorker(args.mem, out_fd)
        threading.Thread(target=_read_commands, args=(worker, sys.stdin.fileno()), daemon=True).start()
        outcome = worker.run()
    except ConodeError as exc:
        print(f"conode-worker: error: {exc}", file=sys.stderr)
        return 1
    if outcome is not MachineExit.PAUSED:
        print(f"conode-worker: guest stopped unexpectedly ({outcome.value})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
