"""A guest worker: one process, one cooperative guest, jobs run inside it.

The agent starts one worker per core it offers (``python -m conode.agent.worker``), so a guest crash takes down
only its own process. Messages from the agent arrive on stdin, messages to the agent leave on stdout, both as
length-prefixed msgpack (pipe.py):

- agent → worker: ``run`` (job, argv, inputs, outputs), ``cancel`` (job), ``pause``, ``resume``,
  ``vacate`` (path), ``quit``;
- worker → agent: ``ready`` (guest, speed), ``output`` (job, stream, data), ``finished`` (job, status, outputs,
  missing, runtime_s), ``failed`` (job, reason), ``paused`` (at: the wall time the guest stopped executing),
  ``resumed``, ``vacated`` (path, jobs).

Each job runs in ``/job/<id>`` in the guest: inputs are written there first, outputs are read from there after.
Booting is the slow part of starting a worker, so the first worker to boot saves a post-boot snapshot
(``--boot-snapshot``) that later workers resume from in a fraction of a second. ``vacate`` saves the whole guest,
jobs included, and ``--resume`` continues it, here or on another machine.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from conode.agent.pipe import PipeError, Unpacker, pack
from conode.errors import ConodeError
from conode.vm.guest_agent import GuestAgentClient
from conode.vm.guest_image import BASE_CMDLINE, load_guest_image
from conode.vm.machine import CoMachine, MachineConfig, MachineExit
from conode.vm.snapshot import read_snapshot, write_snapshot

CALIBRATION_LOOPS = 300
SNAPSHOT_KIND = "conode-worker"


class _Job:
    """One job's progress: staging inputs, running, collecting outputs. Its state survives a snapshot."""

    def __init__(self, worker: "GuestWorker", job: int, argv: list[str], inputs: dict[str, bytes],
                 outputs: list[str], ran_s: float = 0.0) -> None:
        self.worker = worker
        self.job = job
        self.argv = argv
        self.inputs = inputs
        self.wanted = outputs
        self.directory = f"/job/{job}"
        self.ran_before_s = ran_s  # run time before the last snapshot
        self.started = time.monotonic()
        self.command: int | None = None
        self.status: int | None = None
        self.collected: dict[str, bytes] = {}
        self.missing: list[str] = []
        self.cancelled = False

    # --- snapshots -----------------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {"job": self.job, "argv": self.argv, "inputs": self.inputs, "wanted": self.wanted,
                "command": self.command, "status": self.status,
                "ran_s": self.ran_before_s + time.monotonic() - self.started}

    @classmethod
    def from_state(cls, worker: "GuestWorker", state: dict[str, Any]) -> "_Job":
        job = cls(worker, state["job"], state["argv"], state["inputs"], state["wanted"], state["ran_s"])
        job.command = state["command"]
        job.status = state["status"]
        return job

    def continue_after_restore(self) -> None:
        """Transfers in flight at snapshot time are not in the snapshot: redo the phase that was under way."""
        if self.command is None:
            self.start()  # was staging inputs
        elif self.status is None:
            self.worker.agent.attach(self.command, self)  # still running in the guest
        else:
            self._collect(list(self.wanted))  # was collecting outputs

    # --- phases --------------------------------------------------------------------------------------------
    def start(self) -> None:
        remaining = [len(self.inputs)]
        if not self.inputs:
            self._run()
            return

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
        if not self.cancelled:
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
                              "missing": self.missing,
                              "runtime_s": self.ran_before_s + time.monotonic() - self.started})
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
    def __init__(self, mem_mib: int, out_fd: int, boot_snapshot: Path | None = None,
                 resume: Path | None = None) -> None:
        self._out_fd = out_fd
        self._out_lock = threading.Lock()
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.jobs: dict[int, _Job] = {}
        self._ready = False
        self._waiting: list[dict[str, Any]] = []
        self._boot_snapshot = boot_snapshot
        self._save_boot_snapshot = False  # set once the first boot is calibrated
        self._control: dict[str, Any] | None = None  # pause, resume, vacate or quit, taken between slices
        self.speed = 0.0
        if resume is not None:
            self._restore(resume, with_jobs=True)
        elif boot_snapshot is not None and boot_snapshot.exists():
            try:
                self._restore(boot_snapshot, with_jobs=False)
            except ConodeError as exc:  # stale or damaged: boot afresh and replace it
                print(f"conode-worker: boot snapshot unusable ({exc}); booting", file=sys.stderr)
                self._boot(mem_mib)
        else:
            self._boot(mem_mib)

    # --- starting the guest ----------------------------------------------------------------------------------
    def _new_machine(self, config: MachineConfig) -> None:
        self.machine = CoMachine(config, lambda data: None, self._from_guest)
        self.agent = GuestAgentClient(self.machine.channel.send)

    def _boot(self, mem_mib: int) -> None:
        image = load_guest_image()
        self._new_machine(MachineConfig(mem_mib=mem_mib))
        self.agent.on_ready = self._on_guest_ready
        self.machine.boot(image.kernel, image.initrd, BASE_CMDLINE + " quiet")

    def _restore(self, path: Path, with_jobs: bool) -> None:
        state = read_snapshot(path)
        if state.get("kind") != SNAPSHOT_KIND:
            raise ConodeError(f"{path} is not a worker snapshot")
        self._new_machine(CoMachine.config_from_state(state["machine"]))
        self.machine.set_state(state["machine"])
        self.agent.set_state(state["agent"])
        # Every copy of a snapshot would otherwise draw the same random numbers: stir in fresh host entropy.
        self.agent.put_file("/dev/urandom", os.urandom(64), lambda error: None)
        self.speed = float(state["speed"])
        if with_jobs:
            for saved in state["jobs"]:
                job = _Job.from_state(self, saved)
                self.jobs[job.job] = job
                job.continue_after_restore()
        self._mark_ready()

    def _on_guest_ready(self, guest: str) -> None:
        loop = f"i=0; while [ $i -lt {CALIBRATION_LOOPS} ]; do i=$((i+1)); done"

        def calibrated(speed: float) -> None:
            self.speed = speed
            if self._boot_snapshot is not None:
                # Save the freshly booted guest before any job touches it; ready is announced after that.
                self._save_boot_snapshot = True
                self.machine.pause()
            else:
                self._mark_ready()

        self.agent.run(["sh", "-c", loop], _Calibration(calibrated))

    def _mark_ready(self) -> None:
        self._ready = True
        self.send({"type": "ready", "guest": self.agent.guest or "", "speed": self.speed})
        for message in self._waiting:
            self.handle(message)
        self._waiting.clear()

    def save(self, path: Path, with_jobs: bool) -> int:
        state = {"kind": SNAPSHOT_KIND, "machine": self.machine.get_state(), "agent": self.agent.get_state(),
                 "speed": self.speed, "jobs": [j.get_state() for j in self.jobs.values()] if with_jobs else []}
        return write_snapshot(path, state)

    # --- the agent's side ----------------------------------------------------------------------------------
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

    def drain_inbox(self) -> None:
        """Handle the agent's messages (on the machine thread, between slices)."""
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.handle(message)

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind in ("pause", "vacate", "quit"):
            self._control = message
            self.machine.pause()
            return
        if kind == "resume":
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
                if job.command is not None and job.status is None:
                    self.agent.kill(job.command, 9)
                else:
                    self.forget(job.job)

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the guest, pausing and resuming as the agent says; return the process exit status."""
        while True:
            outcome = self.machine.run()
            if outcome is not MachineExit.PAUSED:
                print(f"conode-worker: guest stopped unexpectedly ({outcome.value})", file=sys.stderr)
                return 1
            if self._save_boot_snapshot:
                self._save_boot_snapshot = False
                try:
                    self.save(self._boot_snapshot, with_jobs=False)  # type: ignore[arg-type]
                except ConodeError as exc:
                    print(f"conode-worker: cannot save the boot snapshot: {exc}", file=sys.stderr)
                self._mark_ready()
            control, self._control = self._control, None
            if control is None:
                continue
            stopped_at = time.time()
            while control is not None:
                kind = control["type"]
                if kind == "quit":
                    return 0
                if kind == "vacate":
                    path = Path(control["path"])
                    self.save(path, with_jobs=True)
                    self.send({"type": "vacated", "path": str(path), "jobs": sorted(self.jobs)})
                    return 0
                if kind == "pause":
                    self.send({"type": "paused", "at": stopped_at})
                    control = self._wait_while_paused()
                else:  # resume
                    self.send({"type": "resumed"})
                    control = None

    def _wait_while_paused(self) -> dict[str, Any]:
        """Block (the guest stays stopped, its clock frozen) until resume, vacate or quit; queue the rest."""
        while True:
            message = self.inbox.get()
            if message.get("type") in ("resume", "vacate", "quit"):
                return message
            self.handle(message)
            self._control = None  # handle() may have asked the (already stopped) machine to pause


def _read_commands(worker: GuestWorker, in_fd: int) -> None:
    unpacker = Unpacker()
    while True:
        try:
            data = os.read(in_fd, 1 << 16)
        except OSError:
            data = b""
        try:
            messages = unpacker.feed(data) if data else [{"type": "quit"}]  # EOF: the agent is gone
        except PipeError:
            messages = [{"type": "quit"}]
        for message in messages:
            worker.inbox.put(message)
        worker.machine.call_soon(worker.drain_inbox)
        if not data or messages[-1:] == [{"type": "quit"}]:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conode-worker", description="Run jobs in one cooperative guest.")
    parser.add_argument("--mem", type=int, default=128, help="guest memory in MiB")
    parser.add_argument("--cpu-cap", type=float, default=100.0, help="percent of one core the guest may use")
    parser.add_argument("--boot-snapshot", type=Path, default=None,
                        help="resume from this post-boot snapshot if it exists, else boot and write it")
    parser.add_argument("--resume", type=Path, default=None, help="continue a vacated guest, jobs included")
    args = parser.parse_args(argv)
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the message stream
    try:
        os.nice(19)  # the owner's work always comes first
    except OSError:
        pass
    try:
        worker = GuestWorker(args.mem, out_fd, args.boot_snapshot, args.resume)
        worker.machine.cpu_cap = max(0.01, min(args.cpu_cap, 100.0)) / 100.0
        threading.Thread(target=_read_commands, args=(worker, sys.stdin.fileno()), daemon=True).start()
        return worker.run()
    except ConodeError as exc:
        print(f"conode-worker: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
