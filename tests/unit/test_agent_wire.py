"""The agent <-> worker pipe schema (conode/agent/wire.py)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conode.agent.pipe import PipeError
from conode.agent.wire import (
    FROM_WORKER,
    TO_WORKER,
    OutputLimitError,
    validate_from_worker,
    validate_to_worker,
)
from conode.limits import (
    CHANNEL_MAX_PAYLOAD,
    MAX_ARGV,
    MAX_DISK_BUDGET_MIB,
    MAX_FILES,
    MAX_JOB_INPUT_BYTES,
    MAX_JOB_OUTPUT_BYTES,
    MAX_OUTPUT_FILE_BYTES,
    MAX_PATH_BYTES,
    MAX_SMALL_FIELD,
    MAX_TEXT_FIELD,
)
from conode.vm.net_identity import NetIdentity

GOOD_FROM = {
    "ready": {"guest": "Linux 6.1 i686", "speed": 1234.5},
    "output": {"job": 1, "stream": "stderr", "data": b"x"},
    "finished": {"job": 1, "status": 0, "outputs": {"a/b.txt": b"1"}, "missing": ["c"], "runtime_s": 0.5},
    "failed": {"job": 1, "reason": "staging a: no space"},
    "paused": {"at": 1.7e9},
    "resumed": {},
    "vacated": {"path": "/state/vacated/worker-0.snap", "jobs": [1],
                "checkpoint": {"interval_s": 60.0, "seq": 4, "stdout": 120, "stderr": 0}},
    "checkpoint": {"job": 1, "seq": 3, "base": 2, "path": "/state/checkpoints/out/job-1-3.ckpt", "size": 4096,
                   "sha256": "ab" * 32, "pages": 12, "final_pages": 1, "stall_s": 0.002, "took_s": 0.1,
                   "stall_cpu_s": 0.001},
    "listening": {"job": 1, "endpoint": "tcp://10.0.0.2:40001"},
    "cut_ready": {"job": 1, "cut": 3},
    "cut_taken": {"job": 1, "cut": 3, "seq": 4},
    "cut_failed": {"job": 1, "cut": 3, "reason": "piece 4 not taken: no space"},
    "cut_resumed": {"job": 1, "cut": 3, "held_s": 0.004},
    "move_ready": {"job": 1},
    "moved_out": {"job": 1, "downtime_s": 0.05, "total_s": 1.2, "paused_s": 0.06, "bytes": 30 << 20, "rounds": 3},
    "moved_in": {"job": 1, "rounds": 3, "bytes": 30 << 20},
    "move_failed": {"job": 1, "reason": "timed out", "handed_over": False},
}
GOOD_TO = {
    "run": {"job": 1, "argv": ["sh", "-c", "true"], "inputs": {"in.txt": b"1"}, "outputs": ["out.txt"]},
    "cancel": {"job": 1}, "pause": {}, "resume": {}, "vacate": {"path": "/tmp/x.snap"}, "quit": {},
    "plug": {"token": bytes(16), "socket": "/state/conet.sock"},
    "restore": {"job": 1, "pieces": ["/state/checkpoints/in/job-1/0.piece"],
                "checkpoint": {"dir": "/state/checkpoints/out", "interval_s": 60.0, "seq": 1}},
    "checkpoint_reset": {"job": 1},
    "cut": {"job": 1, "cut": 3, "hold_s": 10.0},
    "cut_final": {"job": 1, "cut": 3},
    "cut_resume": {"job": 1, "cut": 3},
    "checkpoint_start": {"job": 1, "checkpoint": {"dir": "/state/checkpoints/out", "interval_s": 60.0, "seq": 4},
                         "outputs": {"stdout": 120, "stderr": 0}},
    "migrate": {"job": 1, "endpoint": "tcp://10.0.0.2:40001", "peer": "k" * 40, "keys": "/state/keys"},
    "receive": {"job": 1, "bind": "tcp://10.0.0.2:*", "peer": "k" * 40, "keys": "/state/keys"},
    "move_go": {"job": 1}, "move_abort": {"job": 1, "reason": "the source was lost"},
}


def test_the_schemas_cover_the_whole_vocabulary():
    assert set(GOOD_FROM) == set(FROM_WORKER) and set(GOOD_TO) == set(TO_WORKER)
    for kind, fields in GOOD_FROM.items():
        assert validate_from_worker({"type": kind, **fields}) == {"type": kind, **fields}
    for kind, fields in GOOD_TO.items():
        assert validate_to_worker({"type": kind, **fields}) == {"type": kind, **fields}


def test_fields_outside_the_schema_are_dropped():
    assert validate_from_worker({"type": "resumed", "extra": b"x" * 100}) == {"type": "resumed"}


@pytest.mark.parametrize("kind,field,value", [
    ("ready", "speed", math.inf), ("ready", "speed", -1.0), ("ready", "guest", 7),
    ("output", "stream", "stdin"), ("output", "data", b"x" * (CHANNEL_MAX_PAYLOAD + 1)), ("output", "job", True),
    ("finished", "outputs", {"/etc/passwd": b""}), ("finished", "outputs", {"a": "text"}),
    ("finished", "missing", ["m"] * (MAX_FILES + 1)), ("finished", "runtime_s", math.nan),
    ("finished", "outputs", {"d/" * (MAX_PATH_BYTES // 2) + "f": b""}),
    ("paused", "at", math.inf), ("vacated", "jobs", [-1]), ("failed", "reason", None),
    ("cut_failed", "cut", -1), ("cut_failed", "reason", "x" * (MAX_TEXT_FIELD + 1)),
    ("vacated", "checkpoint", {"interval_s": 1.0, "seq": 1, "stdout": -1, "stderr": 0}),
    ("vacated", "checkpoint", {"interval_s": 1.0, "seq": 1, "stdout": 0}),
])
def test_what_a_worker_may_not_send(kind, field, value):
    message = {"type": kind, **GOOD_FROM[kind], field: value}
    with pytest.raises(PipeError):
        validate_from_worker(message)


@pytest.mark.parametrize("message", [None, [], {"type": 3}, {"type": "hello"}, {"type": "ready", "guest": "g"}])
def test_what_is_not_a_worker_message(message):
    with pytest.raises(PipeError):
        validate_from_worker(message)


def test_outputs_over_the_limits_are_the_jobs_fault():
    one = {"type": "finished", **GOOD_FROM["finished"], "outputs": {"big": b"\0" * (MAX_OUTPUT_FILE_BYTES + 1)}}
    with pytest.raises(OutputLimitError, match="one file") as caught:
        validate_from_worker(one)
    assert caught.value.job == 1
    each = b"\0" * (MAX_JOB_OUTPUT_BYTES // 3 + 1)
    total = {"type": "finished", **GOOD_FROM["finished"], "outputs": {"a": each, "b": each, "c": each}}
    with pytest.raises(OutputLimitError, match="one job"):
        validate_from_worker(total)


@pytest.mark.parametrize("field,value", [
    ("argv", []), ("argv", ["a"] * (MAX_ARGV + 1)), ("argv", ["x" * 4000] * 70),
    ("inputs", {"a": b"\0" * (MAX_JOB_INPUT_BYTES + 1)}), ("inputs", {"../a": b""}), ("outputs", ["/abs"]),
])
def test_what_the_agent_may_not_send_a_worker(field, value):
    with pytest.raises(PipeError):
        validate_to_worker({"type": "run", **GOOD_TO["run"], field: value})


@pytest.mark.parametrize("field,value", [("token", bytes(15)), ("token", "x" * 16), ("socket", ""),
                                         ("socket", "/" + "s" * 200)])
def test_a_plug_message_carries_a_whole_token_and_a_socket_path(field, value):
    with pytest.raises(PipeError, match="plug"):
        validate_to_worker({"type": "plug", **GOOD_TO["plug"], field: value})


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([*FROM_WORKER, "run", "x"]), fields=st.dictionaries(
    st.sampled_from(["job", "stream", "data", "status", "outputs", "missing", "runtime_s", "reason", "at", "path",
                     "jobs", "guest", "speed"]), values, max_size=6))
def test_any_worker_message_is_either_valid_or_a_pipe_error(kind, fields):
    try:
        checked = validate_from_worker({"type": kind, **fields})
    except PipeError:
        return
    assert set(checked) == {"type", *FROM_WORKER[kind]}


NET = {"token": bytes(range(16)), "socket": "/run/conode/conet.sock", "mac": bytes.fromhex("02c0de000001"),
       "ip": "10.77.0.1", "prefix": 24, "hostname": "job7-rank0", "hosts": {"job7-rank0": "10.77.0.1",
                                                                            "job7-rank1": "10.77.0.2"},
       "rank": 0, "size": 2}


def test_a_run_may_carry_the_guests_conet_port_and_identity():
    message = {"type": "run", **GOOD_TO["run"], "net": NET}
    assert validate_to_worker(message) == message


@pytest.mark.parametrize("field,value", [
    ("token", b"short"), ("socket", "/s" * 100), ("socket", 3), ("mac", bytes.fromhex("03c0de000001")),
    ("mac", bytes(6)), ("ip", "10.77.0.256"), ("ip", "10.77.0.0"), ("ip", "10.77.0.255"), ("prefix", 31),
    ("prefix", "24"), ("hostname", "-rank0"), ("hostname", "a" * 64), ("hostname", "r\nk"),
    ("hosts", {"ok": "1.2.3"}), ("hosts", {"bad name": "10.77.0.1"}), ("hosts", ["10.77.0.1"]),
    ("rank", 2), ("rank", -1), ("size", 0), ("size", 257), ("unexpected", 1),
])
def test_a_conet_identity_coagent_would_refuse_never_reaches_the_worker(field, value):
    with pytest.raises(PipeError):
        validate_to_worker({"type": "run", **GOOD_TO["run"], "net": {**NET, field: value}})
    without = {k: v for k, v in NET.items() if k != field}
    if field in NET:
        with pytest.raises(PipeError):
            validate_to_worker({"type": "run", **GOOD_TO["run"], "net": without})


def test_the_identity_frame_coagent_parses():
    identity = NetIdentity.from_message(NET)
    assert identity.payload().split(b"\0") == [
        b"mac=02:c0:de:00:00:01", b"addr=10.77.0.1/24", b"hostname=job7-rank0", b"host=10.77.0.1 job7-rank0",
        b"host=10.77.0.2 job7-rank1", b"env=CONODE_RANK=0", b"env=CONODE_SIZE=2",
        b"env=CONODE_HOSTS=job7-rank0 job7-rank1", b""]


@settings(max_examples=300, deadline=None)
@given(net=st.dictionaries(st.sampled_from(sorted(NET)), values, max_size=9), base=st.booleans())
def test_any_conet_map_is_either_valid_or_a_pipe_error(net, base):
    try:
        validate_to_worker({"type": "run", **GOOD_TO["run"], "net": {**NET, **net} if base else net})
    except PipeError:
        pass


DISK = {"base": "/state/images/ab.img", "overlay": "/state/overlays/job-1.cow", "budget_mib": 1024}


def test_a_run_may_carry_the_guests_root_disk():
    message = {"type": "run", **GOOD_TO["run"], "disk": DISK}
    assert validate_to_worker(message) == message


@pytest.mark.parametrize("disk", [
    {**DISK, "budget_mib": 0}, {**DISK, "budget_mib": MAX_DISK_BUDGET_MIB + 1}, {**DISK, "budget_mib": True},
    {**DISK, "base": ""}, {**DISK, "overlay": "x" * (MAX_SMALL_FIELD + 1)}, {**DISK, "base": b"/a"},
    {k: v for k, v in DISK.items() if k != "overlay"}, {**DISK, "root": True}, "disk",
])
def test_a_disk_the_worker_could_not_open_as_told_never_reaches_it(disk):
    with pytest.raises(PipeError, match="disk"):
        validate_to_worker({"type": "run", **GOOD_TO["run"], "disk": disk})


@pytest.mark.parametrize("settings_map, why", [
    ({"dir": "/x", "interval_s": 1.0}, "exactly dir"),
    ({"dir": "/x", "interval_s": -1.0, "seq": 0}, "interval_s"),
    ({"dir": "/x", "interval_s": 1.0, "seq": -1}, "seq"),
    ({"dir": 5, "interval_s": 1.0, "seq": 0}, "dir"),
])
def test_checkpoint_settings_are_checked_whole(settings_map, why):
    for kind in ("run", "restore"):
        with pytest.raises(PipeError, match=why):
            validate_to_worker({"type": kind, **GOOD_TO[kind], "checkpoint": settings_map})


def test_a_restore_needs_pieces():
    with pytest.raises(PipeError, match="no checkpoint pieces"):
        validate_to_worker({"type": "restore", "job": 1, "pieces": []})
