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

A host can also be booted as a whole machine (:meth:`Host.boot`): its own mount namespace, whose root is an
overlay on this machine's root (so it has its own /etc, /var, /opt: writes land in a tmpfs that vanishes with
it), its own PID namespace with systemd as PID 1, and its own cgroup; systemd starts the host's sshd on its
address. Nothing it writes reaches this machine's files; its cgroup is removed when it is closed.

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
from pathlib import Path
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
BOOT_TIMEOUT_S = 60.0
MACHINE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
# What a booted host starts: sshd and what it needs (sysinit: journald, tmpfiles), nothing else of the image's.
BOOT_TARGET = "conode-test.target"
# Units of this machine's image that a booted host must not run: they would touch the machine itself (its clock,
# kernel settings, modules, devices) or just cost time.
MASKED_UNITS = ("systemd-timesyncd.service", "systemd-sysctl.service", "systemd-modules-load.service",
                "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
                "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-pstore.service",
                "systemd-random-seed.service", "systemd-hwdb-update.service", "systemd-firstboot.service",
                "systemd-journal-flush.service", "systemd-update-utmp.service", "ldconfig.service",
                "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount",
                "sys-kernel-config.mount", "dev-hugepages.mount", "dev-mqueue.mount")
# Runs inside the host's new mount and PID namespaces (as PID 1 there, until it execs systemd): an overlay on
# /, with the seed directory's files copied into its upper layer, fresh /proc, /sys (read-only), /run and /tmp,
# the machine's /dev, and a cgroup of its own; then systemd in it.
_BOOT_SCRIPT = r"""
set -eu
work=$1 seed=$2 cgroup=$3
mount -t tmpfs -o mode=0755 conode-test "$work"
mkdir "$work/upper" "$work/work" "$work/root" "$work/cgroup"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
root=$work/root
cp -a "$seed/." "$root/"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t sysfs -o ro sysfs "$root/sys"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
hostname "$(cat "$root/etc/hostname")"
mount -t cgroup2 cgroup2 "$work/cgroup"
mkdir "$work/cgroup/$cgroup"
echo $$ > "$work/cgroup/$cgroup/cgroup.procs"
exec unshare --cgroup sh -c '
  mount -t cgroup2 cgroup2 "$0/sys/fs/cgroup" 2>/dev/null || {
    mount -t tmpfs tmpfs "$0/sys/fs/cgroup" && mount -t cgroup2 cgroup2 "$0/sys/fs/cgroup"; }
  exec chroot "$0" env container=conode-test /lib/systemd/systemd --system --unit=""" + BOOT_TARGET + r"""
' "$root"
"""

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
    remove_cgroup(namespace)
    shutil.rmtree(f"/tmp/{namespace}", ignore_errors=True)  # a booted host's mount point (empty out here)


def cgroup2_root() -> Path | None:
    """Where this machine's cgroup v2 hierarchy is mounted (hybrid systems mount it at /sys/fs/cgroup/unified)."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def remove_cgroup(name: str) -> None:
    """Remove the cgroup a booted host ran in (and the ones its systemd made in it), once its processes are dead."""
    root = cgroup2_root()
    if root is None or not (root / name).is_dir():
        return
    for directory, _, _ in sorted(os.walk(root / name), key=lambda entry: -len(entry[0])):
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while True:
            try:
                os.rmdir(directory)
                break
            except OSError:  # busy until the kernel has reaped the last process in it
                if time.monotonic() > deadline:
                    raise HarnessError(f"cannot remove the cgroup {directory}") from None
                time.sleep(0.05)


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


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


@functools.cache
def unavailable() -> str | None:
    """Why test hosts cannot be made here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "the multi-host tests need root (they create network namespaces, veth pairs and a bridge)"
    if shutil.which("ip") is None:
        return "the multi-host tests need iproute2's `ip` (apt-get install iproute2)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "the multi-host tests need util-linux's unshare and nsenter"
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
        self.init_pid: int | None = None  # systemd, PID 1 of a booted host (its pid here)

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

    # --- a whole machine ---------------------------------------------------------------------------------
    def boot(self, seed: Path) -> None:
        """Make this host a machine of its own and start systemd in it (see the module's docstring); the files
        in *seed* are laid over its root first (keys, units). Returns when systemd has started sshd."""
        if self.init_pid is not None:
            raise HarnessError(f"{self.name} is already booted")
        work = Path(f"/tmp/{self.namespace}")  # a mount point inside the host's own namespace only
        work.mkdir(exist_ok=True)
        units = seed / "etc/systemd/system"
        (units / f"{BOOT_TARGET}.wants").mkdir(parents=True, exist_ok=True)
        (units / BOOT_TARGET).write_text("[Unit]\nDescription=conode test host\nRequires=sysinit.target\n"
                                         "After=sysinit.target\nAllowIsolate=yes\n")
        for unit in ("ssh.service", "systemd-user-sessions.service"):  # the latter lets users other than root in
            wanted = units / f"{BOOT_TARGET}.wants" / unit
            if not wanted.is_symlink():
                wanted.symlink_to(f"/lib/systemd/system/{unit}")
        (seed / "etc").mkdir(exist_ok=True)
        (seed / "etc/hostname").write_text(self.name + "\n")
        for unit in MASKED_UNITS:
            if not (units / unit).is_symlink():
                (units / unit).symlink_to("/dev/null")
        starter = self.spawn(["unshare", "--mount", "--uts", "--propagation", "private", "--pid", "--fork", "--kill-child",
                              "sh", "-c", _BOOT_SCRIPT, "boot", str(work), str(seed), self.namespace],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.init_pid is None:
            if starter.poll() is not None:
                raise HarnessError(f"{self.name} did not boot: {starter.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name}: systemd did not start within {BOOT_TIMEOUT_S:.0f} s")
            children = _children(starter.pid)
            if children and _command_name(children[0]) == "systemd":
                self.init_pid = children[0]
            time.sleep(0.05)
        while self.inside(["systemctl", "is-active", "--quiet", "ssh.service"], stderr=subprocess.DEVNULL).returncode:
            if time.monotonic() > deadline:
                state = self.inside(["systemctl", "status", "--no-pager", "ssh.service"], capture_output=True,
                                    text=True).stdout
                raise HarnessError(f"{self.name}: sshd did not start within {BOOT_TIMEOUT_S:.0f} s:\n{state}")
            time.sleep(0.1)

    def inside(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run *argv* inside this booted host, as a process of its own machine (all its namespaces, its root)."""
        if self.init_pid is None:
            raise HarnessError(f"{self.name} is not booted")
        kwargs.setdefault("timeout", IP_TIMEOUT_S)
        kwargs.setdefault("env", MACHINE_ENV)  # the machine's own environment, not this process's (PYTHONPATH)
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", "-r", "-w", *argv],  # noqa: PLW1510
                              **kwargs)

    def pids(self) -> list[int]:
        """Every process now in this host's namespace."""
        return pids_in(self.namespace)

    def stop_all(self) -> None:
        kill_everything_in(self.namespace, [p.pid for p in self._groups])
        for process in self._groups:
            process.wait()  # reap our own children
        self._groups.clear()
        if self.init_pid is not None:
            remove_cgroup(self.namespace)
            self.init_pid = None


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
