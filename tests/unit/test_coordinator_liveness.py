# SPDX-License-Identifier: GPL-2.0-or-later
"""The coordinator's liveness timers (coordinator/liveness.py) against a fake clock, and against the plain rule
they replace: lose a node silent for longer than the limit, checked at every tick."""

from __future__ import annotations

import random

from conode.testing.clock import FakeClock
from coordinator.liveness import Liveness


def make(clock: FakeClock) -> Liveness:
    return Liveness(clock, interval=1.0, limit=3.0)


def test_a_node_heard_within_the_limit_is_never_lost():
    clock = FakeClock()
    live = make(clock)
    live.add("a")
    assert live.due() == []
    for _ in range(50):
        clock.advance(0.25)
        live.heard("a")
        assert live.due() == []
    clock.advance(2.9)
    assert live.due() == [] and "a" in live


def test_a_silent_node_is_lost_just_after_the_limit_and_forgotten():
    clock = FakeClock()
    live = make(clock)
    live.add("a")
    clock.advance(2.9)
    assert live.due() == []
    clock.advance(0.2)  # 3.1 s of silence
    assert live.due() == ["a"]
    assert "a" not in live and len(live) == 0
    clock.advance(10)
    assert live.due() == []


def test_a_removed_node_is_never_due_and_an_added_again_one_starts_afresh():
    clock = FakeClock()
    live = make(clock)
    live.add("a")
    live.add("b")
    live.remove("a")
    live.heard("a")  # a late message from a node that left: ignored
    assert "a" not in live
    clock.advance(0.5)
    live.add("b")  # hello again: its old timer is void
    clock.advance(2.6)
    assert live.due() == []  # b's old expiry has passed, its new one not yet
    clock.advance(0.5)
    assert live.due() == ["b"]
    clock.advance(10)
    assert live.due() == []


def test_many_nodes_leaving_do_not_leave_the_heap_growing():
    clock = FakeClock()
    live = make(clock)
    for round_ in range(50):
        for i in range(100):
            live.add(f"n{round_}-{i}")
        for i in range(100):
            live.remove(f"n{round_}-{i}")
        clock.advance(0.1)
        live.due()
    assert len(live._heap) <= 4 * len(live._entry) + 64


def test_same_decisions_as_checking_every_node_every_tick():
    """Random hearing, leaving and joining; at every tick the timers lose exactly the nodes the plain scan would."""
    rng = random.Random(7)
    clock = FakeClock()
    live = make(clock)
    last: dict[str, float] = {}
    for step in range(3000):
        clock.advance(0.1)
        now = clock()
        for _ in range(rng.randrange(4)):
            node = f"n{rng.randrange(40)}"
            roll = rng.random()
            if roll < 0.1:
                live.add(node)
                last[node] = now
            elif roll < 0.15:
                live.remove(node)
                last.pop(node, None)
            else:
                live.heard(node)
                if node in last:
                    last[node] = now
        lost = live.due()
        expected_lost = sorted(n for n, t in last.items() if now - t > 3.0)
        assert sorted(lost) == expected_lost, step
        for node in lost:
            del last[node]


def test_no_node_is_lost_while_the_caller_is_behind():
    clock = FakeClock()
    live = make(clock)
    live.add("a")
    clock.advance(5.0)
    assert live.due(expire=False) == []  # its heartbeat may wait unread: not lost
    clock.advance(0.5)
    live.heard("a")  # and there it was
    clock.advance(0.6)
    assert live.due() == []
    clock.advance(3.5)
    assert live.due() == ["a"]
