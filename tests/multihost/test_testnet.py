# SPDX-License-Identifier: GPL-2.0-or-later
"""The multi-host harness itself: hosts reach each other and nothing else, links cut and come back, and nothing
it made outlives it (a with block left by an exception, a run killed outright). Root only."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import testnet
from testnet import HarnessError, NetemUnavailable, TestNetwork

pytestmark = pytest.mark.skipif(testnet.unavailable() is not None, reason=str(testnet.unavailable()))

PORT = 5000
SERVE = f"""
import socket
server = socket.create_server(("0.0.0.0", {PORT}))
while True:
    connection, _ = server.accept()
    connection.sendall(b"hello")
    connection.close()
"""
CONNECT = f"""
import errno, socket, sys
try:
    with socket.create_connection((sys.argv[1], {PORT}), timeout=float(sys.argv[2])) as s:
        print(s.recv(16).decode())
except OSError as exc:
    print(errno.errorcode.get(exc.errno, type(exc).__name__))
"""


def connect(host, address: str, timeout_s: float = 2.0) -> str:
    """What a TCP client on *host* gets from *address*: the server's greeting, or the error's name."""
    return host.run([sys.executable, "-c", CONNECT, address, str(timeout_s)], capture_output=True, text=True,
                    check=True, timeout=30).stdout.strip()


def serve(host) -> None:
    host.spawn([sys.executable, "-c", SERVE])
    deadline = time.monotonic() + 10
    while connect(host, "127.0.0.1") != "hello":
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)


def test_hosts_reach_each_other_over_the_bridge_and_nothing_else():
    with TestNetwork() as net:
        a, b = net.host("a"), net.host("b")
        assert a.address != b.address and net.host("a") is a
        serve(a)
        assert connect(b, a.address) == "hello"
        # No route leaves the test network: an address outside it is unreachable at once.
        assert connect(b, "192.0.2.1") == "ENETUNREACH"


def test_a_cut_host_is_unreachable_until_restored():
    with TestNetwork() as net:
        a, b = net.host("a"), net.host("b")
        serve(a)
        net.cut(a)
        assert connect(b, a.address, timeout_s=1.0) != "hello"
        assert connect(a, "127.0.0.1") == "hello"  # the host itself still runs
        net.restore(a)
        deadline = time.monotonic() + 10
        while connect(b, a.address) != "hello":
            assert time.monotonic() < deadline, "the restored link carries nothing"


def test_two_blocked_hosts_cannot_reach_each_other_but_reach_the_others_until_unblocked():
    with TestNetwork() as net:
        a, b, c = net.host("a"), net.host("b"), net.host("c")
        serve(a)
        serve(c)
        net.block(a, b)
        assert connect(b, a.address) == "EACCES"
        assert connect(b, c.address) == "hello" and connect(c, a.address) == "hello"
        net.unblock(a, b)
        assert connect(b, a.address) == "hello"


def test_delay_slows_the_round_trip():
    with TestNetwork() as net:
        a, b = net.host("a"), net.host("b")
        serve(a)
        try:
            net.delay(a, 100)
        except NetemUnavailable as exc:
            pytest.skip(str(exc))
        started = time.monotonic()
        assert connect(b, a.address) == "hello"
        assert time.monotonic() - started >= 0.2  # the handshake's round trip, 100 ms each way
        net.delay(a, 0)


def test_bad_host_names_are_refused():
    with TestNetwork() as net:
        for name in ("", "A1", "1a", "has-dash", "much-too-long-name"):
            with pytest.raises(HarnessError, match="host name"):
                net.host(name)


def processes_of(hosts) -> list[tuple[int, float]]:
    return [(pid, psutil.Process(pid).create_time()) for host in hosts for pid in host.pids()]


def gone(processes: list[tuple[int, float]]) -> bool:
    for pid, started in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_leaving_the_with_block_by_an_exception_removes_everything():
    with pytest.raises(RuntimeError), TestNetwork() as net:
        host = net.host("a")
        host.spawn(["sh", "-c", "setsid sleep 600 & sleep 600"])  # one escapes the process group
        time.sleep(0.2)
        processes = processes_of([host])
        names = [host.namespace, net.switch]
        raise RuntimeError("the test failed")
    assert len(processes) >= 2 and gone(processes)
    assert not set(names) & set(testnet.namespaces())


CRASHING_RUN = """
import json, os, signal, subprocess
import testnet
net = testnet.TestNetwork()
hosts = [net.host("a"), net.host("b")]
for host in hosts:
    host.spawn(["sh", "-c", "setsid sleep 600 & sleep 600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"namespaces": [h.namespace for h in hosts] + [net.switch],
                  "hosts": [h.namespace for h in hosts]}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no finally
"""


def test_a_run_killed_outright_is_swept_by_the_next():
    done = subprocess.run([sys.executable, "-c", CRASHING_RUN], capture_output=True, text=True, timeout=60, check=False,
                          cwd=testnet.__file__.rsplit("/", 1)[0])
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = json.loads(done.stdout)
    assert set(left["namespaces"]) <= set(testnet.namespaces())  # the crash left them behind
    time.sleep(0.2)
    processes = [(pid, psutil.Process(pid).create_time()) for ns in left["hosts"] for pid in testnet.pids_in(ns)]
    assert len(processes) >= 4
    swept = testnet.sweep_stale()
    assert set(left["namespaces"]) <= set(swept)
    assert not set(left["namespaces"]) & set(testnet.namespaces())
    assert gone(processes)


@pytest.mark.skipif(not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists())
                    or not Path("/lib/systemd/systemd").exists(),
                    reason="booting a test host needs systemd and openssh-server")
def test_a_booted_host_is_a_machine_of_its_own_and_leaves_nothing(tmp_path):
    seed = tmp_path / "seed"
    (seed / "etc").mkdir(parents=True)
    (seed / "etc/conode-seeded").write_text("from the seed\n")
    with TestNetwork() as net:
        host = net.host("box")
        host.boot(seed)
        assert host.inside(["cat", "/etc/conode-seeded"], capture_output=True, text=True).stdout == "from the seed\n"
        assert host.inside(["hostname"], capture_output=True, text=True).stdout.strip() == "box"
        assert host.inside(["ps", "-o", "comm=", "-p", "1"], capture_output=True, text=True).stdout.strip() == "systemd"
        assert host.inside(["systemctl", "is-active", "ssh.service"], capture_output=True, text=True
                           ).stdout.strip() == "active"
        written = host.inside(["sh", "-c", "echo mine > /etc/conode-written && cat /etc/conode-written"],
                              capture_output=True, text=True)
        assert written.stdout == "mine\n" and not Path("/etc/conode-written").exists()  # its root, not ours
        assert not Path("/etc/conode-seeded").exists()
        cgroup = testnet.cgroup2_root() / host.namespace
        assert cgroup.is_dir()
        init = host.init_pid
    try:  # dead: gone, or a zombie until this machine's init reaps it
        assert psutil.Process(init).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass
    assert not cgroup.exists()
    assert not Path(f"/tmp/{host.namespace}").exists()
