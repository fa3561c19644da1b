"""Why a queued job waits, and which requests no node could ever meet: plain sentences from the nodes the
coordinator knows, for `jobs`/`job` and for refusing a submission at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from coordinator.placement import ACCEPTING_STATES, NodeView, can_take_work


@dataclass(frozen=True)
class Request:
    """What a job asks of the pool."""

    mem_mib: int
    guests: int = 1
    image_bytes: int = 0


def never_fits(request: Request, known: Iterable[tuple[int, int]]) -> str | None:
    """Why no node among *known* ((cores, guest memory in MiB) of each node up or down) could ever run the
    request, or None (also when no node is known: nothing can be said yet)."""
    known = list(known)
    if not known:
        return None
    largest = max(mem for _, mem in known)
    if request.mem_mib > largest:
        return (f"the job asks for {request.mem_mib} MiB of guest memory; the largest node offers {largest} MiB "
                f"(ask for less with --mem)")
    slots = sum(cores for cores, mem in known if mem >= request.mem_mib)
    if request.guests > slots:
        return (f"the job asks for {request.guests} guests of {request.mem_mib} MiB at once; the pool's "
                f"{len(known)} node(s) offer {slots} such guest(s)")
    return None


def why_waiting(request: Request, nodes: list[NodeView]) -> str:
    """Why a queued job with *request* is not running now, given the connected nodes."""
    if not nodes:
        return "no node is connected"
    largest = max(n.mem_mib for n in nodes)
    if request.mem_mib > largest:
        return f"largest node offers {largest} MiB"
    fitting = [n for n in nodes if n.mem_mib >= request.mem_mib and n.image_bytes >= request.image_bytes]
    if not fitting:
        return f"no node keeps an image of {request.image_bytes >> 20} MiB"
    if request.guests > sum(n.cores for n in fitting):
        return f"needs {request.guests} guests; the connected nodes offer {sum(n.cores for n in fitting)}"
    usable = [n for n in fitting if n.state in ACCEPTING_STATES and not n.drained]
    if not usable:
        drained = all(n.drained for n in fitting)
        return "every node that fits is drained" if drained else "no node is idle"
    free = sum(n.free_slots for n in usable if can_take_work(n))
    if free == 0:
        return "every idle node is busy"
    if request.guests > free:
        return f"needs {request.guests} guests at once; {free} free"
    return "earlier jobs go first"
