"""The control-plane protocol: every message type, its fields and its limits, in one place.

A message is a msgpack map with ``v`` (the protocol version), ``type`` and the type's fields. Frames are
decoded with size limits and validated against the schema below before anything acts on them; a message that
fails gets an ``error`` reply naming what was wrong. Nothing is ever pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from conode.errors import ConodeError

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 64 << 20  # a job's inputs or outputs travel in one message
MAX_SMALL_FIELD = 4096  # names, states, messages
MAX_ARGV = 256
MAX_FILES = 64

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3  # beats missed before the peer is declared lost
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 8.0


class ProtocolError(ConodeError):
    """A frame that is not a valid message of this protocol."""


# Field kinds: the Python type msgpack yields, and a bound on its size.
STR = ("str", MAX_SMALL_FIELD)
TEXT = ("str", 1 << 20)
INT = ("int", None)
FLOAT = ("float", None)
BOOL = ("bool", None)
BYTES = ("bytes", MAX_FRAME_BYTES)
STR_LIST = ("str_list", MAX_ARGV)
INT_LIST = ("int_list", 100_000)  # job ids
FILES = ("files", MAX_FILES)  # map of relative path -> bytes
ANY_LIST = ("list", 100_000)
ANY_MAP = ("map", 100_000)


@dataclass(frozen=True)
class Field:
    kind: tuple[str, int | None]
    required: bool = True


def _f(kind: tuple[str, int | None], required: bool = True) -> Field:
    return Field(kind, required)


# Who may send what: "agent" (enrolled node keys), "admin" (enrolled admin keys), "coordinator".
SCHEMAS: dict[str, tuple[str, dict[str, Field]]] = {
    # agent -> coordinator
    "hello": ("agent", {"node": _f(STR), "cores": _f(INT), "mem_mib": _f(INT), "speed": _f(FLOAT),
                        "state": _f(STR), "idle_s": _f(FLOAT), "running": _f(INT_LIST),
                        "software": _f(STR)}),
    "heartbeat": ("agent", {"node": _f(STR), "state": _f(STR), "idle_s": _f(FLOAT), "running": _f(INT_LIST),
                            "speed": _f(FLOAT, False), "cpu_percent": _f(FLOAT, False)}),
    "job_output": ("agent", {"job": _f(INT), "stream": _f(STR), "data": _f(BYTES)}),
    "job_finished": ("agent", {"job": _f(INT), "status": _f(INT), "outputs": _f(FILES), "missing": _f(STR_LIST),
                               "runtime_s": _f(FLOAT)}),
    "job_failed": ("agent", {"job": _f(INT), "reason": _f(TEXT), "retry": _f(BOOL)}),
    "job_vacated": ("agent", {"job": _f(INT)}),  # saved to the node's disk with its guest; resumable there
    "job_resumed": ("agent", {"job": _f(INT)}),
    "bye": ("agent", {"node": _f(STR)}),
    # coordinator -> agent
    "welcome": ("coordinator", {"heartbeat_s": _f(FLOAT), "known_jobs": _f(INT_LIST)}),
    "ping": ("coordinator", {}),
    "run_job": ("coordinator", {"job": _f(INT), "argv": _f(STR_LIST), "inputs": _f(FILES), "outputs": _f(STR_LIST),
                                "mem_mib": _f(INT)}),
    "cancel_job": ("coordinator", {"job": _f(INT)}),
    "ack": ("coordinator", {"job": _f(INT)}),
    "reconnect": ("coordinator", {"reason": _f(STR)}),
    # admin -> coordinator
    "status": ("admin", {}),
    "submit": ("admin", {"argv": _f(STR_LIST), "inputs": _f(FILES), "outputs": _f(STR_LIST), "mem_mib": _f(INT)}),
    "jobs": ("admin", {"limit": _f(INT, False)}),
    "job": ("admin", {"job": _f(INT)}),
    "logs": ("admin", {"job": _f(INT)}),
    "fetch": ("admin", {"job": _f(INT)}),
    "cancel": ("admin", {"job": _f(INT)}),
    "drain": ("admin", {"node": _f(STR), "undrain": _f(BOOL, False)}),
    # coordinator -> admin
    "status_reply": ("coordinator", {"nodes": _f(ANY_LIST), "totals": _f(ANY_MAP)}),
    "submitted": ("coordinator", {"job": _f(INT)}),
    "jobs_reply": ("coordinator", {"jobs": _f(ANY_LIST)}),
    "job_reply": ("coordinator", {"job": _f(ANY_MAP)}),
    "logs_reply": ("coordinator", {"job": _f(INT), "stdout": _f(BYTES), "stderr": _f(BYTES)}),
    "fetch_reply": ("coordinator", {"job": _f(INT), "outputs": _f(FILES)}),
    "ok": ("coordinator", {"detail": _f(STR, False)}),
    # either way
    "error": ("any", {"code": _f(STR), "message": _f(TEXT), "in_reply_to": _f(STR, False)}),
}

ADMIN_TYPES = frozenset(t for t, (sender, _) in SCHEMAS.items() if sender == "admin")
AGENT_TYPES = frozenset(t for t, (sender, _) in SCHEMAS.items() if sender == "agent")


def _check_field(name: str, value: Any, kind: tuple[str, int | None]) -> None:
    tag, bound = kind
    ok: bool
    if tag == "str":
        ok = isinstance(value, str) and len(value) <= (bound or 0)
    elif tag == "int":
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    elif tag == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tag == "bool":
        ok = isinstance(value, bool)
    elif tag == "bytes":
        ok = isinstance(value, bytes) and len(value) <= (bound or 0)
    elif tag == "str_list":
        ok = isinstance(value, list) and len(value) <= (bound or 0) and all(
            isinstance(v, str) and len(v) <= MAX_SMALL_FIELD for v in value)
    elif tag == "int_list":
        ok = isinstance(value, list) and len(value) <= (bound or 0) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in value)
    elif tag == "files":
        ok = isinstance(value, dict) and len(value) <= (bound or 0) and all(
            isinstance(k, str) and is_safe_relative_path(k) and isinstance(v, bytes) for k, v in value.items())
    elif tag == "list":
        ok = isinstance(value, list) and len(value) <= (bound or 0)
    elif tag == "map":
        ok = isinstance(value, dict) and len(value) <= (bound or 0)
    else:  # pragma: no cover - schema typo
        raise AssertionError(tag)
    if not ok:
        raise ProtocolError(f"field {name[:40]!r} is not a valid {tag}")


def is_safe_relative_path(path: str) -> bool:
    """A job file name: relative, no '..', no NUL, not empty."""
    if not path or len(path) > 1024 or "\0" in path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def validate(message: Any) -> dict[str, Any]:
    """Check a decoded message against its schema; return it, or raise ProtocolError."""
    if not isinstance(message, dict):
        raise ProtocolError("message is not a map")
    version = message.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        shown = repr(version) if isinstance(version, (int, float, bool)) else type(version).__name__
        raise ProtocolError(f"protocol version {shown} is not supported (this side speaks {PROTOCOL_VERSION})")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        shown = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
        raise ProtocolError(f"unknown message type {shown}")
    _, fields = SCHEMAS[kind]
    for name, field in fields.items():
        if name in message:
            _check_field(name, message[name], field.kind)
        elif field.required:
            raise ProtocolError(f"{kind} message lacks field {name!r}")
    return message


def encode(kind: str, **fields: Any) -> bytes:
    """Build, validate and pack a message: one function builds every message that goes on the wire."""
    message = {"v": PROTOCOL_VERSION, "type": kind, **fields}
    validate(message)
    try:
        data = msgpack.packb(message, use_bin_type=True)
    except UnicodeEncodeError as exc:  # e.g. a command line that is not valid UTF-8
        raise ProtocolError(f"{kind} message holds text that is not valid UTF-8: {exc.object[exc.start:exc.end]!r}") \
            from None
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{kind} message of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return data


def decode(frame: bytes) -> dict[str, Any]:
    """Unpack and validate one frame; raise ProtocolError on anything malformed or oversized."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES,
                                  max_str_len=1 << 20, max_array_len=100_000, max_map_len=100_000)
    except Exception as exc:  # msgpack raises a zoo of types on hostile input; none may escape
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}") from None
    return validate(message)


def error(code: str, message: str, in_reply_to: str | None = None) -> bytes:
    fields: dict[str, Any] = {"code": code, "message": message[:MAX_SMALL_FIELD]}
    if in_reply_to:
        fields["in_reply_to"] = in_reply_to[:MAX_SMALL_FIELD]
    return encode("error", **fields)
