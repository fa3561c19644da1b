# SPDX-License-Identifier: GPL-2.0-or-later
"""Test hosts on one machine: each a Linux network namespace with its own address, joined by a bridge.

A :class:`TestNetwork` owns a "switch" namespace holding a bridge; every :class:`Host` is a namespace with
loopback up and one veth pair, ``eth0`` inside the host and ``p-<host>`` on the bridge, addressed in a private
/24 that exists only inside these namespaces. The machine's own namespace is never touched, so the only
traffic is on loopback or among this run's namespaces.

Names carry the test process's pid (``conode-test-<pid>-<n>-<host>``) so that parallel runs never collide, and
so that :func:`sweep_stale` can tell the leftovers of a crashed run (their pid is dead) from a live run's.
Cleanup is total and happens whatever the test did: on leaving the ``with`` block, at interpreter exit for a
network still open (atexit), and for a run killed outright, by the sweep the next network does first. Closing
kills every process in each namespace (the process groups started there, then whatever else is still inside,
found by ``ip netns pids``) before deleting it.

Root only: :func:`unavailable` says why the harness cannot run here, for a skip.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from typing import Any, Self

PREFIX = "conode-test-"
SUBNET = "10.231.0."  # .1 upwards for hosts, in the order they are made
PREFIX_LENGTH = 24
HOST_INTERFACE = "eth0"
BRIDGE = "br0"
HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")  # "p-" + name must fit an interface name (15 characters)
MAX_HOSTS = 250
IP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 10.0

_STALE = re.compile(re.escape(PREFIX) + r"(\d+)-\d+-[a-z0-9]+$")
_sequence = itertools.count()
_open: set[TestNetwork] = set()


class HarnessError(Exception):
    """The harness could not set up or change the test network (the message carries `ip`'s own words)."""


class NetemUnavailable(HarnessError):
    """tc's netem queueing discipline is missing here (no sch_netem module): delays cannot be emulated."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def pids_in(namespace: str) -> list[int]:
    done = ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in done.stdout.split() if pid.isdigit()]


def kill_everything_in(namespace: str, groups: Iterable[int] = ()) -> None:
    """SIGKILL the process groups in *groups*, then every process left in *namespace*, until none is."""
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while pids := pids_in(namespace):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} in {namespace} survive SIGKILL")
        time.sleep(0.02)


def delete_namespace(namespace: str) -> None:
    kill_everything_in(namespace)
    ip("netns", "delete", namespace, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces (and kill the processes in them) that runs now dead left behind; their names."""
    swept = []
    for name in namespaces():
        match = _STALE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            delete_namespace(name)
            swept.append(name)
    return swept


@functools.cache
def unavailable() -> str | None:
    """Why test hosts cannot be made here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "the multi-host tests need root (they create network namespaces, veth pairs and a bridge)"
    if shutil.which("ip") is None:
        return "the multi-host tests need iproute2's `ip` (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-{next(_sequence)}-probe"
    try:
        ip("netns", "add", probe)
        try:
            ip("-n", probe, "link", "add", "probe-br", "type", "bridge")
            ip("-n", probe, "link", "add", "probe-a", "type", "veth", "peer", "name", "probe-b")
        finally:
            ip("netns", "delete", probe, check=False)
    except (HarnessError, OSError, subprocess.TimeoutExpired) as exc:
        return f"this machine cannot make test hosts: {exc}"
    return None


class Host:
    """One test host: a network namespace with an address on the test network, where processes are started."""

    def __init__(self, network: TestNetwork, name: str, namespace: str, address: str) -> None:
        self.network = network
        self.name = name
        self.namespace = namespace
        self.address = address
        self.port = f"p-{name}"  # its veth on the bridge, in the switch namespace
        self._groups: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"

    def command(self, argv: list[str]) -> list[str]:
        """*argv* as run inside this host (`ip netns exec` also gives it this namespace's view of /sys)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def spawn(self, argv: list[str], **popen: Any) -> subprocess.Popen:
        """Start *argv* on this host in a new process group, killed with the host whatever happens."""
        process = subprocess.Popen(self.command(argv), start_new_session=True, **popen)
        self._groups.append(process)
        return process

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run *argv* on this host to completion (subprocess.run's arguments)."""
        return subprocess.run(self.command(argv), **kwargs)  # noqa: PLW1510  (the caller's check=)

    def pids(self) -> list[int]:
        """Every process now in this host's namespace."""
        return pids_in(self.namespace)

    def stop_all(self) -> None:
        kill_everything_in(self.namespace, [p.pid for p in self._groups])
        for process in self._groups:
            process.wait()  # reap our own children
        self._groups.clear()


class TestNetwork:
    """Test hosts joined by one bridge; use as a context manager (``with TestNetwork() as net``)."""

    __test__ = False  # a harness, not a test class

    def __init__(self) -> None:
        reason = unavailable()
        if reason is not None:
            raise HarnessError(reason)
        sweep_stale()
        self.tag = f"{PREFIX}{os.getpid()}-{next(_sequence)}-"
        self.switch = self.tag + "switch"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []  # namespaces, in the order they were made
        _open.add(self)
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
            ip("-n", self.switch, "link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, namespace: str) -> None:
        ip("netns", "add", namespace)
        self._made.append(namespace)
        ip("-n", namespace, "link", "set", "lo", "up")

    # --- hosts -----------------------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        """The host called *name*, made (namespace, veth on the bridge, address, loopback) on first use."""
        if name in self.hosts:
            return self.hosts[name]
        if not HOST_NAME.fullmatch(name):
            raise HarnessError(f"host name {name!r}: use 1-12 lowercase letters and digits, starting with a letter")
        if len(self.hosts) >= MAX_HOSTS:
            raise HarnessError(f"a test network holds at most {MAX_HOSTS} hosts")
        namespace = self.tag + name
        host = Host(self, name, namespace, SUBNET + str(len(self.hosts) + 1))
        self._add_namespace(namespace)
        ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", HOST_INTERFACE,
           "netns", namespace)
        ip("-n", self.switch, "link", "set", host.port, "master", BRIDGE, "up")
        ip("-n", namespace, "addr", "add", f"{host.address}/{PREFIX_LENGTH}", "dev", HOST_INTERFACE)
        ip("-n", namespace, "link", "set", HOST_INTERFACE, "up")
        self.hosts[name] = host
        return host

    # --- faults ---------------------------------------------------------------------------------------------
    def cut(self, host: Host) -> None:
        """Unplug *host*: its port on the bridge goes down, so nothing reaches it or leaves it."""
        ip("-n", self.switch, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        """Plug *host* back in."""
        ip("-n", self.switch, "link", "set", host.port, "up")

    def block(self, one: Host, other: Host) -> None:
        """Make *one* and *other* unable to reach each other, while both still reach every other host: each
        gets a "prohibit" route to the other's address (its packets to it are refused on the spot, and an
        established connection between them goes quiet)."""
        for host, peer in ((one, other), (other, one)):
            ip("-n", host.namespace, "route", "replace", "prohibit", f"{peer.address}/32")

    def unblock(self, one: Host, other: Host) -> None:
        """Undo :meth:`block`."""
        for host, peer in ((one, other), (other, one)):
            ip("-n", host.namespace, "route", "del", "prohibit", f"{peer.address}/32", check=False)

    def delay(self, host: Host, ms: float) -> None:
        """Delay every packet to and from *host* by *ms* each way (0 removes the delay); needs tc's netem."""
        for namespace, device in ((self.switch, host.port), (host.namespace, HOST_INTERFACE)):
            tc = ["netns", "exec", namespace, "tc", "qdisc"]
            if ms <= 0:
                ip(*tc, "del", "dev", device, "root", check=False)
                continue
            done = ip(*tc, "replace", "dev", device, "root", "netem", "delay", f"{ms:g}ms", check=False)
            if done.returncode != 0:
                if "unknown" in done.stderr.lower() or "no such file" in done.stderr.lower():
                    raise NetemUnavailable(f"tc netem is not available here: {done.stderr.strip()}")
                raise HarnessError(f"tc netem on {device}: {done.stderr.strip()}")

    # --- cleanup --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process on every host, then delete the namespaces; safe to call again."""
        errors = []
        for host in self.hosts.values():
            try:
                host.stop_all()
            except HarnessError as exc:
                errors.append(str(exc))
        for namespace in reversed(self._made):
            try:
                delete_namespace(namespace)
            except HarnessError as exc:
                errors.append(str(exc))
        self._made.clear()
        _open.discard(self)
        if errors:
            raise HarnessError("; ".join(errors))


@atexit.register
def _close_all() -> None:
    for network in list(_open):
        try:
            network.close()
        except HarnessError:
            pass
