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

