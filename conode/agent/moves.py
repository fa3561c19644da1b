"""The agent's part in moving guests (coordinator/moves.py decides, conode/agent/worker_moves.py moves).

As a source, the agent tells the job's worker where to send its guest and relays the coordinator's answer to its
``move_ready`` (GO, or called off); as a destination, it gives a free worker the guest to take in, then plugs the
guest's conet identity back in here. Every message to the coordinator carries the move's epoch; a coordinator
message whose epoch is not the one this agent holds for the job is ignored. Each move is logged with its figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conode.agent.images import ImageSpec

if TYPE_CHECKING:
    from conode.agent.guests import Guests, Reports, WorkerSlot

log = logging.getLogger("conode.agent")


@dataclass
class Incoming:
    epoch: int
    slot: WorkerSlot
    port: dict[str, Any] | None  # the guest's conet identity (mac, ip, network), plugged in once it runs here
    image: str | None  # the SHA-256 of the image its disk is on


@dataclass(frozen=True)
class MoveSettings:
    keys_dir: str  # the agent's key pair, which the workers use for the link to the other agent
    public_key: str
    bind: str  # where a receiving worker listens: tcp://ADDRESS:* on the pool's network
    max_bytes_per_s: float = 0.0  # 0: as fast as the link goes


class AgentMoves:
    def __init__(self, guests: Guests, reports: Reports, settings: MoveSettings) -> None:
        self._guests = guests
        self._reports = reports
        self._settings = settings
        self.incoming: dict[int, Incoming] = {}
        self.outgoing: dict[int, int] = {}  # job -> epoch, while its guest is being sent

    # --- the coordinator's messages -----------------------------------------------------------------------
    def on_coordinator(self, message: dict[str, Any]) -> None:
        kind, job, epoch = message["type"], int(message["job"]), int(message["epoch"])
        if kind == "move_in":
            self._move_in(message, job, epoch)
        elif kind == "move_out":
            self._move_out(message, job, epoch)
        elif kind == "move_go" and self.outgoing.get(job) == epoch:
            self._guests.send_to(self._guests.jobs[job], {"type": "move_go", "job": job})
        elif kind == "move_abort":
            self._abort(job, epoch, message["reason"])

    def _move_in(self, message: dict[str, Any], job: int, epoch: int) -> None:
        guests = self._guests
        slot = guests.free_slot()
        problem = ("no free guest slot here" if slot is None else
                   f"needs {message['mem_mib']} MiB, guests here have {guests.mem_mib}"
                   if message["mem_mib"] > guests.mem_mib else None)
        receive: dict[str, Any] = {"type": "receive", "job": job, "bind": self._settings.bind,
                                   "peer": message["source_key"], "keys": self._settings.keys_dir}
        image = None
        if problem is None and "image" in message:
            spec = ImageSpec.of(message["image"])
            base = guests.image_path(spec)
            if base is None:
                problem = f"{spec.shown} is not in this agent's image cache yet"
            else:
                image = spec.sha256
                receive.update(base=str(base), overlay=str(guests.overlay_path(job)))
        if problem is not None or slot is None or job in guests.held_jobs():
            self._reports.report("move_failed", job=job, epoch=epoch,
                                 reason=problem or f"job {job} is here already")
            return
        net = message.get("net")
        port = {"mac": net["mac"], "ip": net["ip"], "network": net["network"]} if net else None
        self.incoming[job] = Incoming(epoch, slot, port, image)
        slot.receiving = job
        guests.send_to(slot, receive)

    def _move_out(self, message: dict[str, Any], job: int, epoch: int) -> None:
        slot = self._guests.jobs.get(job)
        if slot is None or job in self.outgoing:
            self._reports.report("move_failed", job=job, epoch=epoch, reason=f"job {job} does not run here")
            return
        self.outgoing[job] = epoch
        limit = {"max_bytes_per_s": self._settings.max_bytes_per_s} if self._settings.max_bytes_per_s else {}
        self._guests.send_to(slot, {"type": "migrate", "job": job, "endpoint": message["endpoint"],
                                    "peer": message["key"], "keys": self._settings.keys_dir, **limit})

    def _abort(self, job: int, epoch: int, reason: str) -> None:
        incoming = self.incoming.get(job)
        if incoming is not None and incoming.epoch == epoch:
            del self.incoming[job]  # the slot stays busy until its worker has given up
            self._guests.send_to(incoming.slot, {"type": "move_abort", "job": job, "reason": reason})
            log.info("move of job %d here called off: %s", job, reason)
        elif self.outgoing.get(job) == epoch:
            self._guests.send_to(self._guests.jobs[job], {"type": "move_abort", "job": job, "reason": reason})
            log.info("move of job %d away called off: %s", job, reason)

    def cancel(self, job: int) -> None:
        """The coordinator does not expect *job* here (it restarted, and called the move off)."""
        incoming = self.incoming.get(job)
        if incoming is not None:
            self._abort(job, incoming.epoch, "the coordinator cancelled it")

    # --- the workers' messages ----------------------------------------------------------------------------
    def on_worker(self, slot: WorkerSlot, message: dict[str, Any]) -> None:
        kind, job = message["type"], int(message["job"])
        if kind == "listening":
            incoming = self.incoming.get(job)
            if incoming is not None and incoming.slot is slot:
                self._reports.report("move_listening", job=job, epoch=incoming.epoch, endpoint=message["endpoint"],
                                     key=self._settings.public_key)
        elif kind == "move_ready" and job in self.outgoing:
            self._reports.report("move_ready", job=job, epoch=self.outgoing[job])
        elif kind == "moved_out" and job in self.outgoing:
            self._left(slot, job)
            figures = {k: message[k] for k in ("downtime_s", "total_s", "bytes", "rounds") if k in message}
            self._reports.report("move_sent", job=job, epoch=self.outgoing.pop(job), **figures)
            downtime = message.get("downtime_s")
            log.info("job %d moved out: downtime %s, paused %.0f ms (last %d pages sent at %.0f ms, the destination "
                     "ready at %.0f, handed over at %.0f), total %.2f s, %.1f MB in %d rounds", job,
                     "unknown" if downtime is None else f"{downtime * 1000:.0f} ms", message["paused_s"] * 1000,
                     message.get("final_pages", 0), message.get("sent_s", 0.0) * 1000,
                     message.get("ready_s", 0.0) * 1000, message.get("handed_s", 0.0) * 1000, message["total_s"],
                     message["bytes"] / 1e6, message["rounds"])
        elif kind == "moved_in":
            self._arrived(slot, job, message)
        elif kind == "move_failed":
            self._failed(slot, job, message["reason"], message["handed_over"])

    def _left(self, slot: WorkerSlot, job: int) -> None:
        guests = self._guests
        guests.jobs.pop(job, None)
        guests.forget(job)
        if slot.job == job:
            slot.job = None
        guests.dispatch()

    def _arrived(self, slot: WorkerSlot, job: int, message: dict[str, Any]) -> None:
        slot.receiving = None
        incoming = self.incoming.pop(job, None)
        guests = self._guests
        if incoming is None or incoming.slot is not slot:  # called off meanwhile, or the coordinator restarted:
            guests.jobs[job] = slot  # it runs here now; the coordinator's word (a cancel, if it is not ours)
            slot.job = job
            return
        guests.jobs[job] = slot
        slot.job = job
        if incoming.image is not None:
            guests.job_images[job] = incoming.image
        guests.rejoin_conet(slot, job, incoming.port)
        self._reports.report("move_arrived", job=job, epoch=incoming.epoch)
        log.info("job %d moved in: %d rounds, %.1f MB received; it runs here now", job, message["rounds"],
                 message["bytes"] / 1e6)

    def _failed(self, slot: WorkerSlot, job: int, reason: str, handed_over: bool) -> None:
        if job in self.outgoing:
            epoch = self.outgoing.pop(job)
            if handed_over:  # the destination owns it: the guest never runs here again
                self._left(slot, job)
                log.warning("job %d left after the hand-over, without figures: %s", job, reason)
            else:
                log.warning("job %d could not move; it goes on here: %s", job, reason)
            self._reports.report("move_failed", job=job, epoch=epoch, reason=reason[:1000])
        elif slot.receiving == job:
            slot.receiving = None
            incoming = self.incoming.pop(job, None)
            self._guests.remove_overlay(job)
            if incoming is not None:
                self._reports.report("move_failed", job=job, epoch=incoming.epoch, reason=reason[:1000])
            log.warning("job %d did not move here: %s", job, reason)
            self._guests.dispatch()

    def worker_lost(self, slot: WorkerSlot, why: str) -> None:
        """The worker of *slot* died: a move it was taking part in failed."""
        if slot.receiving is not None:
            self._failed(slot, slot.receiving, f"the receiving worker died: {why}", False)
        for job in [job for job in self.outgoing if self._guests.jobs.get(job) is slot]:
            del self.outgoing[job]  # the job fails with the worker; the coordinator calls the move off
