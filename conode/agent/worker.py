"""A guest worker: one process that runs jobs, each in a fresh guest restored from the pristine snapshot.

The agent starts one worker per core it offers (``python -m conode.agent.worker``), so a crash takes down only
its own process. Messages from the agent arrive on stdin, messages to the agent leave on stdout, both as
length-prefixed msgpack (pipe.py):

- agent → worker: ``run`` (job, argv, inputs, outputs, and optionally net: the guest's conet port and identity,
  and disk: the pool image the guest boots from, its overlay file and budget, see wire.py), ``cancel`` (job),
  ``pause``, ``resume``, ``vacate`` (path), ``quit``, ``plug`` (token, socket: the conet port of a guest resumed
  from disk, which keeps its identity), ``restore`` (job, pieces: a checkpoint chain to go on from, and net and
  disk as for run), ``checkpoint_reset`` (job: the next checkpoint must hold every page); run and restore may
  carry checkpoint (dir, interval_s, seq: checkpointer.py), and ``checkpoint_start`` (job, checkpoint, outputs:
  the offsets as the guest came to this worker) starts them for a guest resumed from a vacate or moved here
  (interval_s 0: a gang's rank, checkpointed only in its gang's cuts); ``cut`` (job, cut, hold_s: pre-copy a
  piece now), ``cut_final`` (job, cut: every rank's is pre-copied: make the final copy, then keep the guest still)
  and ``cut_resume`` (job, cut: every rank's piece is taken);
- worker → agent: ``ready`` (guest, speed), ``output`` (job, stream, data), ``finished`` (job, status, outputs,
  missing, runtime_s), ``failed`` (job, reason), ``paused`` (at: the wall time the guest stopped executing),
  ``resumed``, ``vacated`` (path, jobs, and checkpoint: what its checkpoints go on from), ``checkpoint`` (job,
  seq, base, path, size, sha256 and figures), ``cut_ready`` (job, cut: a cut's piece is pre-copied),
  ``cut_taken`` (job, cut, seq: its final copy is made; the guest stands still), ``cut_failed`` (job, cut,
  reason: its piece could not be taken or written) and ``cut_resumed`` (job, cut, held_s: how long it stood
  still after it).

**A fresh guest for every job.** The worker keeps the *pristine* post-boot snapshot: made by the host from a
boot in which no job ran (``--boot-snapshot`` keeps it on disk for the next worker, tied to the guest image's
digests), never on anything a guest says. Each job gets its own copy, restored in a fraction of a second,
renewed with fresh entropy and the host's clock before any job code runs, and discarded when the job ends, is
cancelled, breaks the host-channel protocol or crashes the guest — the job then fails with the reason, and the
worker takes the next one. ``vacate`` saves the running guest, job included, and ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from conode.agent.checkpointer import Checkpointer
from conode.agent.pipe import PipeError, Unpacker, pack
from conode.agent.platform import lower_priority
from conode.agent.wire import validate_to_worker
from conode.agent.worker_moves import receive_guest, send_guest
from conode.conet.frames import announcement
from conode.conet.port import Port, PortError
from conode.errors import ConodeError
from conode.vm.checkpoint import STREAMS, guest_state, materialize, read_piece
from conode.vm.cpu.unicorn_cpu import RamImage
from conode.vm.disk.config import DiskConfig
from conode.vm.guest import Guest, GuestSnapshot, ImageDigests, JobSpec
from conode.vm.guest_image import load_guest_image
from conode.vm.machine import CoMachine, MachineConfig
from conode.vm.net_identity import NetIdentity

CALIBRATION_LOOPS = 300
BOOT_TIMEOUT_S = 120.0
ANNOUNCEMENTS = 3  # gratuitous ARPs sent for a guest plugged in again (one may be lost on a busy switch)


class GuestWorker:
    """Runs the agent's jobs one at a time, each in its own guest."""

    def __init__(self, mem_mib: int, out_fd: int, boot_snapshot: Path | None = None,
                 resume: Path | None = None, cpu_cap: float = 1.0) -> None:
        self._out_fd = out_fd
        self._out_lock = threading.Lock()
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.mem_mib = mem_mib
        self.cpu_cap = cpu_cap
        self._boot_snapshot = boot_snapshot
        self._resume = resume
        self.pristine: GuestSnapshot | None = None
        self._pristine_ram: RamImage | None = None  # the pristine RAM, mapped copy-on-write by each fresh guest
        self.guest: Guest | None = None
        self.speed = 0.0
        self._runs: deque[dict[str, Any]] = deque()  # run messages not started yet
        self._control: dict[str, Any] | None = None  # pause, vacate or quit, taken between slices
        self._cancelled = False  # the running guest's job was cancelled: discard it silently
        self._running: Guest | None = None  # the guest on the CPU right now (a job's, the boot's, calibration's)
        self._port: Port | None = None  # the job guest's conet port, when the agent gave it one
        # The post-boot snapshot of a guest on a pool image (its base file and disk budget), made like the
        # pristine one: kept for the last image used, so that the next job on it starts without a boot.
        self._image_pristine: tuple[tuple[str, int], GuestSnapshot, RamImage] | None = None
        self._checkpointer: Checkpointer | None = None  # the job guest's, when the agent asked for checkpoints
        # Output the job guest wrote in this worker: what a checkpoint_start that comes after the guest started
        # here (resumed from a vacate, or moved here) adds to the offsets it names.
        self._written = dict.fromkeys(STREAMS, 0)
        self.called_off = threading.Event()  # the agent called the current move off (worker_moves.py)
        self._stash: deque[dict[str, Any]] = deque()  # messages read while waiting for a move's answer

    # --- the pristine guest -----------------------------------------------------------------------------
    def _load_pristine(self) -> None:
        """The post-boot snapshot from disk if it belongs to this image, else a fresh boot (saved for later)."""
        image = load_guest_image()
        digests = ImageDigests.of(image)
        path = self._boot_snapshot
        if path is not None and path.exists():
            try:
                snapshot = GuestSnapshot.read(path)
                if snapshot.image == digests and snapshot.job is None and \
                        CoMachine.config_from_state(snapshot.machine).mem_mib == self.mem_mib:
                    self.pristine = snapshot
                    return
                self._log(f"boot snapshot {path} is for another image or size; booting")
            except ConodeError as exc:
                self._log(f"boot snapshot unusable ({exc}); booting")
        booted = self._boot(MachineConfig(mem_mib=self.mem_mib))
        self.pristine = booted.snapshot()
        if path is not None:
            try:
                self.pristine.write(path)
            except ConodeError as exc:
                self._log(f"cannot save the boot snapshot: {exc}")

    def _boot(self, config: MachineConfig) -> Guest:
        """Boot a guest from the built-in image until its in-guest agent is ready; it is left paused there."""
        booted = Guest.boot(load_guest_image(), config)
        booted.on_ready = lambda name: booted.machine.pause()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        timer = threading.Timer(BOOT_TIMEOUT_S, booted.machine.pause)
        timer.daemon = True
        timer.start()
        try:
            while not booted.agent.ready and booted.failure is None and time.monotonic() < deadline:
                self._run_guest(booted)
        finally:
            timer.cancel()
        if booted.failure is not None or not booted.agent.ready:
            booted.machine.close()
            raise ConodeError(f"the guest did not boot: {booted.failure or f'not ready within {BOOT_TIMEOUT_S:g} s'}")
        booted.on_ready = lambda name: None
        return booted

    def _disk_guest(self, disk: dict[str, Any]) -> Guest:
        """A fresh guest whose root file system is the job's pool image, seen through its own overlay: restored
        from the post-boot snapshot of a guest on that image (booted for it, once per image, with no job)."""
        key = (str(disk["base"]), int(disk["budget_mib"]))
        if self._image_pristine is None or self._image_pristine[0] != key:
            self._image_pristine = None  # one at a time: a guest's RAM is large
            config = DiskConfig(Path(disk["base"]), None, int(disk["budget_mib"]), root=True)
            booted = self._boot(MachineConfig(mem_mib=self.mem_mib, disk=config))
            snapshot = booted.snapshot()
            booted.machine.close()
            self._image_pristine = (key, snapshot, snapshot.ram_image())
        _, pristine, ram = self._image_pristine
        guest = Guest.restore(pristine, new_identity=True, ram_image=ram, disk_overlay=Path(disk["overlay"]))
        guest.machine.cpu_cap = self.cpu_cap
        return guest

    def _fresh_guest(self) -> Guest:
        if self.pristine is None:
            self._load_pristine()
        assert self.pristine is not None
        if self._pristine_ram is None:
            self._pristine_ram = self.pristine.ram_image()
        guest = Guest.restore(self.pristine, new_identity=True, ram_image=self._pristine_ram)
        guest.machine.cpu_cap = self.cpu_cap
        return guest

    def _calibrate(self) -> None:
        """Time a fixed shell loop in a throwaway guest: the node's guest speed, in loop iterations per second."""
        guest = self._fresh_guest()
        started = time.monotonic()
        took: list[float] = []

        def done(status: int) -> None:
            took.append(time.monotonic() - started)
            guest.machine.pause()

        guest.run_host_command(["sh", "-c", f"i=0; while [ $i -lt {CALIBRATION_LOOPS} ]; do i=$((i+1)); done"],
                               done)
        while not took and guest.failure is None:
            self._run_guest(guest)
        if took:
            self.speed = CALIBRATION_LOOPS / max(took[0], 1e-6)
        self.discard(guest)

    def _run_guest(self, guest: Guest) -> None:
        """Run *guest* until it pauses, then carry out what the agent asked meanwhile (pause, vacate, quit)."""
        checkpointer = self._checkpointer if self._checkpointer is not None and \
            self._checkpointer.guest is guest else None
        if checkpointer is not None and checkpointer.final_due and not guest.finished:
            checkpointer.guest_stopped()  # it was stopped already (by its owner): the final copy is due now
            self._final_copy(checkpointer)
            if self._control is not None or self._cancelled:
                return  # told to stop while it stood still for its gang's cut
        self._running = guest
        try:
            guest.run()
        finally:
            self._running = None
        if checkpointer is not None:
            checkpointer.guest_stopped()
        self.drain_inbox()
        if self._control is not None and self._obey_control():
            raise _Exit
        if checkpointer is not None and checkpointer.final_due and not guest.finished and not self._cancelled:
            self._final_copy(checkpointer)  # the guest stops only for this (and, for a gang's cut, its hold)

    def _final_copy(self, checkpointer: Checkpointer) -> None:
        """The final copy of a piece; for a gang's cut, the guest then stays still until the agent passes on the
        coordinator's cut_resume (every rank's piece taken), for hold_s at most, or until told to stop."""
        checkpointer.final()
        hold = checkpointer.held()
        if hold is None:
            return
        cut, seq, hold_s = hold
        self.send({"type": "cut_taken", "job": checkpointer.job, "cut": cut, "seq": seq})
        started = time.monotonic()
        while (left := started + hold_s - time.monotonic()) > 0:
            message = self._next_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "cut_resume" and message.get("cut") == cut:
                break
            self.handle(message)
            if self._control is not None or self._cancelled:
                break  # carried out as soon as this returns
        else:
            self._log(f"job {checkpointer.job}: no word on cut {cut} within {hold_s:g} s; the guest goes on")
        self.send({"type": "cut_resumed", "job": checkpointer.job, "cut": cut, "held_s": time.monotonic() - started})

    def discard(self, guest: Guest) -> None:
        if self._checkpointer is not None and self._checkpointer.guest is guest:
            self._checkpointer.close()
            self._checkpointer = None
        if self.guest is guest:
            self.guest = None
            self._written = dict.fromkeys(STREAMS, 0)
            if self._port is not None:
                self._port.close()
                self._port = None
        guest.machine.close()
        del guest
        gc.collect()  # the machine holds Unicorn and its RAM in reference cycles: free them now

    # --- JobSink: results to the agent -----------------------------------------------------------------
    def output(self, job: int, stream: str, data: bytes) -> None:
        if self.guest is not None and self.guest.job is not None and self.guest.job.spec.id == job:
            self._written[stream] += len(data)
        if self._checkpointer is not None and self._checkpointer.job == job:
            self._checkpointer.outputs[stream] += len(data)  # where the job's output goes on from a checkpoint
        self.send({"type": "output", "job": job, "stream": stream, "data": data})

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None:
        self.send({"type": "finished", "job": job, "status": status, "outputs": outputs, "missing": missing,
                   "runtime_s": runtime_s})

    def failed(self, job: int, reason: str) -> None:
        self.send({"type": "failed", "job": job, "reason": reason})

    def send(self, message: dict[str, Any]) -> None:
        data = pack(message)
        with self._out_lock:
            view = memoryview(data)
            while view:
                written = os.write(self._out_fd, view)
                view = view[written:]

    @staticmethod
    def _log(line: str) -> None:
        print(f"conode-worker: {line}", file=sys.stderr, flush=True)

    # --- the agent's messages -----------------------------------------------------------------------------
    def wake(self) -> None:
        """A message arrived (called by the reader thread after queueing it)."""
        guest = self._running
        if guest is not None:
            guest.machine.call_soon(self.drain_inbox)

    def drain_inbox(self) -> None:
        """Handle the agent's messages (on the machine thread, between slices)."""
        while (message := self._next_message(block=False)) is not None:
            self.handle(message)

    def _next_message(self, block: bool = True, timeout: float | None = None) -> dict[str, Any] | None:
        if self._stash:
            return self._stash.popleft()
        try:
            return self.inbox.get(block, timeout)
        except queue.Empty:
            return None

    def await_move_answer(self, job: int, timeout_s: float) -> dict[str, Any] | None:
        """The agent's move_go or move_abort for *job* (None if none came within *timeout_s*); what else
        arrives meanwhile is kept, in order, for later."""
        deadline = time.monotonic() + timeout_s
        kept: list[dict[str, Any]] = []
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = self._next_message(True, left)
                if message is None:
                    return None
                if message.get("type") in ("move_go", "move_abort") and message.get("job") == job:
                    return message
                kept.append(message)
            return None
        finally:
            self._stash.extend(kept)

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        guest = self._running
        if kind in ("pause", "vacate", "quit", "migrate"):
            self._control = message
            if guest is not None:
                guest.machine.pause()
        elif kind in ("run", "restore", "receive"):
            self._runs.append(message)
        elif kind == "checkpoint_start":  # a guest resumed from a vacate or moved here: its checkpoints go on
            if self.guest is not None and self.guest.job is not None and self.guest.job.spec.id == message["job"] \
                    and self._checkpointer is None:
                outputs = {s: message["outputs"][s] + self._written[s] for s in STREAMS}
                self._start_checkpoints(message["job"], message, outputs)
        elif kind == "checkpoint_reset":
            if self._checkpointer is not None and self._checkpointer.job == message.get("job"):
                self._checkpointer.reset()
        elif kind == "cut":
            if self._checkpointer is not None and self._checkpointer.job == message.get("job"):
                self._checkpointer.cut(message["cut"], message["hold_s"])
        elif kind == "cut_final":
            if self._checkpointer is not None and self._checkpointer.job == message.get("job"):
                self._checkpointer.final_now(message["cut"])
        elif kind == "cut_resume":
            pass  # a cut whose hold ended already (the guest went on, or never stopped for it)
        elif kind == "plug":  # a guest resumed from disk or moved here: its NIC joins the switch again
            if self.guest is not None:
                self._join_conet(self.guest, message["socket"], message["token"])
                self._announce(self.guest)
        elif kind == "cancel":
            job = message.get("job")
            self._runs = deque(m for m in self._runs if m.get("job") != job)
            if self.guest is not None and self.guest.job is not None and self.guest.job.spec.id == job:
                self._cancelled = True
                self.guest.machine.pause()

    def _start_next_job(self) -> None:
        message = self._runs.popleft()
        if message["type"] == "restore":
            self._restore_job(message)
            return
        if message["type"] == "receive":  # a guest moving here from another agent, its job running
            self.guest = receive_guest(self, message)
            if self.guest is not None:
                self.guest.machine.cpu_cap = self.cpu_cap
            return
        net = message.get("net")
        spec = JobSpec.in_job_directory(int(message["job"]), list(message["argv"]), dict(message["inputs"]),
                                        list(message["outputs"]), NetIdentity.from_message(net) if net else None)
        self._cancelled = False
        try:
            self.guest = self._disk_guest(message["disk"]) if "disk" in message else self._fresh_guest()
        except ConodeError as exc:  # its disk cannot be opened, or the guest does not boot from it
            self.failed(spec.id, f"the job's guest could not start: {exc}")
            return
        except _Exit:  # told to quit or vacate while the job's guest booted: nothing of the job ran yet
            self.failed(spec.id, "the workstation's owner came back while the job's guest booted")
            raise
        if net and "token" in net:
            self._join_conet(self.guest, net["socket"], net["token"])
        self.guest.start_job(spec, self)
        self._start_checkpoints(spec.id, message, {})

    def _restore_job(self, message: dict[str, Any]) -> None:
        """Go on with a job from its checkpoint chain (taken on another workstation): its RAM, devices, disk
        overlay, conet identity and output offsets as they were at the chain's last piece."""
        job = int(message["job"])
        self._cancelled = False
        image: RamImage | None = None
        try:
            pieces = [read_piece(Path(path)) for path in message["pieces"]]
            if any(piece.job != job for piece in pieces):
                raise ConodeError(f"the checkpoint is not of job {job}")
            image = RamImage(pieces[0].ram.size)
            with image.writable() as memory:
                materialize(pieces, memoryview(memory))
            snapshot = guest_state(pieces)
            disk = message.get("disk")
            guest = Guest.restore(snapshot, self, ram_image=image,
                                  disk_base=Path(disk["base"]) if disk else None,
                                  disk_overlay=Path(disk["overlay"]) if disk else None)
        except ConodeError as exc:
            self.failed(job, f"the job could not go on from its checkpoint: {exc}")
            return
        finally:
            if image is not None:
                image.close()  # the guest maps its own private copy
        if guest.job is None or guest.job.spec.id != job:
            guest.machine.close()
            self.failed(job, "the checkpoint holds another job's guest")
            return
        guest.machine.cpu_cap = self.cpu_cap
        self.guest = guest
        net = message.get("net")
        if net and "token" in net:
            self._join_conet(guest, net["socket"], net["token"])
            self._announce(guest)  # its MAC was behind another agent's switch
        self._log(f"job {job} goes on from checkpoint piece {pieces[-1].seq}")
        self._start_checkpoints(job, message, pieces[-1].outputs)

    def _start_checkpoints(self, job: int, message: dict[str, Any], outputs: dict[str, int]) -> None:
        settings = message.get("checkpoint")
        if settings is not None and self.guest is not None:  # interval 0: a gang's rank, checkpointed in cuts
            self._checkpointer = Checkpointer(self.guest, job, float(settings["interval_s"]), Path(settings["dir"]),
                                              int(settings["seq"]), outputs, self.send)

    def _join_conet(self, guest: Guest, path: str, token: bytes) -> None:
        """Plug the guest's NIC into the agent's switch; without it the guest runs with its link down."""
        if self._port is not None:
            self._port.close()
            self._port = None
        try:
            self._port = Port(path, token)
        except PortError as exc:
            self._log(str(exc))
            return
        self._port.attach(guest.machine.nic, guest.machine.call_soon, guest.machine.watch)

    def _announce(self, guest: Guest) -> None:
        """Tell the switches where the guest's MAC is now (it may have been behind another agent's)."""
        net = guest.job.spec.net if guest.job is not None else None
        if net is not None and self._port is not None:
            for _ in range(ANNOUNCEMENTS):
                self._port.send(announcement(net.mac, net.ip))

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run jobs, pausing and resuming as the agent says; return the process exit status."""
        try:
            self._serve()
        except _Exit:
            pass
        return 0

    def _serve(self) -> None:
        if self._resume is not None:
            self.guest = Guest.restore(GuestSnapshot.read(self._resume), self)
            self.guest.machine.cpu_cap = self.cpu_cap
        else:
            self._load_pristine()
            self._calibrate()
        name = self.guest.agent.guest if self.guest is not None else self._guest_name()
        self.send({"type": "ready", "guest": name or "", "speed": self.speed})
        while True:
            self.drain_inbox()
            if self._control is not None:
                if self._obey_control():
                    return
                continue
            if self.guest is None:
                if self._runs:
                    self._start_next_job()
                else:
                    self.handle(self._next_message())  # type: ignore[arg-type]
                continue
            guest = self.guest
            self._run_guest(guest)
            if guest.finished or self._cancelled:
                self.discard(guest)

    def _guest_name(self) -> str:
        return str(self.pristine.agent.get("guest") or "") if self.pristine is not None else ""

    def _obey_control(self) -> bool:
        """Carry out pause, vacate or quit; True when the worker should exit."""
        stopped_at = time.time()
        control, self._control = self._control, None
        paused = False
        while control is not None:
            kind = control["type"]
            if kind == "quit":
                return True
            if kind == "migrate":
                send_guest(self, control, live=not paused)
                control = self._wait_while_paused() if paused else None
                continue
            if kind == "vacate":
                path = Path(control["path"])
                jobs = []
                carried: dict[str, Any] = {}
                if self.guest is not None and self.guest.job is not None and not self.guest.finished:
                    self.guest.save(path)
                    jobs = [self.guest.job.spec.id]
                    if self._checkpointer is not None and self._checkpointer.job == jobs[0]:
                        carried["checkpoint"] = self._checkpointer.carried_over()
                self.send({"type": "vacated", "path": str(path), "jobs": jobs, **carried})
                return True
            if kind == "pause":
                self.send({"type": "paused", "at": stopped_at})
                paused = True
                control = self._wait_while_paused()
            else:  # resume
                self.send({"type": "resumed"})
                control = None
        return False

    def _wait_while_paused(self) -> dict[str, Any]:
        """Block (the guest stays stopped, its clock frozen) until resume, vacate or quit; queue the rest."""
        while True:
            message = self._next_message()
            assert message is not None
            if message.get("type") in ("resume", "vacate", "quit", "migrate"):
                return message
            self.handle(message)
            if self._cancelled and self.guest is not None:
                self.discard(self.guest)
            self._control = None  # handle() may have asked the (already stopped) machine to pause


class _Exit(Exception):
    """The agent said quit or vacate: unwind to the end of the process."""


def _read_commands(worker: GuestWorker, in_fd: int) -> None:
    unpacker = Unpacker()
    while True:
        try:
            data = os.read(in_fd, 1 << 16)
        except OSError:
            data = b""
        try:
            messages = [validate_to_worker(m) for m in unpacker.feed(data)] if data else [{"type": "quit"}]
        except PipeError as exc:  # EOF above: the agent is gone; garbage here: it is not the agent
            print(f"conode-worker: the agent sent garbage ({exc}); quitting", file=sys.stderr)
            messages = [{"type": "quit"}]
        for message in messages:
            if message["type"] == "move_abort":
                worker.called_off.set()  # a move's waits look at it: no need to wait for the loop
            worker.inbox.put(message)
        worker.wake()
        if not data or messages[-1:] == [{"type": "quit"}]:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conode-worker", description="Run jobs in cooperative guests.")
    parser.add_argument("--mem", type=int, default=128, help="guest memory in MiB")
    parser.add_argument("--cpu-cap", type=float, default=100.0, help="percent of one core the guest may use")
    parser.add_argument("--boot-snapshot", type=Path, default=None,
                        help="the pristine post-boot snapshot: used if it exists and fits, else made and written")
    parser.add_argument("--resume", type=Path, default=None, help="continue a vacated guest, job included")
    args = parser.parse_args(argv)
    out_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the message stream
    lower_priority()  # the owner's work always comes first
    try:
        worker = GuestWorker(args.mem, out_fd, args.boot_snapshot, args.resume,
                             max(0.01, min(args.cpu_cap, 100.0)) / 100.0)
        threading.Thread(target=_read_commands, args=(worker, sys.stdin.fileno()), daemon=True).start()
        return worker.run()
    except ConodeError as exc:
        print(f"conode-worker: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
