from hypothesis import given
from hypothesis import strategies as st

from coordinator.placement import NodeView, choose_node


def node(name, state="Unclaimed", cores=1, mem=128, running=0, idle=60.0, drained=False):
    """A node whose owner left *idle* seconds before time 0."""
    return NodeView(name, state, cores, mem, running, -idle, drained)


def test_idle_nodes_first_then_least_loaded():
    nodes = [node("busy", cores=4, running=1), node("idle", cores=1), node("fuller", cores=2, running=1)]
    assert choose_node(128, nodes) == "idle"
    assert choose_node(128, nodes[:1] + nodes[2:]) == "busy"  # 1/4 loaded beats 1/2


def test_longest_idle_owner_wins_a_tie():
    assert choose_node(64, [node("recent", idle=30), node("long-gone", idle=3000)]) == "long-gone"


def test_short_jobs_are_spread_over_idle_nodes():
    from dataclasses import replace

    nodes = [node("a"), node("b"), node("c")]
    order = []
    for clock in range(1, 7):
        chosen = choose_node(64, nodes)
        order.append(chosen)
        nodes = [replace(n, last_placed=clock) if n.name == chosen else n for n in nodes]
    assert order == ["a", "b", "c", "a", "b", "c"]


def test_memory_state_drain_and_capacity_are_respected():
    assert choose_node(256, [node("small", mem=128)]) is None
    assert choose_node(64, [node("owner-back", state="Owner")]) is None
    assert choose_node(64, [node("suspended", state="Suspended")]) is None
    assert choose_node(64, [node("drained", drained=True)]) is None
    assert choose_node(64, [node("full", cores=2, running=2)]) is None


@given(st.lists(st.builds(node, st.text(min_size=1, max_size=5), st.sampled_from(["Owner", "Unclaimed", "Claimed"]),
                          st.integers(1, 8), st.sampled_from([64, 128, 256]), st.integers(0, 8),
                          st.floats(0, 1e5), st.booleans()), max_size=12),
       st.sampled_from([48, 128, 256]))
def test_a_chosen_node_can_always_take_the_job(nodes, mem):
    chosen = choose_node(mem, nodes)
    fits = [n for n in nodes if n.state in ("Unclaimed", "Claimed") and not n.drained and n.running < n.cores
            and n.mem_mib >= mem]
    if chosen is None:
        assert not fits
    else:
        assert chosen in {n.name for n in fits}


def test_open_nodes_choose_what_choose_node_would():
    """The index kept in preference order, updated as the coordinator updates it, chooses as a look at every node
    does, for jobs of every size; nodes that cannot take work are not in it."""
    import random

    from coordinator.placement import OpenNodes

    rng = random.Random(3)
    nodes: dict[str, NodeView] = {}
    index = OpenNodes()
    for step in range(2000):
        name = f"n{rng.randrange(30)}"
        if rng.random() < 0.1:
            nodes.pop(name, None)
            index.discard(name)
        else:
            cores = rng.randrange(1, 5)
            view = NodeView(name, rng.choice(["Unclaimed", "Claimed", "Owner"]), cores, rng.choice([64, 128, 256]),
                            rng.randrange(cores + 1), rng.choice([-100.0, -10.0, float(step)]), rng.random() < 0.1,
                            rng.choice([0.0, float(step)]), rng.choice([None, 0, 1]))
            nodes[name] = view
            index.update(view)
        assert set(index) == {n for n, v in nodes.items() if v.state != "Owner" and not v.drained
                              and v.running < v.cores}
        for mem in (48, 128, 256):
            for image in (0, 1 << 20):
                assert index.choose(mem, image) == choose_node(mem, list(nodes.values()), image), step
