"""The agent <-> worker pipe schema (conode/agent/wire.py)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conode.agent.pipe import PipeError
from conode.agent.wire import (FROM_WORKER, TO_WORKER, OutputLimitError, validate_from_worker,
                               validate_to_worker)
from conode.limits import (CHANNEL_MAX_PAYLOAD, MAX_ARGV, MAX_FILES, MAX_JOB_INPUT_BYTES,
                           MAX_JOB_OUTPUT_BYTES, MAX_OUTPUT_FILE_BYTES, MAX_PATH_BYTES)

GOOD_FROM = {
    "ready": {"guest": "Linux 6.1 i686", "speed": 1234.5},
    "output": {"job": 1, "stream": "stderr", "data": b"x"},
    "finished": {"job": 1, "status": 0, "outputs": {"a/b.txt": b"1"}, "missing": ["c"], "runtime_s": 0.5},
    "failed": {"job": 1, "reason": "staging a: no space"},
    "paused": {"at": 1.7e9},
    "resumed": {},
    "vacated": {"path": "/state/vacated/worker-0.snap", "jobs": [1, 2]},
}
GOOD_TO = {
    "run": {"job": 1, "argv": ["sh", "-c", "true"], "inputs": {"in.txt": b"1"}, "outputs": ["out.txt"]},
    "cancel": {"job": 1}, "pause": {}, "resume": {}, "vacate": {"path": "/tmp/x.snap"}, "quit": {},
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
