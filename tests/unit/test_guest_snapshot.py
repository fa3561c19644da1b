"""The one snapshot envelope: written and read back, and anything malformed refused with SnapshotError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conode.errors import SnapshotError
from conode.vm.guest import SNAPSHOT_FORMAT, SNAPSHOT_KIND, GuestJob, GuestSnapshot, ImageDigests

VALID = {"kind": SNAPSHOT_KIND, "format": SNAPSHOT_FORMAT, "guest_id": "ab12", "image": {"kernel": "k", "initrd": "i"},
         "machine": {}, "agent": {}, "job": None, "created_at": 1.0}


def test_round_trip_through_a_file(tmp_path):
    snapshot = GuestSnapshot("g1", ImageDigests("k" * 64, "i" * 64), {"x": 1}, {"next_id": 3}, None, 12.5)
    path = tmp_path / "guest.snap"
    snapshot.write(path)
    assert GuestSnapshot.read(path) == snapshot


@pytest.mark.parametrize("change, message", [
    ({"kind": "conode-worker"}, "not a conode guest snapshot"),
    ({"format": SNAPSHOT_FORMAT + 1}, "format"),
    ({"image": "k"}, "not a complete"),
    ({"machine": []}, "not a complete"),
    ({"job": "running"}, "not a complete"),
    ({"created_at": "yesterday"}, "not a complete"),
])
def test_malformed_envelopes_are_refused(change, message):
    with pytest.raises(SnapshotError, match=message):
        GuestSnapshot.from_data({**VALID, **change}, "test.snap")


def test_a_missing_field_is_refused():
    data = dict(VALID)
    del data["agent"]
    with pytest.raises(SnapshotError, match="not a complete"):
        GuestSnapshot.from_data(data, "test.snap")


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                    | st.binary(max_size=8),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20))
def test_random_job_states_only_raise_snapshot_error(state):
    try:
        GuestJob.from_state(None, state, None)  # type: ignore[arg-type]
    except SnapshotError:
        pass



def test_a_job_state_round_trips_and_refuses_what_a_job_cannot_hold():
    from conode.vm.guest import JobSpec

    spec = JobSpec(7, ["sh", "-c", "true"], "/job/7", {"in.txt": b"data"}, ["out.txt"])
    data = GuestJob(None, spec, None).get_state()  # type: ignore[arg-type]
    again = GuestJob.from_state(None, data, None)  # type: ignore[arg-type]
    assert (again.spec, again.phase, again.command, again.status) == (spec, 0, None, None)
    for change, message in (({"ran_s": float("nan")}, "finite number"), ({"argv": []}, "no command"),
                            ({"phase": 9}, "out of range"), ({"version": 0}, "older conode")):
        with pytest.raises(SnapshotError, match=message):
            GuestJob.from_state(None, {**data, **change}, None)  # type: ignore[arg-type]


def test_the_channel_client_state_is_checked():
    from conode.vm.guest_agent import GuestAgentClient

    client = GuestAgentClient(lambda data: None)
    saved = client.get_state()
    client.set_state(saved)
    for change in ({"next_id": 0}, {"guest": 5}, {"decoder": b"x" * (2 << 20)}):
        with pytest.raises(SnapshotError):
            client.set_state({**saved, **change})


def test_a_job_keeps_its_network_identity_and_older_job_states_load_without_one():
    from conode.vm.guest import JobSpec
    from conode.vm.net_identity import HostEntry, NetIdentity

    net = NetIdentity(bytes.fromhex("02c0de000001"), "10.77.0.1", 24, "rank0",
                      (HostEntry("rank0", "10.77.0.1"), HostEntry("rank1", "10.77.0.2")), 0, 2)
    spec = JobSpec(7, ["true"], "/job/7", {}, [], net)
    data = GuestJob(None, spec, None).get_state()  # type: ignore[arg-type]
    assert GuestJob.from_state(None, data, None).spec.net == net  # type: ignore[arg-type]
    older = {k: v for k, v in data.items() if k != "net"} | {"version": 1}
    assert GuestJob.from_state(None, older, None).spec.net is None  # type: ignore[arg-type]
    broken = {**data, "net": {**data["net"], "rank": 2}}  # rank 2 of 2: a shape state.py passes, check() refuses
    with pytest.raises(SnapshotError, match="network identity"):
        GuestJob.from_state(None, broken, None)  # type: ignore[arg-type]


def test_a_machine_saved_before_the_nic_is_refused_in_one_line():
    from conode.vm.machine import CoMachine

    with pytest.raises(SnapshotError, match="version 2, written by an older conode.*boot the guest afresh"):
        CoMachine.config_from_state({"version": 2, "config": {"version": 1, "mem_mib": 128, "cmdline_extra": ""}})
