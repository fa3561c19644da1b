#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Boot the built guest images under QEMU and check them end to end.

Two checks, both with qemu-system-i386 (no KVM needed):

* ``agent``: a ``microvm`` machine with a virtio console on virtio-mmio (the
  same kind of device the conode emulator offers).  The agent's frames are
  exchanged over a Unix socket: READY, EXEC with stdout/stderr/status, a
  missing command, KILL, PUT/GET of 100 KiB, QUIT (the guest halts).
* ``shell``: a plain ``pc`` machine without any virtio device.  The agent
  must report the missing /dev/hvc0 and, with ``conode.shell=1``, run a shell
  on ttyS0; a command typed there must answer.

The guest kernel has no local APIC support, so microvm needs
``-cpu qemu32,-apic``: with an APIC present and its LINT0 left masked by
the firmware, no PIC interrupt would ever reach the CPU.

Usage: guest/qemu_smoke.py [agent|shell|all]
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parent.parent / "conode" / "vm" / "images"
KERNEL = IMAGES / "bzImage"
INITRD = IMAGES / "initramfs.cpio.gz"
HDR = struct.Struct("<BII")
QEMU = "qemu-system-i386"


def qemu_base(machine: list[str], append: str) -> list[str]:
    return [
        QEMU, *machine, "-display", "none", "-monitor", "none", "-no-reboot", "-m", "128",
        "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", append,
    ]


class Channel:
    """Frame-level access to the agent over QEMU's chardev socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, ftype: str, fid: int, payload: bytes = b"") -> None:
        self.sock.sendall(HDR.pack(ord(ftype), fid, len(payload)) + payload)

    def recv(self, timeout: float = 60.0) -> tuple[str, int, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= HDR.size:
                ftype, fid, length = HDR.unpack_from(self.buf)
                if len(self.buf) >= HDR.size + length:
                    payload = self.buf[HDR.size : HDR.size + length]
                    self.buf = self.buf[HDR.size + length :]
                    return chr(ftype), fid, payload
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(0.0, left))
            if not r:
                raise TimeoutError(f"no frame from the guest (buffered: {self.buf[:40]!r})")
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the guest closed the console")
            self.buf += data

    def run(self, fid: int, argv: list[str], cwd: str = "") -> tuple[bytes, bytes, int]:
        self.send("X", fid, b"".join(s.encode() + b"\0" for s in [cwd, *argv]))
        out = err = b""
        while True:
            ftype, rid, payload = self.recv()
            assert rid == fid, (ftype, rid, payload)
            if ftype == "O":
                out += payload
            elif ftype == "E":
                err += payload
            elif ftype == "S":
                return out, err, struct.unpack("<i", payload)[0]
            else:
                raise AssertionError(f"unexpected frame {ftype} {payload!r}")


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        raise SystemExit(1)


def smoke_agent() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sock_path = os.path.join(tmp, "hvc.sock")
        serial_log = os.path.join(tmp, "serial.log")
        append = "console=ttyS0 panic=-1 rdinit=/init"
        cmd = qemu_base(
            ["-machine", "microvm,acpi=off,pic=on,pit=on,rtc=on,isa-serial=on,ioapic2=off",
             "-cpu", "qemu32,-apic"],
            append,
        ) + [
            "-serial", f"file:{serial_log}",
            "-chardev", f"socket,id=hvc,path={sock_path},server=on,wait=off",
            "-device", "virtio-serial-device", "-device", "virtconsole,chardev=hvc",
        ]
        print("$ " + " ".join(cmd))
        qemu = subprocess.Popen(cmd)
        try:
            for _ in range(100):
                if os.path.exists(sock_path):
                    break
                time.sleep(0.05)
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(sock_path)
            ch = Channel(sock)
            t0 = time.monotonic()
            ftype, fid, payload = ch.recv()
            check(ftype == "R" and payload.startswith(b"Linux "), f"READY {payload.decode()!r} "
                  f"after {time.monotonic() - t0:.1f} s")

            out, err, st = ch.run(1, ["sh", "-c", "echo $((6*7)); echo err >&2; exit 3"])
            check((out, err, st) == (b"42\n", b"err\n", 3), f"exec: {out!r} {err!r} {st}")

            out, err, st = ch.run(2, ["no-such-command"])
            check(st == 127 and b"not found" in err, f"missing command: {err!r} {st}")

            ch.send("X", 3, b"\0sleep\0" + b"100\0")
            time.sleep(0.5)
            ch.send("K", 3, struct.pack("<I", 9))
            ftype, fid, payload = ch.recv()
            check((ftype, fid, payload) == ("S", 3, struct.pack("<i", 128 + 9)), f"kill -9 → 137: {ftype} {fid} {payload!r}")

            data = os.urandom(100 * 1024)
            ch.send("P", 4, b"/tmp/a/b/blob\0" + struct.pack("<I", 0o600))
            for off in range(0, len(data), 32 * 1024):
                ch.send("D", 4, data[off : off + 32 * 1024])
            ch.send("D", 4)
            check(ch.recv() == ("A", 4, b""), "put 100 KiB")
            ch.send("G", 5, b"/tmp/a/b/blob")
            got = b""
            while True:
                ftype, fid, payload = ch.recv()
                assert (ftype, fid) == ("F", 5), (ftype, fid, payload)
                if not payload:
                    break
                got += payload
            check(got == data, "get returns the same 100 KiB")

            ch.send("Q", 0)
            halted = False
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and qemu.poll() is None:
                text = Path(serial_log).read_text(errors="replace")
                if "reboot: System halted" in text or "reboot: Power down" in text:
                    halted = True
                    break
                time.sleep(0.2)
            check(halted or qemu.poll() is not None, "quit halts the guest")
        finally:
            if qemu.poll() is None:
                qemu.kill()
            qemu.wait()


def smoke_shell() -> None:
    append = "console=ttyS0 panic=-1 rdinit=/init conode.shell=1"
    cmd = qemu_base(["-machine", "pc"], append) + ["-serial", "stdio"]
    print("$ " + " ".join(cmd))
    qemu = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert qemu.stdin is not None and qemu.stdout is not None
    fd = qemu.stdout.fileno()
    log = b""

    def wait_until(cond, timeout: float) -> bool:
        """Read serial output until cond(log) holds or the time is up."""
        nonlocal log
        deadline = time.monotonic() + timeout
        while not cond(log):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return cond(log)
                log += chunk
        return True

    def typed(line: bytes) -> None:
        qemu.stdin.write(line + b"\n")
        qemu.stdin.flush()

    try:
        check(wait_until(lambda t: b"cannot open /dev/hvc0" in t, 60), "agent reports the missing /dev/hvc0")
        check(wait_until(lambda t: b"# " in t, 30), "shell prompt on ttyS0")
        typed(b"echo hi-$((40+2)); uname -m")
        check(wait_until(lambda t: b"hi-42" in t and b"i686" in t, 30), "shell answers")
        banners = log.count(b"built-in shell")
        typed(b"exit")
        check(wait_until(lambda t: t.count(b"built-in shell") > banners, 30), "shell is respawned after exit")
    finally:
        qemu.kill()
        qemu.wait()


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    for path in (KERNEL, INITRD):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run guest/build.sh first")
    if what in ("agent", "all"):
        smoke_agent()
    if what in ("shell", "all"):
        smoke_shell()


if __name__ == "__main__":
    main()
