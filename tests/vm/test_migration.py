"""A running guest moves between two processes mid-job (pre-copy) and its job prints exactly what it prints when
run on the host CPU; a corrupt or truncated stream is refused and the guest goes on where it was. Both engines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, fast_engine_built
from guest_programs import build_static_i386, run_natively

from conode.cluster.keys import generate_key_pair

HERE = Path(__file__).parent
# steps, pages written per step, arithmetic per step, buffer MiB: several seconds of guest time on each engine
JOB = {"fast": ["steps", "3000", "64", "50000", "8"], "stock": ["steps", "160", "64", "50000", "8"]}


@pytest.fixture(scope="module")
def dirtier(tmp_path_factory) -> Path:
    return build_static_i386(HERE / "migration" / "dirtier.c", tmp_path_factory.mktemp("prog") / "dirtier")


def engines() -> list:
    return [pytest.param("fast", marks=pytest.mark.skipif(not fast_engine_built(), reason="the fast engine is not "
                                                          "built (`conode engine build`)")), "stock"]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_process_left():
    """A failed test leaves no harness process behind (a destination would wait for its source forever)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def harness(engine: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "conode.testing.migration", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "CONODE_ENGINE": engine})
    STARTED.append(process)
    return process


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=600)
    lines = out.decode().splitlines()
    assert process.returncode == 0 and lines, err.decode()[-3000:]
    return json.loads(lines[-1])


def listening(process: subprocess.Popen) -> str:
    """Where the destination listens."""
    line = process.stdout.readline()
    assert b"listening" in line, process.stderr.read().decode()[-3000:]
    return json.loads(line)["listening"]


def test_a_guest_moves_mid_job_and_its_output_is_unchanged(engine, dirtier, tmp_path):
    expected = run_natively(dirtier, *JOB[engine])
    sock = tmp_path / "migrate.sock"
    destination = harness(engine, "destination", str(sock), str(tmp_path / "after"))
    listening(destination)
    # A downtime limit this low keeps the rounds going: the guest dirties pages between them (and is slowed down).
    source = harness(engine, "--max-downtime", "0.002", "source", "--after-output", str(sock), str(tmp_path / "before"),
                     str(dirtier),
                     "0.5", *JOB[engine])
    sent, received = result(source), result(destination)
    assert sent["migrated"] and received["arrived"], (sent, received)
    assert sent["rounds"] >= 2, sent  # a second round: the pages dirtied during the first (then the final copy)
    assert received["status"] == 0 and received["failure"] is None, received
    before, after = (tmp_path / "before").read_bytes(), (tmp_path / "after").read_bytes()
    assert before and after, "the job must print on both sides of the move"
    assert before + after == expected
    assert 0 < sent["downtime_s"] < 5 and sent["bytes_sent"] >= received["bytes_received"] > 0
    assert sent["verified"] and received["verified"]  # every MiB of RAM checked after the hand-over


@pytest.mark.skipif(not fast_engine_built(), reason="the fast engine is not built (`conode engine build`)")
def test_a_guest_moves_over_the_agents_curve_link(dirtier, tmp_path):
    """The link agents use: ZeroMQ over TCP, CURVE with the two agents' key pairs."""
    for name in ("source", "destination"):
        generate_key_pair(tmp_path / "keys", name)
    expected = run_natively(dirtier, *JOB["fast"])
    curve = ["--curve", str(tmp_path / "keys")]
    destination = harness("fast", *curve, "destination", "tcp://127.0.0.1:*", str(tmp_path / "after"))
    address = listening(destination)
    source = harness("fast", *curve, "source", "--after-output", address, str(tmp_path / "before"), str(dirtier),
                     "0.5", *JOB["fast"])
    sent, received = result(source), result(destination)
    assert sent["migrated"] and received["arrived"] and received["status"] == 0, (sent, received)
    assert (tmp_path / "before").read_bytes() + (tmp_path / "after").read_bytes() == expected


class Tamper:
    """Between the source and the destination: passes the stream on, but flips one byte at *flip_at*, or ends it
    at *cut_at*."""

    def __init__(self, listen: Path, target: Path, flip_at: int | None = None, cut_at: int | None = None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(listen))
        self.listener.listen(1)
        self.target, self.flip_at, self.cut_at = target, flip_at, cut_at
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        source, _ = self.listener.accept()
        destination = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        destination.connect(str(self.target))
        threading.Thread(target=self._pipe, args=(destination, source, None, None), daemon=True).start()
        self._pipe(source, destination, self.flip_at, self.cut_at)

    @staticmethod
    def _pipe(reader: socket.socket, writer: socket.socket, flip_at: int | None, cut_at: int | None) -> None:
        passed = 0
        try:
            while data := reader.recv(1 << 16):
                data = bytearray(data)
                if flip_at is not None and passed <= flip_at < passed + len(data):
                    data[flip_at - passed] ^= 0x40
                if cut_at is not None and passed + len(data) >= cut_at:
                    writer.sendall(data[:cut_at - passed])
                    break
                writer.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for end in (reader, writer):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_a_damaged_stream_is_refused_and_the_guest_goes_on_at_the_source(engine, damage, dirtier, tmp_path):
    expected = run_natively(dirtier, *JOB[engine])
    sock, relay = tmp_path / "migrate.sock", tmp_path / "relay.sock"
    destination = harness(engine, "destination", str(sock), str(tmp_path / "after"))
    listening(destination)
    at = 3 << 20  # in the middle of the first round's pages
    Tamper(relay, sock, flip_at=at if damage == "flip" else None, cut_at=at if damage == "cut" else None)
    # Half a second after the job's first line, whatever the host's load: the job is still running then.
    source = harness(engine, "source", "--after-output", str(relay), str(tmp_path / "before"), str(dirtier), "0.5",
                     *JOB[engine])
    sent, received = result(source), result(destination)
    assert not received["arrived"]
    reason = "fails its checksum" if damage == "flip" else "truncated"
    assert reason in received["error"], received
    assert not sent["migrated"] and sent["status"] == 0 and sent["failure"] is None, sent
    assert (tmp_path / "before").read_bytes() == expected  # the whole job ran at the source, nothing lost
    assert not (tmp_path / "after").exists() or not (tmp_path / "after").read_bytes()


@pytest.fixture(params=engines())
def engine(request) -> str:
    return request.param
