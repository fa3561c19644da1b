"""The agent ↔ guest worker pipe: every message type, its fields and its limits, in one place.

The pipe carries length-prefixed msgpack maps (pipe.py) with a ``type`` and the type's fields, described here the
way conode/cluster/protocol.py describes the control plane, and checked with the same field machinery. The agent
validates what it sends (a job the worker could not take fails before it reaches the worker) and everything a
worker sends: the worker runs the untrusted guest, so an invalid message means a broken worker, never a broken
agent. Fields not in the schema are dropped, so nothing reaches the agent that it does not read.
"""

from __future__ import annotations

import math
from typing import Any

from conode.agent.pipe import PipeError
from conode.cluster.protocol import (FILES, FLOAT, INT, INT_LIST, STR, Field, ProtocolError, _check_field,
                                     is_safe_relative_path)
from conode.limits import (CHANNEL_MAX_PAYLOAD, MAX_ARGV, MAX_ARGV_BYTES, MAX_FILES, MAX_JOB_INPUT_BYTES,
                           MAX_JOB_OUTPUT_BYTES, MAX_OUTPUT_FILE_BYTES, MAX_PATH_BYTES, MAX_TEXT_FIELD)

ARGV = ("str_list", MAX_ARGV)
NAMES = ("str_list", MAX_FILES)  # output names asked for, or reported missing
CHUNK = ("bytes", CHANNEL_MAX_PAYLOAD)  # the worker forwards output as the guest channel delivers it
TEXT = ("str", MAX_TEXT_FIELD)
STREAMS = ("stdout", "stderr")

TO_WORKER: dict[str, dict[str, Field]] = {
    "run": {"job": Field(INT), "argv": Field(ARGV), "inputs": Field(FILES), "outputs": Field(NAMES)},
    "cancel": {"job": Field(INT)},
    "pause": {},
    "resume": {},
    "vacate": {"path": Field(STR)},
    "quit": {},
}

FROM_WORKER: dict[str, dict[str, Field]] = {
    "ready": {"guest": Field(STR), "speed": Field(FLOAT)},
    "output": {"job": Field(INT), "stream": Field(STR), "data": Field(CHUNK)},
    "finished": {"job": Field(INT), "status": Field(INT), "outputs": Field(FILES), "missing": Field(NAMES),
                 "runtime_s": Field(FLOAT)},
    "failed": {"job": Field(INT), "reason": Field(TEXT)},
    "paused": {"at": Field(FLOAT)},
    "resumed": {},
    "vacated": {"path": Field(STR), "jobs": Field(INT_LIST)},
}


class OutputLimitError(PipeError):
    """A well-formed result whose output files exceed the pool's limits: the job's fault, not the worker's."""

    def __init__(self, job: int, message: str) -> None:
        super().__init__(message)
        self.job = job


def _check(message: Any, schemas: dict[str, dict[str, Field]], direction: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise PipeError(f"message {direction} is not a map")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in schemas:
        shown = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
        raise PipeError(f"unknown message type {shown} {direction}")
    checked: dict[str, Any] = {"type": kind}
    for name, spec in schemas[kind].items():
        if name not in message:
            raise PipeError(f"{kind} message {direction} lacks field {name!r}")
        try:
            _check_field(name, message[name], spec.kind)
        except ProtocolError as exc:
            raise PipeError(f"{kind} message {direction}: {exc}") from None
        checked[name] = message[name]
    return checked


def _check_names(kind: str, names: Any) -> None:
    """Job file names: relative to the job directory, no way out of it, bounded."""
    for name in names:
        if not is_safe_relative_path(name):
            raise PipeError(f"{kind}: {name[:40]!r} is not a file name inside the job directory")
        if len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            raise PipeError(f"{kind}: file name {name[:40]!r}... exceeds {MAX_PATH_BYTES} bytes")


def _check_finite(kind: str, name: str, value: float) -> None:
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite or value < 0:
        raise PipeError(f"{kind}: {name} must be a finite, non-negative number, not {value!r:.40}")


def argv_bytes(argv: list[str]) -> int:
    """What a command line costs in the guest: each argument in UTF-8 and its NUL."""
    return sum(len(arg.encode("utf-8", "surrogatepass")) + 1 for arg in argv)


def validate_to_worker(message: Any) -> dict[str, Any]:
    """Check a message the agent is about to send a worker; return it, or raise PipeError saying why not."""
    checked = _check(message, TO_WORKER, "to the worker")
    if checked["type"] == "run":
        argv, inputs = checked["argv"], checked["inputs"]
        if not argv:
            raise PipeError("run: the command is empty")
        if argv_bytes(argv) > MAX_ARGV_BYTES:
            raise PipeError(f"run: the command line of {argv_bytes(argv)} bytes exceeds {MAX_ARGV_BYTES}")
        _check_names("run", [*inputs, *checked["outputs"]])
        total = sum(len(data) for data in inputs.values())
        if total > MAX_JOB_INPUT_BYTES:
            raise PipeError(f"run: inputs of {total} bytes exceed the {MAX_JOB_INPUT_BYTES}-byte limit")
    return checked


def validate_from_worker(message: Any) -> dict[str, Any]:
    """Check a message a worker sent; return it (known fields only), or raise PipeError.

    OutputLimitError (a PipeError) marks a result that is well formed but whose files are over the limits.
    """
    checked = _check(message, FROM_WORKER, "from the worker")
    kind = checked["type"]
    if kind == "ready":
        _check_finite(kind, "speed", checked["speed"])
    elif kind == "output" and checked["stream"] not in STREAMS:
        raise PipeError(f"output: unknown stream {checked['stream'][:40]!r}")
    elif kind == "paused":
        _check_finite(kind, "at", checked["at"])
    elif kind == "finished":
        _check_finite(kind, "runtime_s", checked["runtime_s"])
        outputs = checked["outputs"]
        _check_names(kind, [*outputs, *checked["missing"]])
        for name, data in outputs.items():
            if len(data) > MAX_OUTPUT_FILE_BYTES:
                raise OutputLimitError(checked["job"], f"output {name[:80]!r} of {len(data)} bytes exceeds the "
                                       f"{MAX_OUTPUT_FILE_BYTES}-byte limit for one file")
        total = sum(len(data) for data in outputs.values())
        if total > MAX_JOB_OUTPUT_BYTES:
            raise OutputLimitError(checked["job"], f"outputs of {total} bytes exceed the "
                                   f"{MAX_JOB_OUTPUT_BYTES}-byte limit for one job; write less, or split the job")
    return checked
