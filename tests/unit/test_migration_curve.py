"""The agents' migration link: ZeroMQ PAIR sockets under CURVE, admitting only the expected peer's key."""

import pytest
import zmq

from conode.cluster.keys import generate_key_pair
from conode.migration import curve
from conode.migration.stream import (
    HELLO,
    PAGES,
    READY,
    FrameStream,
    Hello,
    MigrationError,
    pack_hello,
    unpack_hello,
)


@pytest.fixture
def keys(tmp_path):
    return {name: generate_key_pair(tmp_path, name) for name in ("source", "destination", "stranger")}


def test_frames_cross_the_encrypted_link_both_ways(keys):
    context = zmq.Context()
    listener, endpoint = curve.listen(context, "tcp://127.0.0.1:*", keys["destination"], keys["source"].public,
                                      timeout_s=10)
    client = curve.connect(context, endpoint, keys["destination"].public, keys["source"], timeout_s=10)
    try:
        sender, receiver = FrameStream(client, "the destination"), FrameStream(listener, "the source")
        page_run = bytes(4) + bytes(range(256)) * 4096  # a 1 MiB PAGES frame
        sender.send_preamble()
        sender.send(HELLO, pack_hello(Hello("g1", 64 << 20)))
        sender.send(PAGES, page_run)
        receiver.receive_preamble()
        assert unpack_hello(receiver.receive(HELLO)[1]) == Hello("g1", 64 << 20)
        assert receiver.receive(PAGES)[1] == page_run
        receiver.send(READY)
        assert sender.receive(READY) == (READY, b"")
    finally:
        client.close()
        listener.close()
        context.term()


def test_a_peer_with_another_key_gets_nothing_through(keys):
    context = zmq.Context()
    listener, endpoint = curve.listen(context, "tcp://127.0.0.1:*", keys["destination"], keys["source"].public,
                                      timeout_s=1.5)
    client = curve.connect(context, endpoint, keys["destination"].public, keys["stranger"], timeout_s=1.5)
    try:
        with pytest.raises(MigrationError, match="failed while reading the preamble: timed out"):
            sender = FrameStream(client, "the destination")
            try:
                sender.send_preamble()
            except MigrationError:
                pass  # nothing can be queued for a refused peer
            FrameStream(listener, "the source").receive_preamble()
    finally:
        client.close()
        listener.close()
        context.term()
