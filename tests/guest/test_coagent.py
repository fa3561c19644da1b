# SPDX-License-Identifier: GPL-2.0-or-later
"""Host-side tests of the in-guest agent's protocol.

coagent is a plain static i386 Linux program, so it runs directly on an x86
host.  Each test starts it with ``--device /dev/pts/N --no-pid1`` on the slave
side of a fresh pty and speaks the frame protocol on the master side.

The binary is taken from ``$COAGENT`` if set, else from the packaged initramfs
(the very binary the guest runs), else compiled from coagent.c with
``gcc -m32 -static``; if none works the tests are skipped.
"""

from __future__ import annotations

import gzip
import os
import select
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "guest" / "agent" / "coagent.c"
HDR = struct.Struct("<BII")
TIMEOUT = 10.0


@pytest.fixture(scope="session")
def coagent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("COAGENT")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.skip(f"COAGENT={env} does not exist")
        return path
    out = tmp_path_factory.mktemp("coagent") / "coagent"
    shipped = _extract_from_initramfs("sbin/coagent")
    if shipped is not None:
        out.write_bytes(shipped)
        out.chmod(0o755)
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("coagent is not built: set COAGENT=/path/to/coagent or install gcc + gcc-multilib")
    proc = subprocess.run(
        [gcc, "-m32", "-static", "-Os", "-s", "-Wall", "-o", str(out), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(
            "coagent is not built and cannot be compiled here (needs gcc-multilib "
            f"for -m32 -static); set COAGENT=/path/to/coagent. gcc said: {proc.stderr.strip()[:300]}"
        )
    return out


def _extract_from_initramfs(name: str) -> bytes | None:
    """A file from the packaged initramfs (gzip'd newc cpio), or None."""
    from conode.vm.guest_image import INITRD_NAME, packaged_image_dir

    try:
        archive = gzip.decompress((packaged_image_dir() / INITRD_NAME).read_bytes())
    except OSError:
        return None
    offset = 0
    while archive[offset:offset + 6] in (b"070701", b"070702"):
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_start = offset + 110
        entry = archive[name_start:name_start + name_size - 1].decode()
        data_start = (name_start + name_size + 3) & ~3
        if entry == name:
            return archive[data_start:data_start + size]
        if entry == "TRAILER!!!":
            return None
        offset = (data_start + size + 3) & ~3
    return None


class Agent:
    """A running coagent on a pty, with frame-level send and receive."""

    def __init__(self, binary: Path) -> None:
        self.master, slave = os.openpty()
        slave_path = os.ttyname(slave)
        self.proc = subprocess.Popen(
            [str(binary), "--device", slave_path, "--no-pid1"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.buf = b""
        try:
            self.ready = self.recv()
        finally:
            # The agent has the slave open (and in raw mode) by now, or failed.
            os.close(slave)

    def send(self, ftype: bytes, fid: int, payload: bytes = b"") -> None:
        data = HDR.pack(ftype[0], fid, len(payload)) + payload
        while data:
            n = os.write(self.master, data)
            data = data[n:]

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no frame from coagent; buffered {self.buf[:64]!r}")
        r, _, _ = select.select([self.master], [], [], left)
        if r:
            self.buf += os.read(self.master, 65536)

    def recv(self, timeout: float = TIMEOUT) -> tuple[bytes, int, bytes]:
        deadline = time.monotonic() + timeout
        while len(self.buf) < HDR.size:
            self._fill(deadline)
        ftype, fid, length = HDR.unpack_from(self.buf)
        while len(self.buf) < HDR.size + length:
            self._fill(deadline)
        payload = self.buf[HDR.size : HDR.size + length]
        self.buf = self.buf[HDR.size + length :]
        return bytes([ftype]), fid, payload

    def exec(self, fid: int, argv: list[str], cwd: str = "") -> None:
        payload = b"".join(s.encode() + b"\0" for s in [cwd, *argv])
        self.send(b"X", fid, payload)

    def collect(self, ids: set[int]) -> dict[int, dict]:
        """Gather O/E/S frames until every id in ids has its status."""
        res = {i: {"O": b"", "E": b"", "S": None} for i in ids}
        pending = set(ids)
        while pending:
            ftype, fid, payload = self.recv()
            assert fid in res, (ftype, fid, payload)
            t = ftype.decode()
            assert res[fid]["S"] is None, f"frame {t} after status for id {fid}"
            if t in ("O", "E"):
                res[fid][t] += payload
            elif t == "S":
                (res[fid]["S"],) = struct.unpack("<i", payload)
                pending.discard(fid)
            else:
                raise AssertionError(f"unexpected frame {ftype!r} {fid} {payload!r}")
        return res

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        if self.proc.stderr:
            self.proc.stderr.close()
        os.close(self.master)


@pytest.fixture
def agent(coagent_bin: Path):
    a = Agent(coagent_bin)
    yield a
    a.close()


def test_ready(agent: Agent) -> None:
    ftype, fid, payload = agent.ready
    assert ftype == b"R" and fid == 0
    sysname, release, machine = payload.decode().split(" ")
    assert sysname == "Linux"
    assert release and machine


def test_exec_output_and_status(agent: Agent) -> None:
    agent.exec(7, ["sh", "-c", "echo $((6*7)); echo err >&2; exit 3"])
    res = agent.collect({7})[7]
    assert res == {"O": b"42\n", "E": b"err\n", "S": 3}


def test_exec_cwd_is_created(agent: Agent, tmp_path: Path) -> None:
    cwd = tmp_path / "a" / "b"
    agent.exec(1, ["pwd"], cwd=str(cwd))
    res = agent.collect({1})[1]
    assert res["S"] == 0
    assert res["O"] == str(cwd).encode() + b"\n"


def test_exec_missing_command(agent: Agent) -> None:
    agent.exec(2, ["no-such-command-xyz"])
    res = agent.collect({2})[2]
    assert res["S"] == 127
    assert res["O"] == b""
    assert res["E"] == b"no-such-command-xyz: not found\n"


def test_exec_killed_by_signal(agent: Agent) -> None:
    agent.exec(3, ["sleep", "30"])
    time.sleep(0.2)
    agent.send(b"K", 3, struct.pack("<I", 15))
    res = agent.collect({3})[3]
    assert res["S"] == 128 + 15


def test_put_get_roundtrip(agent: Agent, tmp_path: Path) -> None:
    data = os.urandom(100 * 1024)
    path = tmp_path / "sub" / "dir" / "blob.bin"
    agent.send(b"P", 10, str(path).encode() + b"\0" + struct.pack("<I", 0o640))
    for off in range(0, len(data), 30000):
        agent.send(b"D", 10, data[off : off + 30000])
    agent.send(b"D", 10, b"")
    assert agent.recv() == (b"A", 10, b"")
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o7777 == 0o640

    agent.send(b"G", 11, get_payload(tmp_path, "sub/dir/blob.bin", len(data)))
    got = b""
    while True:
        ftype, fid, payload = agent.recv()
        assert (ftype, fid) == (b"F", 11)
        assert len(payload) <= 32 * 1024
        if not payload:
            break
        got += payload
    assert got == data


def get_payload(root: Path, relative: str, max_bytes: int) -> bytes:
    return str(root).encode() + b"\0" + relative.encode() + b"\0" + struct.pack("<I", max_bytes)


def get_refused(agent: Agent, fid: int, root: Path, relative: str, max_bytes: int = 1 << 20) -> bytes:
    agent.send(b"G", fid, get_payload(root, relative, max_bytes))
    ftype, got_id, payload = agent.recv()
    assert (ftype, got_id) == (b"Z", fid), payload
    return payload


def test_get_missing_file(agent: Agent, tmp_path: Path) -> None:
    assert b"No such file" in get_refused(agent, 12, tmp_path, "nope")


def test_get_refuses_what_is_not_a_plain_file_inside_the_job(agent: Agent, tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"s")
    (job / "zero").symlink_to("/dev/zero")
    (job / "out").symlink_to(tmp_path / "secret")
    (job / "escape").symlink_to(tmp_path)
    os.mkfifo(job / "fifo")
    (job / "big").write_bytes(b"x" * 5000)
    assert b"symbolic link" in get_refused(agent, 50, job, "zero")
    assert b"symbolic link" in get_refused(agent, 51, job, "out")
    assert b"outside the job directory" in get_refused(agent, 52, job, "escape/secret")
    assert b"not a regular file" in get_refused(agent, 53, job, "fifo")  # and it did not block
    assert b"not a regular file" in get_refused(agent, 54, job, "sub")
    assert b"more than the limit of 4999" in get_refused(agent, 55, job, "big", 4999)
    assert b"malformed" in get_refused(agent, 56, job, "")
    agent.send(b"G", 57, get_payload(job, "big", 5000))
    assert agent.recv() == (b"F", 57, b"x" * 5000)
    assert agent.recv() == (b"F", 57, b"")


def test_renew_refuses_a_malformed_payload(agent: Agent) -> None:
    # A well-formed renew would set this host's clock: the real one is tested in the guest.
    agent.send(b"N", 60, b"short")
    ftype, fid, payload = agent.recv()
    assert (ftype, fid) == (b"Z", 60) and b"malformed" in payload


IDENTITY = [b"mac=02:c0:de:00:00:01", b"addr=10.77.0.1/24", b"hostname=rank0", b"host=10.77.0.2 rank1",
            b"env=CONODE_RANK=0"]


@pytest.mark.parametrize("field,bad", [
    (0, b"mac=03:c0:de:00:00:01"), (0, b"mac=02:c0:de:00:00"), (0, b"mac=00:00:00:00:00:00"),
    (0, b"mac=02-c0-de-00-00-01"), (1, b"addr=10.77.0.1"), (1, b"addr=10.77.0.1/31"), (1, b"addr=10.77.0/24"),
    (1, b"addr=10.77.0.1/24x"), (2, b"hostname=-rank0"), (2, b"hostname=" + b"a" * 64), (2, b"hostname=a..b"),
    (3, b"host=10.77.0.2"), (3, b"host=10.77.0.2 bad name"), (3, b"host=10.77.0.300 rank1"),
    (4, b"env=PATH=/evil"), (4, b"env=CONODE_RANK=0\n1"), (4, b"env=CONODE_=1"), (4, b"color=blue"),
])
def test_identity_refuses_what_it_cannot_apply(agent: Agent, field: int, bad: bytes) -> None:
    # Refused before anything changes (a valid identity would reconfigure this host: it is tested in the guest).
    fields = list(IDENTITY)
    fields[field] = bad
    agent.send(b"I", 62, b"".join(f + b"\0" for f in fields))
    ftype, fid, payload = agent.recv()
    assert (ftype, fid) == (b"Z", 62) and payload.startswith(b"identity: "), payload
    agent.send(b"I", 63, b"mac=02:c0:de:00:00:01")  # not NUL-terminated
    assert agent.recv()[2] == b"identity: malformed payload"


def test_kill_all_is_refused_outside_pid1(agent: Agent) -> None:
    agent.exec(61, ["sh", "-c", "sleep 0.3; echo survived"])
    agent.send(b"K", 0, struct.pack("<I", 9))  # a no-op off PID 1: this host's processes are not the guest's
    assert agent.collect({61})[61] == {"O": b"survived\n", "E": b"", "S": 0}


def test_put_error_ignores_later_data(agent: Agent, tmp_path: Path) -> None:
    # The parent "directory" is a regular file, so the PUT must fail.
    (tmp_path / "file").write_bytes(b"x")
    agent.send(b"P", 13, str(tmp_path / "file" / "x").encode() + b"\0" + struct.pack("<I", 0o644))
    agent.send(b"D", 13, b"data")
    agent.send(b"D", 13, b"")
    ftype, fid, payload = agent.recv()
    assert (ftype, fid) == (b"Z", 13)
    # Nothing else for id 13: the next frame is the answer to a fresh exec.
    agent.exec(14, ["true"])
    assert agent.collect({14})[14]["S"] == 0


def test_oversized_frame_is_skipped(agent: Agent) -> None:
    big = (1 << 20) + 1
    agent.send(b"X", 20, b"\0" * big)
    ftype, fid, _ = agent.recv()
    assert (ftype, fid) == (b"Z", 20)
    agent.exec(21, ["echo", "still alive"])
    assert agent.collect({21})[21] == {"O": b"still alive\n", "E": b"", "S": 0}


def test_split_frames(agent: Agent) -> None:
    payload = b"\0" + b"echo\0split\0"
    frame = HDR.pack(ord("X"), 30, len(payload)) + payload
    for i in range(len(frame)):
        os.write(agent.master, frame[i : i + 1])
        time.sleep(0.002)
    assert agent.collect({30})[30] == {"O": b"split\n", "E": b"", "S": 0}


def test_concurrent_execs(agent: Agent) -> None:
    # The first job waits until the second has finished, so they overlap.
    agent.exec(40, ["sh", "-c", "sleep 0.5; seq 1 2000; echo slow >&2; exit 4"])
    agent.exec(41, ["sh", "-c", "echo fast; exit 5"])
    order = []
    res = {40: {"O": b"", "E": b"", "S": None}, 41: {"O": b"", "E": b"", "S": None}}
    while any(r["S"] is None for r in res.values()):
        ftype, fid, payload = agent.recv()
        t = ftype.decode()
        if t == "S":
            (res[fid]["S"],) = struct.unpack("<i", payload)
            order.append(fid)
        else:
            res[fid][t] += payload
    assert order == [41, 40]
    assert res[41] == {"O": b"fast\n", "E": b"", "S": 5}
    expected = "".join(f"{i}\n" for i in range(1, 2001)).encode()
    assert res[40] == {"O": expected, "E": b"slow\n", "S": 4}


def test_quit_exits_in_no_pid1_mode(agent: Agent) -> None:
    agent.send(b"Q", 0)
    assert agent.proc.wait(timeout=TIMEOUT) == 0
