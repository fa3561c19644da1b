"""A guest worker's part in moving its guest to another agent's worker, or taking one in (conode/migration over
the agents' CURVE link). The agent relays the coordinator's decisions; the worker never decides who owns a guest.

- source: ``migrate`` (job, endpoint, peer key, keys directory, bandwidth) → the guest streams out while it runs
  (or in one copy if it is paused); ``move_ready`` once the destination holds it all; the agent answers
  ``move_go`` (the coordinator recorded the hand-over) or ``move_abort``; then ``moved_out`` (figures) or
  ``move_failed`` (the guest goes on here, unless ``handed_over``).
- destination: ``receive`` (job, bind address, the source's key, keys directory, disk) → ``listening``
  (endpoint), then ``moved_in`` once the guest runs here, or ``move_failed``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from conode.agent.platform import urgent
from conode.agent.settings import AGENT_KEY_NAME
from conode.cluster.keys import load_key_pair
from conode.errors import ConodeError
from conode.migration import MigrationError, Policy, RunningGuest, curve, migrate_in, migrate_out
from conode.migration.stream import Abortable
from conode.vm.guest import Guest

if TYPE_CHECKING:
    from conode.agent.worker import GuestWorker

STREAM_TIMEOUT_S = 10.0  # the longest wait on the other agent before a move is given up
POLL_S = 0.2  # how often a wait looks whether the move was called off
HAND_OVER_WAIT_S = STREAM_TIMEOUT_S / 2  # the coordinator's answer, well within the destination's wait for GO


def _stream(worker: GuestWorker, stream: Any) -> Abortable:
    worker.called_off.clear()
    return Abortable(stream, worker.called_off, STREAM_TIMEOUT_S)


def send_guest(worker: GuestWorker, message: dict[str, Any], live: bool) -> bool:
    """Move the worker's guest as *message* (migrate) says; whether it left (the worker then has no guest)."""
    job = int(message["job"])
    guest = worker.guest
    if guest is None or guest.job is None or guest.job.spec.id != job or guest.finished:
        worker.send({"type": "move_failed", "job": job, "reason": "the job does not run in this worker",
                     "handed_over": False})
        return False
    running = RunningGuest(guest)
    if live:
        running.start()
    handed_over = threading.Event()

    def before_go() -> None:
        worker.send({"type": "move_ready", "job": job})
        answer = worker.await_move_answer(job, HAND_OVER_WAIT_S)
        if answer is None or answer["type"] != "move_go":
            why = answer.get("reason", "") if answer is not None else "no answer from the coordinator in time"
            worker.called_off.set()  # the destination hears it from the coordinator, or gives up waiting for GO
            raise MigrationError(f"the hand-over was refused: {why}")
        handed_over.set()

    policy = Policy(max_bytes_per_s=float(message.get("max_bytes_per_s", 0.0)))
    inner = None
    try:
        keys = load_key_pair(Path(message["keys"]), AGENT_KEY_NAME)
        inner = curve.connect(zmq.Context.instance(), message["endpoint"], message["peer"], keys, POLL_S)
        report = migrate_out(running, _stream(worker, inner), policy, f"the agent at {message['endpoint']}",
                             before_go, urgent)
    except (MigrationError, ConodeError, zmq.ZMQError) as exc:
        if running.running:
            running.pause()  # the guest goes on here, on the worker's own loop
        if not handed_over.is_set():
            worker.send({"type": "move_failed", "job": job, "reason": str(exc), "handed_over": False})
            return False
        worker.send({"type": "move_failed", "job": job, "reason": str(exc), "handed_over": True})
    else:
        worker.send({"type": "moved_out", "job": job, "total_s": report.total_s, "paused_s": report.paused_s,
                     "bytes": report.bytes_sent, "rounds": report.rounds, "sent_s": report.sent_s,
                     "ready_s": report.ready_s, "handed_s": report.handed_s, "final_pages": report.final_pages,
                     **({"downtime_s": max(0.0, report.downtime_s)} if report.downtime_s is not None else {})})
    finally:
        if inner is not None:
            inner.close()
    worker.discard(guest)  # it is the destination's now: never to run here again
    return True


def receive_guest(worker: GuestWorker, message: dict[str, Any]) -> Guest | None:
    """Take in the guest *message* (receive) announces; the guest, started by the caller, or None."""
    job = int(message["job"])
    inner = None
    try:
        keys = load_key_pair(Path(message["keys"]), AGENT_KEY_NAME)
        inner, endpoint = curve.listen(zmq.Context.instance(), message["bind"], keys, message["peer"], POLL_S)
        worker.send({"type": "listening", "job": job, "endpoint": endpoint})
        base, overlay = message.get("base"), message.get("overlay")
        # This workstation's owner is away (it was chosen for that): its CPU goes to taking the guest in, so that
        # the guest's downtime does not wait for it; the guest then runs at the lowest priority again.
        with urgent():
            arrival = migrate_in(_stream(worker, inner), worker, Path(base) if base else None, "the source agent",
                                 Path(overlay) if overlay else None)
    except (MigrationError, ConodeError, zmq.ZMQError) as exc:
        if inner is not None:
            inner.close()
        worker.send({"type": "move_failed", "job": job, "reason": str(exc), "handed_over": False})
        return None
    guest = arrival.guest
    arrival.started(time.monotonic_ns())  # the guest's first instruction here follows at once
    worker.send({"type": "moved_in", "job": job, "rounds": arrival.rounds, "bytes": arrival.bytes_received})

    def verify() -> None:  # all RAM against the source's digest, while the guest runs
        try:
            arrival.verify()
        except MigrationError as exc:
            reason = f"its memory arrived damaged: {exc}"
            guest.machine.call_soon(lambda: guest.fail(reason))
        finally:
            inner.close()

    threading.Thread(target=verify, name="verify-arrival", daemon=True).start()
    return guest
