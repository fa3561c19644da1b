"""A real conet switch process and real guest-side ports, for tests and benchmarks that need no guest.

:class:`SwitchProcess` starts ``python -m conode.conet.switchd`` and speaks its control pipe;
:class:`GuestPort` connects to it exactly as a guest worker does (SOCK_SEQPACKET, token first) and sends and
receives conet frames that the functions below craft.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from conode.agent.pipe import Unpacker, pack
from conode.agent.settings import AGENT_KEY_NAME
from conode.cluster.keys import KeyPair, generate_key_pair
from conode.conet.frames import BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, GSO_NONE, vnet_header


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes, gso_type: int = GSO_NONE) -> bytes:
    return vnet_header(gso_type) + dst + src + struct.pack("!H", ethertype) + payload


def arp(src_mac: bytes, sender_ip: str, target_ip: str, sender_mac: bytes | None = None,
        dst: bytes = BROADCAST) -> bytes:
    """An ARP request (by default broadcast) from *src_mac* asking for *target_ip*."""
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETHERTYPE_IPV4, 6, 4, 1, sender_mac or src_mac, ip4(sender_ip),
                       bytes(6), ip4(target_ip))
    return ethernet(dst, src_mac, ETHERTYPE_ARP, body)


def ipv4(dst_mac: bytes, src_mac: bytes, src_ip: str, dst_ip: str, payload: bytes = b"",
         gso_type: int = GSO_NONE) -> bytes:
    """A UDP-flavoured IPv4 packet (checksums are not the switch's business)."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, min(20 + len(payload), 0xFFFF), 0, 0, 64, 17, 0,
                         ip4(src_ip), ip4(dst_ip))
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, header + payload, gso_type)


def sized(frame: bytes, size: int) -> bytes:
    """*frame* padded with zeros to *size* bytes in all."""
    return frame + bytes(max(0, size - len(frame)))


