# SPDX-License-Identifier: GPL-2.0-or-later
"""The coordinator tells each agent's switch exactly the agents it shares a guest network with."""

from hypothesis import given
from hypothesis import strategies as st

from coordinator.conet_peers import PeerDirectory


def names(peers):
    return [p["node"] for p in peers]


def test_only_agents_sharing_a_network_are_peers():
    d = PeerDirectory()
    for node in ("a", "b", "c"):
        d.node_joined(node, f"tcp://{node}:7704", f"key-{node}")
    assert d.changes() == {}  # nobody shares anything yet: no lists to send
    d.guest_placed(10, "job:1", "a")
    d.guest_placed(11, "job:1", "b")
    d.guest_placed(12, "job:2", "c")
    changes = d.changes()
    assert {n: names(p) for n, p in changes.items()} == {"a": ["b"], "b": ["a"]}
    assert changes["a"][0] == {"node": "b", "endpoint": "tcp://b:7704", "key": "key-b", "networks": ["job:1"]}
    assert d.changes() == {}  # told once
    d.guest_gone(11)
    assert {n: names(p) for n, p in d.changes().items()} == {"a": [], "b": []}


def test_each_peer_comes_with_the_networks_shared_with_it():
    d = PeerDirectory()
    for node in ("a", "b"):
        d.node_joined(node, f"tcp://{node}:7704", f"key-{node}")
    d.guest_placed(1, "red", "a")
    d.guest_placed(2, "blue", "a")
    d.guest_placed(3, "red", "b")
    assert [p["networks"] for p in d.changes()["a"]] == [["red"]]
    d.guest_placed(4, "blue", "b")  # a second shared network: the lists change
    assert {n: [p["networks"] for p in peers] for n, peers in d.changes().items()} == {
        "a": [["blue", "red"]], "b": [["blue", "red"]]}


def test_a_node_that_leaves_is_dropped_from_its_peers_lists():
    d = PeerDirectory()
    d.node_joined("a", "tcp://a:1", "ka")
    d.node_joined("b", "tcp://b:1", "kb")
    d.guest_placed(1, "net:shared", "a")
    d.guest_placed(2, "net:shared", "b")
    d.changes()
    d.node_left("b")
    assert d.changes() == {"a": []}
    d.node_joined("b", None, "kb")  # back, but without a switch: never listed
    d.guest_placed(3, "net:shared", "b")
    assert d.changes() == {}


@given(st.lists(st.tuples(st.sampled_from(["place", "gone", "join", "leave"]), st.integers(0, 6),
                          st.sampled_from(["n1", "n2", "n3"]), st.sampled_from(["x", "y"]))))
def test_told_lists_always_match_the_truth(operations):
    d = PeerDirectory()
    guests = {}
    for op, guest, node, network in operations:
        if op == "place":
            d.guest_placed(guest, network, node)
            guests[guest] = (network, node)
        elif op == "gone":
            d.guest_gone(guest)
            guests.pop(guest, None)
        elif op == "join":
            d.node_joined(node, f"tcp://{node}", node)
        else:
            d.node_left(node)
            guests = {g: v for g, v in guests.items() if v[1] != node}
        d.changes()
        for me in ("n1", "n2", "n3"):
            if d._endpoints.get(me):
                mine = {net for net, n in guests.values() if n == me}
                truth = sorted({n for net, n in guests.values() if net in mine and n != me and n in d._endpoints})
                assert names(d._sent.get(me, [])) == truth
                for peer in d._sent.get(me, []):
                    theirs = {net for net, n in guests.values() if n == peer["node"]}
                    assert peer["networks"] == sorted(mine & theirs)
