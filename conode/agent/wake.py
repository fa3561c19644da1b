"""Waking the agent's poll loop from other threads, on every platform.

The loop waits on ZeroMQ sockets only (zmq.Poller can wait on pipe descriptors on POSIX alone), so threads that
read worker pipes signal it through an inproc PUSH → PULL pair: the loop polls the PULL socket beside the
coordinator's, and wakes as soon as a worker said something.
"""

from __future__ import annotations

import itertools
import os

import zmq

_numbers = itertools.count()


class Signal:
    """One thread's end of a Waker; ZeroMQ sockets are not shared between threads, so each has its own."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self._socket = context.socket(zmq.PUSH)
        self._socket.linger = 0
        self._socket.sndhwm = 1  # one pending wake-up says all there is to say
        self._socket.connect(address)

    def __call__(self) -> None:
        try:
            self._socket.send(b"", flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is already pending

    def close(self) -> None:
        self._socket.close(linger=0)


class Waker:
    def __init__(self, context: zmq.Context) -> None:
        self._context = context
        self.address = f"inproc://conode-agent-wake-{os.getpid()}-{next(_numbers)}"
        self.socket = context.socket(zmq.PULL)
        self.socket.linger = 0
        self.socket.bind(self.address)

    def signal(self) -> Signal:
        """A new signalling end, for use by the calling thread only."""
        return Signal(self._context, self.address)

    def drain(self) -> None:
        while True:
            try:
                self.socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return

    def close(self) -> None:
        self.socket.close(linger=0)
