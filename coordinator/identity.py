"""conet identities: the network, MAC, address and hostname each guest of a job gets.

Pure and derived: a guest's identity follows from its rank's id and the pool's guest subnet, so it needs no
table, is the same after a coordinator restart, and belongs to the guest (it travels with it through pause,
vacate and resume). A job's guests share a network of their own unless an admin named a shared one; the
switches keep networks apart, so addresses need only be unique within one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from conode.errors import ConodeError

DEFAULT_SUBNET = "10.213.0.0/16"  # guest-only: never routed to the office LAN
MAC_PREFIX = bytes((0x02, 0xC0, 0xDE))  # locally administered, unicast
MAX_NETWORK_NAME = 64


@dataclass(frozen=True)
class GuestIdentity:
    network: str
    mac: bytes
    ip: str
    prefix: int
    hostname: str
    rank: int
    size: int
    hosts: tuple[tuple[str, str], ...]  # (hostname, address) of every guest of the job, by rank

    def wire(self) -> dict[str, Any]:
        """The ``net`` field of a run_job message."""
        return {"network": self.network, "mac": self.mac, "ip": self.ip, "prefix": self.prefix,
                "hostname": self.hostname, "rank": self.rank, "size": self.size,
                "hosts": [list(entry) for entry in self.hosts]}


def guest_subnet(text: str) -> ipaddress.IPv4Network:
    """The pool's guest subnet from a setting; a clear error if it is not a private IPv4 network of /8../24."""
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ConodeError(f"conet subnet {text!r} is not an IPv4 network such as {DEFAULT_SUBNET}: {exc}") from None
    if not subnet.is_private or not 8 <= subnet.prefixlen <= 24:
        raise ConodeError(f"conet subnet {text} must be a private IPv4 network of /8 to /24 (guests only, never "
                          f"routed to the office LAN)")
    return subnet


def network_name(job: int, shared: str | None) -> str:
    return f"net:{shared}" if shared else f"job:{job}"


def check_network_name(name: str) -> str | None:
    """Why *name* cannot name a shared network, or None."""
    if not 1 <= len(name) <= MAX_NETWORK_NAME or not all(c.isalnum() or c in "-_." for c in name):
        return f"a network name is 1 to {MAX_NETWORK_NAME} letters, digits, '-', '_' or '.'"
    return None


def _address(subnet: ipaddress.IPv4Network, rank_id: int) -> str:
    hosts = subnet.num_addresses - 2  # not the network's own address, not its broadcast
    return str(subnet.network_address + 1 + rank_id % hosts)


def _mac(rank_id: int) -> bytes:
    return MAC_PREFIX + (rank_id % (1 << 24)).to_bytes(3, "big")


def hostname(job: int, rank: int, size: int) -> str:
    return f"job{job}" if size == 1 else f"job{job}-{rank}"


def job_identities(job: int, rank_ids: list[int], subnet: ipaddress.IPv4Network,
                   shared_network: str | None = None) -> list[GuestIdentity]:
    """The identity of each guest of *job*: rank i is the guest with id rank_ids[i] (a single-guest job's only
    guest has the job's own id)."""
    size = len(rank_ids)
    hosts = tuple((hostname(job, rank, size), _address(subnet, ident)) for rank, ident in enumerate(rank_ids))
    network = network_name(job, shared_network)
    return [GuestIdentity(network, _mac(ident), hosts[rank][1], subnet.prefixlen, hosts[rank][0], rank, size, hosts)
            for rank, ident in enumerate(rank_ids)]
