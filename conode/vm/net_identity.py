"""A guest's identity on conet, applied in the guest by coagent before a job's command runs.

The identity is the guest's own (not its workstation's): MAC, IPv4 address and prefix on the job's network,
hostname, the names and addresses of the job's guests (``/etc/hosts``, in rank order) and the job's rank and
size. coagent sets eth0's MAC and address and brings it up — the only route is the one to the job's network
that the address and prefix make, never a default route — writes the hostname and ``/etc/hosts``, and puts
``CONODE_RANK``, ``CONODE_SIZE`` and ``CONODE_HOSTS`` (the hostnames in rank order, space-separated) into the
environment of the job's command.

The host builds the identity from the agent's ``run`` message and checks it here; coagent checks the frame
again before it changes anything. The frame's payload is NUL-terminated ``key=value`` strings: ``mac=``,
``addr=`` (address/prefix), ``hostname=``, one ``host=`` per guest (``address name``), one ``env=`` per variable.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from conode.errors import ConodeError
from conode.limits import MAX_HOSTNAME
from conode.limits import MAX_JOB_GUESTS as MAX_GUESTS  # each named in the others' /etc/hosts
from conode.vm.state import blob, bounded, items

MIN_PREFIX, MAX_PREFIX = 8, 30
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class IdentityError(ConodeError):
    """A guest identity that cannot be applied (a bad address, name, or rank)."""


@dataclass(frozen=True)
class HostEntry:
    name: str = blob(max_len=MAX_HOSTNAME)
    ip: str = blob(max_len=15)


@dataclass(frozen=True)
class NetIdentity:
    """One guest's identity; also the record a job's snapshot keeps of it (state.py checks its shape)."""

    mac: bytes = blob(exact=6)
    ip: str = blob(max_len=15)
    prefix: int = bounded(MIN_PREFIX, MAX_PREFIX)
    hostname: str = blob(max_len=MAX_HOSTNAME)
    hosts: tuple[HostEntry, ...] = items(max_len=MAX_GUESTS)
    rank: int = bounded(0, MAX_GUESTS - 1)
    size: int = bounded(1, MAX_GUESTS)

    @classmethod
    def from_message(cls, net: Any) -> NetIdentity:
        """The identity in a ``run`` message's ``net`` map (mac, ip, prefix, hostname, hosts, rank, size);
        raise IdentityError saying what is wrong."""
        if not isinstance(net, dict):
            raise IdentityError("the guest's network identity must be a map")
        hosts = net.get("hosts")
        if not isinstance(hosts, dict) or len(hosts) > MAX_GUESTS:
            raise IdentityError(f"hosts must map at most {MAX_GUESTS} hostnames to IPv4 addresses")
        try:
            identity = cls(net["mac"], net["ip"], net["prefix"], net["hostname"],
                           tuple(HostEntry(name, ip) for name, ip in hosts.items()), net["rank"], net["size"])
        except KeyError as exc:
            raise IdentityError(f"the guest's network identity lacks {exc.args[0]!r}") from None
        identity.check()
        return identity

    def check(self) -> None:
        """Raise IdentityError unless every part is something coagent accepts."""
        if not isinstance(self.mac, bytes) or len(self.mac) != 6 or self.mac[0] & 1 or not any(self.mac):
            raise IdentityError("the guest's MAC must be 6 bytes of a unicast address")
        if type(self.prefix) is not int or not MIN_PREFIX <= self.prefix <= MAX_PREFIX:
            raise IdentityError(f"the guest's network prefix must be from {MIN_PREFIX} to {MAX_PREFIX}")
        network = ipaddress.IPv4Network(f"{_address(self.ip)}/{self.prefix}", strict=False)
        if _address(self.ip) in (network.network_address, network.broadcast_address):
            raise IdentityError(f"{self.ip} is not a host address in {network}")
        _check_hostname(self.hostname)
        for entry in self.hosts:
            _check_hostname(entry.name)
            _address(entry.ip)
        if type(self.size) is not int or not 1 <= self.size <= MAX_GUESTS:
            raise IdentityError(f"a job has from 1 to {MAX_GUESTS} guests")
        if type(self.rank) is not int or not 0 <= self.rank < self.size:
            raise IdentityError(f"rank {self.rank!r} is not one of the job's {self.size} ranks")

    @property
    def environment(self) -> dict[str, str]:
        return {"CONODE_RANK": str(self.rank), "CONODE_SIZE": str(self.size),
                "CONODE_HOSTS": " ".join(entry.name for entry in self.hosts)}

    def payload(self) -> bytes:
        """The IDENTITY frame's payload for coagent."""
        fields = [f"mac={self.mac.hex(':')}", f"addr={self.ip}/{self.prefix}", f"hostname={self.hostname}"]
        fields += [f"host={entry.ip} {entry.name}" for entry in self.hosts]
        fields += [f"env={name}={value}" for name, value in self.environment.items()]
        return b"".join(field.encode() + b"\0" for field in fields)


def _address(text: Any) -> ipaddress.IPv4Address:
    if not isinstance(text, str):
        raise IdentityError("an IPv4 address must be text (a.b.c.d)")
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise IdentityError(f"{text[:40]!r} is not an IPv4 address (a.b.c.d)") from None


def _check_hostname(name: Any) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_HOSTNAME or not all(
            _LABEL.fullmatch(label) for label in name.split(".")):
        shown = repr(name[:40]) if isinstance(name, str) else type(name).__name__
        raise IdentityError(f"{shown} is not a hostname (letters, digits, '-' and '.', at most {MAX_HOSTNAME})")
