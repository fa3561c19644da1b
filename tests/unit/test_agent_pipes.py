"""Real worker pipes (conode/agent/supervisor.py): threads read them and wake the loop's ZeroMQ poll.

The child here is a small Python script speaking the worker's pipe format, so no guest boots.
"""

import sys
import textwrap
import threading
import time

import pytest
import zmq

from conode.agent.daemon import TICK_MS
from conode.agent.pipe import PipeError
from conode.agent.supervisor import WorkerProcess
from conode.agent.wake import Waker

CHILD = textwrap.dedent("""
    import os, sys
    from conode.agent.pipe import pack, Unpacker
    out = sys.stdout.buffer
    out.write(pack({"type": "ready", "guest": "script", "speed": 1.0})); out.flush()
    unpacker = Unpacker()
    while True:
        data = os.read(0, 65536)
        if not data:
            sys.exit(3)
        for message in unpacker.feed(data):
            if message["type"] == "quit":
                sys.exit(0)
            if message["type"] == "garbage":
                out.write(b"\\x00\\x00\\x00\\x02\\xc1\\xc1"); out.flush()
            if message["type"] == "big":
                out.write(pack({"type": "output", "data": b"z" * message["size"]})); out.flush()
            if message["type"] == "die":
                sys.stderr.write("dying as asked\\n"); sys.stderr.flush()
                out.write(pack({"type": "resumed"})); out.flush()
                os._exit(9)
""")


def wait_for_messages(waker, worker, timeout=10.0):
    poller = zmq.Poller()
    poller.register(waker.socket, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    got = []
    while not got and time.monotonic() < deadline:
        poller.poll(TICK_MS)
        waker.drain()
        got = worker.messages()
    return got


@pytest.fixture
def pipe():
    """A started child and the waker its reader thread signals; both ended afterwards."""
    waker = Waker(zmq.Context.instance())
    worker = WorkerProcess(0, [sys.executable, "-c", CHILD], waker.signal)
    try:
        yield waker, worker
    finally:
        worker.kill()
        waker.close()


def test_messages_wake_the_loop_and_big_ones_arrive_whole(pipe):
    waker, worker = pipe
    assert wait_for_messages(waker, worker) == [{"type": "ready", "guest": "script", "speed": 1.0}]
    poller = zmq.Poller()
    poller.register(waker.socket, zmq.POLLIN)
    sent_at = time.monotonic()
    worker.send({"type": "big", "size": 5 << 20})  # far more than the pipe and the read-ahead hold
    got = []
    while not got:
        assert poller.poll(1000), "the reader thread did not wake the loop"
        waker.drain()
        got = worker.messages()
    assert len(got[0]["data"]) == 5 << 20 and time.monotonic() - sent_at < 10
    worker.send({"type": "quit"})
    deadline = time.monotonic() + 10
    while worker.exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.exit_code() == 0


def test_a_dying_worker_is_read_to_its_last_word(pipe):
    waker, worker = pipe
    wait_for_messages(waker, worker)
    worker.send({"type": "die"})
    deadline = time.monotonic() + 10
    last_words = []
    while not (worker.exit_code() is not None and worker.drained()) and time.monotonic() < deadline:
        last_words += worker.messages()  # drained() only once everything was handed over
        time.sleep(0.01)
    assert worker.exit_code() == 9 and last_words == [{"type": "resumed"}]
    while not worker.stderr_tail and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(worker.stderr_tail) == ["dying as asked"]
    assert not worker.send({"type": "quit"})  # a dead worker takes nothing


def test_garbage_on_the_pipe_is_a_pipe_error(pipe):
    waker, worker = pipe
    wait_for_messages(waker, worker)
    worker.send({"type": "garbage"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            worker.messages()
        except PipeError:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("garbage was not noticed")


def test_a_discarded_worker_leaves_no_reader_behind(pipe):
    waker, worker = pipe
    wait_for_messages(waker, worker)
    worker.send({"type": "big", "size": 16 << 20})  # more than the read-ahead: the reader waits for the agent
    time.sleep(0.5)
    worker.kill()  # the agent discards it without reading on

    def readers():
        return [t for t in threading.enumerate() if t.name == "worker-0-out"]

    deadline = time.monotonic() + 5
    while readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not readers()  # it gave up handing over chunks nobody will read, and ended