class GuestPort:
    """One guest's end of a port: a SOCK_SEQPACKET client of the switch."""

    def __init__(self, path: Path, token: bytes, mac: bytes, ip: str, network: str, name: str,
                 sndbuf: int = 1 << 20) -> None:
        self.token, self.mac, self.ip, self.network, self.name = token, mac, ip, network, name
        self._path, self._sndbuf = path, sndbuf
        self.sock: socket.socket | None = None

    def connect(self, token: bytes | None = None) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.settimeout(10)
        sock.connect(str(self._path))
        sock.send(msgpack.packb({"token": self.token if token is None else token}))
        sock.setblocking(True)
        self.sock = sock

    def send(self, frame: bytes) -> bool:
        """Send without waiting; False if the socket is full."""
        assert self.sock is not None
        try:
            self.sock.send(frame, socket.MSG_DONTWAIT)
            return True
        except BlockingIOError:
            return False

    def receive(self, timeout: float = 2.0) -> bytes | None:
        """The next frame, or None if none comes within *timeout* seconds."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 17)
        except TimeoutError:
            return None
        finally:
            self.sock.setblocking(True)
        return data

    def drain(self, quiet: float = 0.3) -> list[bytes]:
        """Every frame that arrives until none has for *quiet* seconds, or the switch closes the port."""
        frames = []
        while (frame := self.receive(quiet)) is not None:
            if not frame and self.closed():
                break
            frames.append(frame)
        return frames

    def closed(self) -> bool:
        """Whether the switch has closed this port's connection."""
        assert self.sock is not None
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP)
        return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SwitchProcess:
    """A running switchd with its own key pair; ``stop()`` always ends it."""

    def __init__(self, directory: Path, name: str, listen: str = "tcp://127.0.0.1:*",
                 keys: KeyPair | None = None, options: tuple[str, ...] = ()) -> None:
        self.directory, self.name, self._listen, self._options = directory, name, listen, options
        directory.mkdir(parents=True, exist_ok=True)
        if keys is None:
            keys = generate_key_pair(directory / "keys", AGENT_KEY_NAME)
        else:  # another switch's identity: the same agent, restarted
            (directory / "keys").mkdir(exist_ok=True)
            (directory / "keys" / f"{AGENT_KEY_NAME}.public").write_text(keys.public)
            secret = directory / "keys" / f"{AGENT_KEY_NAME}.secret"
            secret.touch(mode=0o600)
            secret.write_text(keys.secret)
        self.keys = keys
        self.ports_path = directory / "ports.sock"
        self._stderr = open(directory / "switchd.log", "ab")
        self._unpacker = Unpacker()
        self._inbox: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self) -> SwitchProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "conode.conet.switchd", "--ports", str(self.ports_path),
             "--listen", self._listen, "--keys", str(self.directory / "keys"), *self._options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self.endpoint = self.expect("ready")["endpoint"]
        return self

    def request(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(pack(message))
        self.proc.stdin.flush()

    def expect(self, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            for index, message in enumerate(self._inbox):
                if message.get("type") == kind:
                    return self._inbox.pop(index)
            if time.monotonic() > deadline:
                raise TimeoutError(f"switch {self.name} sent no {kind!r}; log:\n{self.log()}")
            os.set_blocking(self.proc.stdout.fileno(), False)
            data = self.proc.stdout.read()
            if data:
                self._inbox.extend(self._unpacker.feed(data))
            elif self.proc.poll() is not None:
                raise RuntimeError(f"switch {self.name} exited with {self.proc.returncode}; log:\n{self.log()}")
            else:
                time.sleep(0.01)

    def stats(self) -> dict[str, Any]:
        self.request({"type": "stats"})
        return self.expect("stats")

    def add_port(self, mac: bytes, ip: str, network: str, guest: str) -> GuestPort:
        """Register a guest's port and connect to it."""
        token = os.urandom(16)
        self.request({"type": "port", "token": token, "mac": mac, "ip": ip, "network": network, "guest": guest})
        port = GuestPort(self.ports_path, token, mac, ip, network, guest)
        port.connect()
        self.wait_connected(guest)
        return port

    def wait_connected(self, guest: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.stats()["ports"].get(guest, {}).get("connected"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest {guest}'s port never connected to switch {self.name}")
            time.sleep(0.01)

    def set_peers(self, *peers: SwitchProcess, relay: tuple[str, str] | None = None,
                  endpoints: dict[str, str] | None = None) -> None:
        """Name *peers* (at *endpoints* by name, or where they listen), and the relay (endpoint, key) if any."""
        endpoints = endpoints or {}
        extra = {"relay": {"endpoint": relay[0], "key": relay[1]}} if relay else {}
        self.request({"type": "peers", "peers": [
            {"agent": peer.name, "endpoint": endpoints.get(peer.name, peer.endpoint), "key": peer.keys.public}
            for peer in peers], **extra})
        self.stats()

    def cpu_seconds(self) -> float:
        """User + system CPU time the switch process has used so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        return (self.directory / "switchd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


# --- load: one process per guest port, so a measurement shows the switch, not the test's own GIL -------------
def _send_for(port: GuestPort, frame: bytes, seconds: float) -> dict[str, Any]:
    """Send *frame* over and over for *seconds*, waiting whenever the socket is full (as fast as the switch
    takes frames, never faster)."""
    assert port.sock is not None
    sock, sent = port.sock, 0
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        for _ in range(64):
            sock.send(frame)
        sent += 64
    return {"frames": sent, "seconds": time.monotonic() - started}


def _receive_for(port: GuestPort, seconds: float, idle: float = 1.0) -> dict[str, Any]:
    """Count frames for *seconds*, or until none has come for *idle* seconds after the first."""
    assert port.sock is not None
    sock, frames, size = port.sock, 0, 0
    deadline = time.monotonic() + seconds
    first = last = 0.0
    sock.settimeout(idle)
    buffer = bytearray(1 << 17)
    while (now := time.monotonic()) < deadline:
        try:
            got = sock.recv_into(buffer)
        except TimeoutError:
            if frames:
                break
            continue
        if not frames:
            first = now
        last = now
        frames += 1
        size += got
    return {"frames": frames, "bytes": size, "first": first, "last": last}


def load_process(role: str, path: Path, token: bytes, seconds: float, frame: bytes = b"") -> subprocess.Popen:
    """Start a process that connects to the port *token* and sends *frame* (role "send") or counts what
    arrives (role "receive") for *seconds*; it prints its figures as JSON when done (:func:`load_result`)."""
    proc = subprocess.Popen([sys.executable, "-m", "conode.testing.conet", role, str(path), token.hex(),
                             str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(frame)
    proc.stdin.close()
    return proc


def load_result(proc: subprocess.Popen, timeout: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    proc.wait(timeout)
    out = proc.stdout.read()
    if proc.returncode:
        raise RuntimeError(f"load process failed with status {proc.returncode}")
    return json.loads(out)


def _load_main(argv: list[str]) -> int:
    role, path, token, seconds = argv
    frame = sys.stdin.buffer.read()
    port = GuestPort(Path(path), bytes.fromhex(token), b"", "", "", role, sndbuf=4 << 20)
    port.connect()
    assert port.sock is not None
    port.sock.setblocking(True)
    if role == "send":
        result = _send_for(port, frame, float(seconds))
    else:
        result = _receive_for(port, float(seconds))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_load_main(sys.argv[1:]))
