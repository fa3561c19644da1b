"""conet between two real guests in one process: identity, ping, and a TCP transfer with offloads end to end.

Each guest is restored from one pristine post-boot snapshot, gets its identity (MAC, address, hostname,
/etc/hosts, rank environment) from its job, and joins a tiny two-port relay through its worker-side port,
over the same SOCK_SEQPACKET socket protocol the agent's switch speaks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest

from conode.agent.pipe import Unpacker, pack
from conode.conet.port import Port
from conode.vm.devices.virtio import net
from conode.vm.guest import Guest, GuestSnapshot, JobSpec
from conode.vm.guest_image import TCP_RMEM, load_guest_image
from conode.vm.machine import MachineConfig
from conode.vm.net_identity import HostEntry, NetIdentity

NAMES = ("rank0", "rank1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")
TRANSFER_MIB = 4
TIMEOUT_S = 240


class Relay:
    """A two-port switch stand-in: what one port sends, the other receives (after each sent its token)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(2)
        self.tokens: list[bytes] = []
        self.frames = 0
        self._peers: list[socket.socket] = []
        self._both = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        for _ in range(2):
            conn, _ = self.listener.accept()
            self.tokens.append(msgpack.unpackb(conn.recv(256))["token"])
            self._peers.append(conn)
        self._both.set()
        for i in range(2):
            threading.Thread(target=self._pump, args=(self._peers[i], self._peers[1 - i]), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                frame = source.recv(1 << 17)
                if not frame:
                    return
                sink.send(frame)
            except OSError:
                return
            self.frames += 1

    def close(self) -> None:
        for conn in [*self._peers, self.listener]:
            conn.close()


class Sink:
    """A job's results, with the host time each line of stderr arrived (markers for timing)."""

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.marks: dict[str, tuple[float, float]] = {}  # line -> (wall, this process's CPU) at arrival
        self.status: int | None = None
        self.failure: str | None = None

    def output(self, job: int, stream: str, data: bytes) -> None:
        if stream == "stdout":
            self.stdout += data
        else:
            self.stderr += data
            for line in data.decode(errors="replace").split():
                self.marks.setdefault(line, (time.monotonic(), time.process_time()))

    def finished(self, job, status, outputs, missing, runtime_s) -> None:
        self.status = status

    def failed(self, job: int, reason: str) -> None:
        self.failure = reason


@pytest.fixture(scope="module")
def pristine() -> GuestSnapshot:
    guest = Guest.boot(load_guest_image(), MachineConfig())
    guest.on_ready = lambda name: guest.machine.pause()
    deadline = time.monotonic() + TIMEOUT_S
    while not guest.agent.ready and guest.failure is None and time.monotonic() < deadline:
        guest.run()
    assert guest.agent.ready, guest.failure
    snapshot = guest.snapshot()
    guest.machine.close()
    return snapshot


def identity(rank: int) -> NetIdentity:
    hosts = tuple(HostEntry(name, ip) for name, ip in zip(NAMES, ADDRESSES))
    return NetIdentity(bytes([2, 0xC0, 0xDE, 0, 0, rank + 1]), ADDRESSES[rank], 24, NAMES[rank], hosts, rank, 2)


def run_pair(pristine: GuestSnapshot, tmp_path: Path, scripts: tuple[str, str]) -> tuple[list[Sink], list[Guest]]:
    """Run *scripts* (rank 0, rank 1) in two fresh guests joined by a relay; return their results."""
    relay = Relay(tmp_path / "switch")
    ram = pristine.ram_image()
    sinks = [Sink(), Sink()]
    guests, ports, runners = [], [], []
    try:
        for rank in range(2):
            guest = Guest.restore(pristine, new_identity=True, ram_image=ram)
            port = Port(relay.path, os.urandom(16))
            port.attach(guest.machine.nic, guest.machine.call_soon, guest.machine.watch)
            guest.start_job(JobSpec.in_job_directory(rank + 1, ["sh", "-c", scripts[rank]], {}, [],
                                                     identity(rank)), sinks[rank])
            guests.append(guest)
            ports.append(port)
        for guest in guests:
            runner = threading.Thread(target=_run_to_the_end, args=(guest,), daemon=True)
            runner.start()
            runners.append(runner)
        for runner in runners:
            runner.join(TIMEOUT_S)
        assert not any(r.is_alive() for r in runners), [s.stderr[-300:] for s in sinks]
    finally:
        for guest in guests:
            guest.fail("the test ended")
        for runner in runners:
            runner.join(10)
        for port in ports:
            port.close()
        for guest in guests:
            guest.machine.close()
        relay.close()
    assert len(relay.tokens) == 2
    return sinks, guests


def _run_to_the_end(guest: Guest) -> None:
    while not guest.finished:
        guest.run()


PING = """
for tool in ip ping nc wget httpd udhcpc; do command -v $tool >/dev/null || echo "missing $tool" >&2; done
hostname; echo "rank=$CONODE_RANK size=$CONODE_SIZE hosts=$CONODE_HOSTS"
cat /sys/class/net/eth0/address; ip -4 addr show dev eth0 | grep inet; ip route
ping -c 3 -W 5 rank1
echo done | nc rank1 7000
"""
LISTEN_ONCE = """
hostname; mkfifo /tmp/quiet
nc -l -p 7000 <>/tmp/quiet
"""


def test_two_guests_ping_each_other_by_name(pristine, tmp_path):
    (a, b), _ = run_pair(pristine, tmp_path, (PING, LISTEN_ONCE))
    assert a.failure is None and b.failure is None, (a.failure, b.failure)
    assert a.status == 0, a.stdout.decode() + a.stderr.decode()
    assert b"missing" not in a.stderr, a.stderr  # the network tools a job may use are in the initramfs
    out = a.stdout.decode()
    assert out.startswith("rank0\nrank=0 size=2 hosts=rank0 rank1\n02:c0:de:00:00:01\n"), out
    assert "inet 10.77.0.1/24" in out
    assert "10.77.0.0/24 dev eth0" in out and "default" not in out  # the job's network only
    assert "3 packets transmitted, 3 packets received" in out
    rtts = [float(line.split("time=")[1].split()[0]) for line in out.splitlines() if "time=" in line]
    print(f"\nconet ping RTT between two guests in one process: {', '.join(f'{t:.2f}' for t in rtts)} ms")
    assert b.status == 0 and b.stdout == b"rank1\ndone\n", b.stdout + b.stderr


# The sender's MTU is below conet's, so its TCP sends segmentation-offload frames (at conet's own MTU every
# segment is a frame of its own, up to 64 KiB): TSO and checksum offload travel end to end.
SEND = f"""
set -e
ip link set eth0 mtu 9000
dd if=/dev/urandom of=/tmp/data bs=64k count={16 * TRANSFER_MIB} 2>/dev/null
sha256sum /tmp/data
ping -c 1 -W 5 rank1 >/dev/null
echo go >&2
until nc rank1 5000 </tmp/data; do sleep 0.2; done
echo sent >&2
"""
RECEIVE = """
set -e
cat /sys/bus/virtio/devices/virtio1/features
tr '\\t' , </proc/sys/net/ipv4/tcp_rmem
mkfifo /tmp/quiet
nc -l -p 5000 <>/tmp/quiet >/tmp/data
sha256sum /tmp/data
"""


def test_a_tcp_transfer_arrives_intact_with_offloads_end_to_end(pristine, tmp_path):
    (a, b), (ga, gb) = run_pair(pristine, tmp_path, (SEND, RECEIVE))
    assert a.status == 0 and b.status == 0, (a.stdout + a.stderr + b.stdout + b.stderr).decode()
    sent = a.stdout.split()[0]
    features, tcp_rmem, received = (field.decode() for field in b.stdout.split()[:3])
    assert tcp_rmem.split(",") == TCP_RMEM.split()  # as the command line sets it, for conet's 64 KiB frames
    assert len(sent) == 64 and sent.decode() == received
    for bit in (net.F_CSUM, net.F_GUEST_CSUM, net.F_HOST_TSO4, net.F_GUEST_TSO4, net.F_MTU, net.F_STATUS):
        assert features[bit.bit_length() - 1] == "1", features  # as the guest's driver sees them
    assert ga.machine.nic.counters["tx_gso"] > 0 and gb.machine.nic.counters["rx_gso"] > 0  # TSO end to end
    assert not ga.machine.nic.dropped and not gb.machine.nic.dropped
    seconds = a.marks["sent"][0] - a.marks["go"][0]
    cpu = a.marks["sent"][1] - a.marks["go"][1]  # both guests, the ports and the relay: one process
    print(f"\nconet nc transfer between two guests in one process: {TRANSFER_MIB / seconds:.1f} MiB/s "
          f"({TRANSFER_MIB} MiB in {seconds:.2f} s), host CPU {cpu / TRANSFER_MIB * 1000:.0f} ms per MiB")


class WorkerProcess:
    """A real guest worker process (python -m conode.agent.worker), spoken to over its pipes as the agent does."""

    def __init__(self, boot_snapshot: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "conode.agent.worker", "--boot-snapshot",
                                      str(boot_snapshot)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._unpacker = Unpacker()
        self._messages: list[dict] = []

    def send(self, message: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(pack(message))
        self.proc.stdin.flush()

    def receive(self, kind: str) -> dict:
        """Messages until one of type *kind* (returned); output messages are collected on the way."""
        assert self.proc.stdout is not None
        while True:
            for message in self._messages:
                if message["type"] == kind:
                    self._messages.remove(message)
                    return message
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            assert data, self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else "worker died"
            self._messages += self._unpacker.feed(data)

    def output(self) -> bytes:
        return b"".join(m["data"] for m in self._messages if m["type"] == "output" and m["stream"] == "stdout")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def test_workers_join_their_guests_to_the_switch_socket_the_agent_names(tmp_path):
    relay = Relay(tmp_path / "switch")
    snapshot = tmp_path / "boot.snap"
    workers: list[WorkerProcess] = []
    try:
        for rank in range(2):  # one after the other: the second restores the boot snapshot the first made
            worker = WorkerProcess(snapshot)
            workers.append(worker)
            worker.receive("ready")
        scripts = ("ping -c 2 -W 5 rank1 | grep -c ' bytes from '", "mkfifo /q; nc -l -p 7000 <>/q")
        for rank, worker in enumerate(workers):
            who = identity(rank)
            net_map = {"token": bytes([rank]) * 16, "socket": relay.path, "mac": who.mac, "ip": who.ip,
                       "prefix": who.prefix, "hostname": who.hostname,
                       "hosts": {entry.name: entry.ip for entry in who.hosts}, "rank": rank, "size": 2}
            worker.send({"type": "run", "job": 10 + rank, "argv": ["sh", "-c", scripts[rank]], "inputs": {},
                         "outputs": [], "net": net_map})
        first = workers[0].receive("finished")
        assert first["status"] == 0 and workers[0].output() == b"2\n"
        workers[1].send({"type": "cancel", "job": 11})
        assert sorted(relay.tokens) == [bytes([0]) * 16, bytes([1]) * 16]
    finally:
        for worker in workers:
            worker.close()
        relay.close()
