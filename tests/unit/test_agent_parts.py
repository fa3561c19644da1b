import pytest

from conode.agent.outbox import Outbox
from conode.agent.pipe import PipeError, Unpacker, pack
from conode.cluster.heartbeat import PeerLiveness
from conode.cluster.protocol import RECONNECT_MAX_S
from conode.testing.clock import FakeClock


def test_liveness_expires_after_missed_beats_and_back_off_doubles_to_a_cap():
    clock = FakeClock(100.0)
    peer = PeerLiveness(clock, interval=1.0, liveness=3)
    clock.advance(2.9)
    assert not peer.expired()
    clock.advance(0.2)
    assert peer.expired()
    peer.heard()
    assert not peer.expired()
    delays = [peer.next_backoff() for _ in range(8)]
    assert delays[:3] == [0.5, 1.0, 2.0] and max(delays) == RECONNECT_MAX_S
    peer.heard()
    assert peer.next_backoff() == 0.5


def test_beats_are_due_once_per_interval():
    clock = FakeClock(100.0)
    peer = PeerLiveness(clock, interval=1.0)
    assert not peer.beat_due()
    clock.advance(1.0)
    assert peer.beat_due() and not peer.beat_due()


def test_pipe_messages_survive_any_chunking():
    stream = b"".join(pack({"type": "output", "data": bytes([i]) * i}) for i in range(50))
    unpacker, got = Unpacker(), []
    for start in range(0, len(stream), 7):
        got += unpacker.feed(stream[start:start + 7])
    assert [m["data"] for m in got] == [bytes([i]) * i for i in range(50)]


def test_pipe_garbage_is_an_error():
    with pytest.raises(PipeError):
        Unpacker().feed(b"\x00\x00\x00\x02\xc1\xc1")
    with pytest.raises(PipeError):
        Unpacker().feed(b"\xff\xff\xff\xff")


def test_outbox_keeps_results_until_acknowledged(tmp_path):
    box = Outbox(tmp_path / "outbox")
    box.put(7, b"seven")
    box.put(3, b"three")
    again = Outbox(tmp_path / "outbox")  # an agent restart
    assert again.items() == [(3, b"three"), (7, b"seven")]
    again.remove(3)
    assert again.jobs() == [7]


def test_outbox_keeps_results_in_memory_when_the_disk_refuses(tmp_path):
    (tmp_path / "outbox").write_text("a file where the outbox directory should be")
    box = Outbox(tmp_path / "outbox")
    box.put(5, b"five")
    assert box.items() == [(5, b"five")] and 5 in box
    box.remove(5)
    assert box.jobs() == []
