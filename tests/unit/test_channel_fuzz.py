"""The host side of the guest channel is total: whatever bytes a hostile guest sends, the client either makes
progress or reports one violation — it never raises, never holds more than the limits allow, and never
reports more output than was asked for."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from conode import limits
from conode.vm import channel
from conode.vm.guest_agent import GuestAgentClient

KINDS = [b"R", b"O", b"E", b"S", b"A", b"F", b"Z", b"X", b"\x00", b"\xff"]


class Recorder:
    def __init__(self) -> None:
        self.output = 0
        self.exits: list[int] = []
        self.errors: list[str] = []

    def on_output(self, stream: str, data: bytes) -> None:
        assert stream in ("stdout", "stderr")
        self.output += len(data)

    def on_exit(self, status: int) -> None:
        self.exits.append(status)

    def on_error(self, message: str) -> None:
        self.errors.append(message)


def _client() -> tuple[GuestAgentClient, Recorder, list[tuple], list[str]]:
    sent: list[bytes] = []
    client = GuestAgentClient(sent.append)
    client.guest = "Linux test"  # as restored from a snapshot: READY was said at boot
    violations: list[str] = []
    client.on_violation = violations.append
    recorder = Recorder()
    client.run(["true"], recorder, ident=1)
    fetched: list[tuple] = []
    client.fetch_file("/job/1", "out", 1000, lambda data, error: fetched.append((data, error)))
    client.put_file("/job/1/in", b"x", lambda error: fetched.append(("put", error)))
    return client, recorder, fetched, violations


frame_items = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from([0, 1, 2, 3, 4, 2**32 - 1]),
                                 st.binary(max_size=1200)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(frame_items, st.lists(st.integers(1, 200), min_size=1), st.binary(max_size=64))
def test_any_frame_stream_is_progress_or_one_violation(items, cuts, garbage):
    client, recorder, fetched, violations = _client()
    stream = b"".join(channel.HEADER.pack(k[0], i, len(p)) + p for k, i, p in items) + garbage
    pos = n = 0
    while pos < len(stream):
        step = cuts[n % len(cuts)]
        client.feed(stream[pos:pos + step])  # never raises
        pos, n = pos + step, n + 1
    assert len(violations) <= 1
    if violations:
        assert client.violation == violations[0]
    assert len(recorder.exits) <= 1
    for data, error in [f for f in fetched if f[0] != "put"]:
        assert data is None or len(data) <= 1000
    assert client.pending_bytes <= channel.HEADER.size + channel.MAX_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data):
    client, _, _, violations = _client()
    client.feed(data)
    client.feed(data)
    assert len(violations) <= 1


def test_second_ready_is_a_violation():
    client, _, _, violations = _client()
    client.feed(channel.frame(channel.READY, 0, b"Linux forged"))
    assert violations and "READY" in violations[0]
    # Nothing is read after a violation.
    client.feed(channel.frame(channel.EXIT, 1, struct.pack("<i", 0)))
    assert client.violation == violations[0] and len(violations) == 1


def test_file_beyond_its_limit_is_a_violation():
    client, _, fetched, violations = _client()
    client.feed(channel.frame(channel.FILE, 2, b"y" * 600) + channel.frame(channel.FILE, 2, b"y" * 600))
    assert violations and "1000-byte limit" in violations[0] and fetched == []


def test_oversized_frame_header_is_a_violation():
    client, _, _, violations = _client()
    client.feed(channel.HEADER.pack(ord("O"), 1, limits.CHANNEL_MAX_PAYLOAD + 1))
    assert violations and "limit" in violations[0]


def test_malformed_exit_status_is_a_violation():
    client, recorder, _, violations = _client()
    client.feed(channel.frame(channel.EXIT, 1, b"\x00"))
    assert violations and recorder.exits == []


def test_stray_frames_for_ended_requests_are_ignored():
    client, recorder, _, violations = _client()
    client.feed(channel.frame(channel.EXIT, 1, struct.pack("<i", 3)))
    client.feed(channel.frame(channel.STDOUT, 1, b"late") + channel.frame(channel.EXIT, 1, struct.pack("<i", 4))
                + channel.frame(channel.ACK, 99) + channel.frame(channel.FILE, 77, b"z"))
    assert recorder.exits == [3] and recorder.output == 0 and not violations
