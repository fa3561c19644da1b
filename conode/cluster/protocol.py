"""The control-plane protocol: every message type, its fields and its limits, in one place.

A message is a msgpack map with ``v`` (the protocol version), ``type`` and the type's fields. Frames are
decoded with size limits and validated against the schema below before anything acts on them; a message that
fails gets an ``error`` reply naming what was wrong. Nothing is ever pickled.

The schema carries the pool-wide limits of conode.limits (a job's command, files, memory; what a node may
report), and ``encode`` checks them as ``decode`` does: a message one side can build, the other accepts, and
a submission the coordinator accepts fits every hop to the guest and back.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import msgpack

from conode.errors import ConodeError
from conode.limits import (IMAGE_CHUNK_BYTES, MAX_ARGV, MAX_ARGV_BYTES, MAX_ARRAY_ITEMS_BYTES, MAX_ARRAY_TASKS,
                           MAX_DISK_BUDGET_MIB, MAX_ENV_VARS, MAX_FILES, MAX_FRAME_BYTES, MAX_GUEST_MEM_MIB,
                           MAX_HOSTNAME, MAX_IMAGE_BYTES, MAX_IMAGE_CACHE_MIB, MAX_IMAGE_CHUNKS, MAX_IMAGE_NAME,
                           MAX_JOB_GUESTS, MAX_JOB_INPUT_BYTES, MAX_JOB_OUTPUT_BYTES, MAX_JOB_PRIORITY,
                           MAX_JOB_TIMEOUT_S, MAX_OUTPUT_FILE_BYTES, MAX_PATH_BYTES, MAX_SMALL_FIELD,
                           MAX_SNAPSHOT_BYTES, MAX_TEXT_FIELD,
                           MIN_GUEST_MEM_MIB)

PROTOCOL_VERSION = 2  # 2: no coordinator ping; an agent's link is watched by its TCP connection
# MAX_FRAME_BYTES, MAX_SMALL_FIELD, MAX_ARGV and MAX_FILES come from conode.limits and stay importable from here.
MAX_LIST_ENTRIES = 100_000  # job ids in a list, rows of a status reply
MAX_NODE_CORES = 1024  # a sanity bound on the guests one node offers
# The guest's working directory for a job (/job/<id>, at most 24 bytes, and its NUL), counted in the argv
# budget because the guest receives it in the same frame as the arguments.
JOB_CWD_BYTES = 32

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3  # beats missed before the peer is declared lost
# The agent's link is watched by its TCP connection, at no cost to the coordinator's threads: a coordinator that
# dies resets it, and one whose host goes silent leaves the agent's heartbeat unacknowledged, which drops the link
# after LINK_TIMEOUT_MS (TCP_USER_TIMEOUT). With a beat every interval a silent coordinator is so noticed within
# HEARTBEAT_LIVENESS intervals, as with the pings this replaces.
LINK_TIMEOUT_MS = int((HEARTBEAT_LIVENESS - 1) * HEARTBEAT_INTERVAL_S * 1000)
# A worker waits this long at most for a gang's cut to go on (cut_final after its pre-copy, cut_resume after its
# final copy, while its guest stands still): past the coordinator's own limit for the cut
# (coordinator/gang_cuts.py), so a guest is never left stopped, nor a piece half taken, by a lost word.
CUT_HOLD_S = 10.0
RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 8.0


class ProtocolError(ConodeError):
    """A frame that is not a valid message of this protocol."""


class Kind(NamedTuple):
    """A field's type (``tag``: what msgpack yields) and its bounds; None means unbounded."""

    tag: str
    bound: int | None = None  # characters of a str, bytes of bytes, entries of a list or map
    item: int | None = None  # one entry: characters of an argument or a list's str, bytes of a file
    total: int | None = None  # all entries together, in bytes
    low: float | None = None  # numbers: the smallest allowed
    high: float | None = None  # numbers: the largest allowed


STR = Kind("str", MAX_SMALL_FIELD)
TEXT = Kind("str", MAX_TEXT_FIELD)
INT = Kind("int")
CORES = Kind("int", low=1, high=MAX_NODE_CORES)
GUEST_MEM = Kind("int", low=MIN_GUEST_MEM_MIB, high=MAX_GUEST_MEM_MIB)
FLOAT = Kind("float")  # finite: NaN and infinities are refused everywhere
MEASURE = Kind("float", low=0.0)  # a finite measurement: speed, seconds, a percentage
BOOL = Kind("bool")
BYTES = Kind("bytes", MAX_FRAME_BYTES)
ARGV = Kind("argv", MAX_ARGV, item=MAX_SMALL_FIELD, total=MAX_ARGV_BYTES - JOB_CWD_BYTES)
PATHS = Kind("paths", MAX_FILES)  # output files asked for: safe relative paths
MISSING = Kind("str_list", MAX_FILES, item=MAX_SMALL_FIELD)  # "path" or "path: reason"
INT_LIST = Kind("int_list", MAX_LIST_ENTRIES)  # job ids
INPUTS = Kind("files", MAX_FILES, total=MAX_JOB_INPUT_BYTES)  # map of relative path -> bytes
OUTPUTS = Kind("files", MAX_FILES, item=MAX_OUTPUT_FILE_BYTES, total=MAX_JOB_OUTPUT_BYTES)
GUESTS = Kind("int", low=1, high=MAX_JOB_GUESTS)
RANK = Kind("int", low=0, high=MAX_JOB_GUESTS - 1)
IDENTITY = Kind("identity", MAX_JOB_GUESTS)  # a guest's conet identity (see _identity_problem)
PEERS = Kind("peers", MAX_LIST_ENTRIES)  # the conet endpoints and keys of the other agents (and shared networks)
PEER_FIELDS = frozenset({"node", "endpoint", "key", "networks"})
MAX_SHARED_NETWORKS = MAX_NODE_CORES  # one per guest of a node at most
DIGEST = Kind("digest", 32)  # a chunk's SHA-256, raw
DIGESTS = Kind("digest_list", MAX_IMAGE_CHUNKS)  # an image's chunks in order, or some of them
SHA256 = Kind("sha256", 64)  # a whole image's SHA-256, hex: what snapshots name a base image by
CHUNK = Kind("bytes", IMAGE_CHUNK_BYTES)
IMAGE_NAME = Kind("str", MAX_IMAGE_NAME)
IMAGE_SIZE = Kind("int", low=1, high=MAX_IMAGE_BYTES)
IMAGE = Kind("image")  # an image a job runs on: name, sha256, size and chunks (see _image_problem)
DISK_MIB = Kind("int", low=1, high=MAX_DISK_BUDGET_MIB)
PRIORITY = Kind("int", low=-MAX_JOB_PRIORITY, high=MAX_JOB_PRIORITY)
CACHE_MIB = Kind("int", low=0, high=MAX_IMAGE_CACHE_MIB)
ENV = Kind("env", MAX_ENV_VARS, item=MAX_SMALL_FIELD)  # map of variable name -> value
MODES = Kind("modes", MAX_FILES)  # map of input path -> permission bits, for inputs not 0644
STDIN = Kind("bytes", MAX_JOB_INPUT_BYTES)
TIME_LIMIT = Kind("float", low=1.0, high=MAX_JOB_TIMEOUT_S)
ITEMS = Kind("str_list", MAX_ARRAY_TASKS, item=MAX_SMALL_FIELD, total=MAX_ARRAY_ITEMS_BYTES)  # an array's items
STATES = Kind("str_list", 16, item=MAX_SMALL_FIELD)  # job states to list
CURSOR = Kind("int", low=0, high=2**63 - 1)  # where a followed log stands
PIECE_NUMBER = Kind("int", low=-1, high=1 << 40)  # a checkpoint piece's number (-1: the base of a full piece)
PIECE_SIZE = Kind("int", low=1, high=MAX_SNAPSHOT_BYTES)
COUNT = Kind("int", low=0, high=1 << 40)  # a piece's number from 0, or bytes of output written
CHAIN = Kind("list", 64)  # a checkpoint chain to resume from: {seq, size, sha256} per piece (conode/agent/checkpoints.py)
ANY_LIST = Kind("list", MAX_LIST_ENTRIES)
ANY_MAP = Kind("map", MAX_LIST_ENTRIES)


@dataclass(frozen=True)
class Field:
    kind: Kind
    required: bool = True


def _f(kind: Kind, required: bool = True) -> Field:
    return Field(kind, required)


# Who may send what: "agent" (enrolled node keys), "client" (enrolled admin and user keys), "admin" (admin keys
# only), "coordinator"; coordinator/users.py applies it.
SCHEMAS: dict[str, tuple[str, dict[str, Field]]] = {
    # agent -> coordinator
    "hello": ("agent", {"node": _f(STR), "cores": _f(CORES), "mem_mib": _f(GUEST_MEM), "speed": _f(MEASURE),
                        "state": _f(STR), "idle_s": _f(MEASURE), "running": _f(INT_LIST),
                        "software": _f(STR), "conet": _f(STR, False), "image_cache_mib": _f(CACHE_MIB, False)}),
    "heartbeat": ("agent", {"node": _f(STR), "state": _f(STR), "idle_s": _f(MEASURE), "running": _f(INT_LIST),
                            "speed": _f(MEASURE, False), "cpu_percent": _f(MEASURE, False),
                            "owner_load": _f(MEASURE, False)}),  # the owner's own CPU use in cores, if measured
    "job_output": ("agent", {"job": _f(INT), "stream": _f(STR), "data": _f(BYTES)}),
    "job_finished": ("agent", {"job": _f(INT), "status": _f(INT), "outputs": _f(OUTPUTS), "missing": _f(MISSING),
                               "runtime_s": _f(MEASURE)}),
    "job_failed": ("agent", {"job": _f(INT), "reason": _f(TEXT), "retry": _f(BOOL)}),
    "job_vacated": ("agent", {"job": _f(INT)}),  # saved to the node's disk with its guest; resumable there
    "job_resumed": ("agent", {"job": _f(INT)}),
    "bye": ("agent", {"node": _f(STR)}),
    "image_chunk_get": ("agent", {"digest": _f(DIGEST)}),  # on the agent's fetch socket, not its control one
    # a running job's checkpoint piece, in chunks, then its commit (coordinator/checkpoints.py)
    "checkpoint_put": ("agent", {"job": _f(INT), "seq": _f(PIECE_NUMBER), "index": _f(INT), "data": _f(CHUNK)}),
    "checkpoint_commit": ("agent", {"job": _f(INT), "seq": _f(PIECE_NUMBER), "base": _f(PIECE_NUMBER),
                                    "size": _f(PIECE_SIZE), "sha256": _f(SHA256)}),
    # A gang's coordinated checkpoint (coordinator/gang_cuts.py): the rank's piece of cut *cut* is pre-copied
    # (its guest runs until cut_final), then taken (its final copy made; its guest stands still until cut_resume)
    "cut_ready": ("agent", {"job": _f(INT), "cut": _f(COUNT)}),
    "cut_taken": ("agent", {"job": _f(INT), "cut": _f(COUNT), "seq": _f(COUNT)}),
    # ... or could not be taken or sent (the cut is then discarded at once, not when it times out)
    "cut_failed": ("agent", {"job": _f(INT), "cut": _f(COUNT), "reason": _f(TEXT)}),
    # A move (coordinator/moves.py): every message names the job and the move's ownership epoch.
    "move_listening": ("agent", {"job": _f(INT), "epoch": _f(INT), "endpoint": _f(STR), "key": _f(STR)}),
    "move_ready": ("agent", {"job": _f(INT), "epoch": _f(INT)}),  # the source: the destination has it all
    "move_sent": ("agent", {"job": _f(INT), "epoch": _f(INT), "downtime_s": _f(MEASURE, False),
                            "total_s": _f(MEASURE), "bytes": _f(INT), "rounds": _f(INT)}),
    "move_arrived": ("agent", {"job": _f(INT), "epoch": _f(INT)}),  # the destination: the guest runs here
    "move_failed": ("agent", {"job": _f(INT), "epoch": _f(INT), "reason": _f(TEXT)}),
    # coordinator -> agent
    "welcome": ("coordinator", {"heartbeat_s": _f(MEASURE)}),
    "run_job": ("coordinator", {"job": _f(INT), "argv": _f(ARGV), "inputs": _f(INPUTS), "outputs": _f(PATHS),
                                "mem_mib": _f(GUEST_MEM), "net": _f(IDENTITY, False), "image": _f(IMAGE, False),
                                "disk_mib": _f(DISK_MIB, False), "owner": _f(STR, False),  # owner: who submitted it
                                "checkpoint_s": _f(MEASURE, False),
                                "cuts": _f(BOOL, False),  # a gang's rank: checkpointed only in its gang's cuts
                                "resume": _f(CHAIN, False)}),  # resume: go on from this checkpoint chain
    "checkpoint_reply": ("coordinator", {"job": _f(INT), "seq": _f(PIECE_NUMBER), "ok": _f(BOOL),
                                         "reason": _f(STR, False)}),
    "checkpoint_data": ("coordinator", {"job": _f(INT), "seq": _f(PIECE_NUMBER), "index": _f(INT),
                                        "data": _f(CHUNK)}),  # a chain's pieces, sent before its run_job
    # a guest moved here is checkpointed from now on: its interval, next piece's number and output offsets
    "checkpoint_start": ("coordinator", {"job": _f(INT), "interval_s": _f(MEASURE), "seq": _f(COUNT),
                                         "stdout": _f(COUNT), "stderr": _f(COUNT)}),
    # a gang's cut: pre-copy the rank's piece now; once every rank has, make its final copy and keep the guest
    # still after it until cut_resume (or CUT_HOLD_S)
    "checkpoint_cut": ("coordinator", {"job": _f(INT), "cut": _f(COUNT)}),
    "cut_final": ("coordinator", {"job": _f(INT), "cut": _f(COUNT)}),
    "cut_resume": ("coordinator", {"job": _f(INT), "cut": _f(COUNT)}),
    "conet_peers": ("coordinator", {"peers": _f(PEERS), "relay": _f(STR, False)}),  # relay: its endpoint
    "cancel_job": ("coordinator", {"job": _f(INT)}),
    "image_chunk": ("coordinator", {"digest": _f(DIGEST), "data": _f(CHUNK, False), "problem": _f(STR, False)}),
    "ack": ("coordinator", {"job": _f(INT)}),
    "move_in": ("coordinator", {"job": _f(INT), "epoch": _f(INT), "source_key": _f(STR), "mem_mib": _f(GUEST_MEM),
                                "net": _f(IDENTITY, False), "image": _f(IMAGE, False)}),
    "move_out": ("coordinator", {"job": _f(INT), "epoch": _f(INT), "endpoint": _f(STR), "key": _f(STR)}),
    "move_go": ("coordinator", {"job": _f(INT), "epoch": _f(INT)}),
    "load_vacated": ("coordinator", {"job": _f(INT)}),  # load a vacated guest, paused, to move it
    "move_abort": ("coordinator", {"job": _f(INT), "epoch": _f(INT), "reason": _f(TEXT)}),
    "reconnect": ("coordinator", {"reason": _f(STR)}),
    # client (admin or user) -> coordinator
    "status": ("client", {}),
    "submit": ("client", {"argv": _f(ARGV), "inputs": _f(INPUTS), "outputs": _f(PATHS), "mem_mib": _f(GUEST_MEM),
                          "guests": _f(GUESTS, False), "network": _f(STR, False), "image": _f(IMAGE_NAME, False),
                          "disk_mib": _f(DISK_MIB, False), "env": _f(ENV, False), "stdin": _f(STDIN, False),
                          "modes": _f(MODES, False), "timeout_s": _f(TIME_LIMIT, False), "items": _f(ITEMS, False),
                          "priority": _f(PRIORITY, False)}),
    # user: only that owner's jobs
    "jobs": ("client", {"limit": _f(INT, False), "states": _f(STATES, False), "history": _f(BOOL, False),
                        "user": _f(STR, False)}),
    "job": ("client", {"job": _f(INT)}),
    "logs": ("client", {"job": _f(INT), "rank": _f(RANK, False), "after": _f(CURSOR, False)}),
    "fetch": ("client", {"job": _f(INT), "rank": _f(RANK, False)}),
    # cancel, hold, release: a user's own jobs only; with array, every job of the array the job belongs to
    "cancel": ("client", {"job": _f(INT), "array": _f(BOOL, False)}),
    "hold": ("client", {"job": _f(INT), "array": _f(BOOL, False)}),
    "release": ("client", {"job": _f(INT), "array": _f(BOOL, False)}),
    "image_list": ("client", {}),
    # admin -> coordinator
    "drain": ("admin", {"node": _f(STR), "undrain": _f(BOOL, False), "migrate": _f(BOOL, False)}),
    "migrate": ("admin", {"job": _f(INT), "to": _f(STR, False)}),
    "forget": ("admin", {"node": _f(STR)}),  # a down node, no longer shown by status
    "image_missing": ("admin", {"chunks": _f(DIGESTS)}),  # which of these chunks the coordinator lacks
    "image_put": ("admin", {"digest": _f(DIGEST), "data": _f(CHUNK)}),
    "image_commit": ("admin", {"name": _f(IMAGE_NAME), "size": _f(IMAGE_SIZE), "sha256": _f(SHA256),
                               "chunks": _f(DIGESTS)}),
    "image_rm": ("admin", {"name": _f(IMAGE_NAME)}),
    "user_add": ("admin", {"name": _f(STR), "public_key": _f(STR)}),
    "users": ("admin", {}),
    "user_rm": ("admin", {"name": _f(STR)}),
    # coordinator -> client
    "status_reply": ("coordinator", {"nodes": _f(ANY_LIST), "totals": _f(ANY_MAP), "down": _f(ANY_LIST, False)}),
    "submitted": ("coordinator", {"job": _f(INT), "jobs": _f(INT_LIST, False)}),  # jobs: an array's
    "jobs_reply": ("coordinator", {"jobs": _f(ANY_LIST)}),
    "job_reply": ("coordinator", {"job": _f(ANY_MAP)}),
    "logs_reply": ("coordinator", {"job": _f(INT), "stdout": _f(BYTES), "stderr": _f(BYTES),
                                   "cursor": _f(CURSOR, False), "more": _f(BOOL, False),
                                   # following: where the bytes begin in each stream, and whether it was cleared
                                   "stdout_at": _f(CURSOR, False), "stderr_at": _f(CURSOR, False),
                                   "restarted": _f(BOOL, False)}),
    "fetch_reply": ("coordinator", {"job": _f(INT), "outputs": _f(OUTPUTS)}),
    "image_missing_reply": ("coordinator", {"chunks": _f(DIGESTS)}),
    "image_list_reply": ("coordinator", {"images": _f(ANY_LIST)}),
    "users_reply": ("coordinator", {"users": _f(ANY_LIST)}),
    "ok": ("coordinator", {"detail": _f(STR, False)}),
    # either way
    "error": ("any", {"code": _f(STR), "message": _f(TEXT), "in_reply_to": _f(STR, False)}),
}

CLIENT_TYPES = frozenset(t for t, (sender, _) in SCHEMAS.items() if sender == "client")  # users' and admins'
ADMIN_TYPES = CLIENT_TYPES | frozenset(t for t, (sender, _) in SCHEMAS.items() if sender == "admin")
AGENT_TYPES = frozenset(t for t, (sender, _) in SCHEMAS.items() if sender == "agent")


def _shown(value: str) -> str:
    return repr(value[:60] + "..." if len(value) > 60 else value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _in_range(value: float, kind: Kind) -> bool:
    return (kind.low is None or value >= kind.low) and (kind.high is None or value <= kind.high)


def _range_text(kind: Kind) -> str:
    if kind.low is not None and kind.high is not None:
        return f" from {kind.low:g} to {kind.high:g}"
    return f" of at least {kind.low:g}" if kind.low is not None else ""


def argv_bytes(argv: list[str]) -> int:
    """What the arguments take in the guest's exec frame: each one UTF-8 and its NUL."""
    return sum(len(arg.encode("utf-8")) + 1 for arg in argv)


def _list_problem(value: Any, kind: Kind, what: str) -> str | None:
    if not isinstance(value, list):
        return f"must be a list of {what}"
    if len(value) > (kind.bound or 0):
        return f"has {len(value)} entries; at most {kind.bound} are allowed"
    return None


def _problem(value: Any, kind: Kind) -> str | None:
    """Why *value* is not a valid *kind*, or None if it is."""
    tag = kind.tag
    if tag == "str":
        ok = isinstance(value, str) and len(value) <= (kind.bound or 0)
        return None if ok else f"must be text of at most {kind.bound} characters"
    if tag == "int":
        ok = _is_int(value) and _in_range(value, kind)
        return None if ok else f"must be an integer{_range_text(kind) or ' of 64 bits'}"
    if tag == "float":
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and _in_range(value, kind))
        return None if ok else f"must be a finite number{_range_text(kind)}"
    if tag == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if tag == "bytes":
        ok = isinstance(value, bytes) and len(value) <= (kind.bound or 0)
        return None if ok else f"must be bytes, at most {kind.bound}"
    if tag in ("str_list", "argv"):
        problem = _list_problem(value, kind, "text")
        if problem:
            return problem
        if not all(isinstance(v, str) and len(v) <= (kind.item or 0) for v in value):
            return f"must hold text entries of at most {kind.item} characters each"
        if kind.total is not None:
            try:
                size = argv_bytes(value)
            except UnicodeEncodeError:
                return "holds text that is not valid UTF-8"
            if size > kind.total:
                return f"takes {size} bytes (UTF-8, one NUL each); at most {kind.total} are allowed"
        return None
    if tag == "paths":
        problem = _list_problem(value, kind, "paths")
        if problem:
            return problem
        for path in value:
            if not isinstance(path, str) or not is_safe_relative_path(path):
                return _path_problem(path)
        return None
    if tag == "int_list":
        problem = _list_problem(value, kind, "job ids")
        if problem:
            return problem
        ok = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in value)
        return None if ok else "must hold job ids (integers from 0)"
    if tag == "files":
        return _files_problem(value, kind)
    if tag == "env":
        return _env_problem(value, kind)
    if tag == "modes":
        return _modes_problem(value, kind)
    if tag == "identity":
        return _identity_problem(value)
    if tag == "peers":
        return _peers_problem(value, kind)
    if tag == "digest":
        return None if isinstance(value, bytes) and len(value) == kind.bound else "must be a 32-byte SHA-256"
    if tag == "digest_list":
        problem = _list_problem(value, kind, "digests")
        if problem:
            return problem
        ok = all(isinstance(v, bytes) and len(v) == 32 for v in value)
        return None if ok else "must hold 32-byte SHA-256 digests"
    if tag == "sha256":
        ok = isinstance(value, str) and len(value) == kind.bound and all(c in "0123456789abcdef" for c in value)
        return None if ok else "must be a SHA-256 in 64 lower-case hex digits"
    if tag == "image":
        return _image_problem(value)
    if tag == "list":
        ok = isinstance(value, list) and len(value) <= (kind.bound or 0)
        return None if ok else f"must be a list of at most {kind.bound} entries"
    if tag == "map":
        ok = isinstance(value, dict) and len(value) <= (kind.bound or 0)
        return None if ok else f"must be a map of at most {kind.bound} entries"
    raise AssertionError(tag)  # pragma: no cover - schema typo


def _path_problem(path: Any) -> str:
    shown = _shown(path) if isinstance(path, str) else type(path).__name__
    return (f"holds {shown}, which is not a relative path inside the job directory "
            f"(no '..', '.', empty part or leading '/', at most {MAX_PATH_BYTES} bytes)")


def _files_problem(value: Any, kind: Kind) -> str | None:
    if not isinstance(value, dict):
        return "must be a map of file names to contents"
    if len(value) > (kind.bound or 0):
        return f"has {len(value)} files; at most {kind.bound} are allowed"
    total = 0
    for path, data in value.items():
        if not isinstance(path, str) or not is_safe_relative_path(path):
            return _path_problem(path)
        if not isinstance(data, bytes):
            return f"file {_shown(path)} must be bytes"
        if kind.item is not None and len(data) > kind.item:
            return f"file {_shown(path)} has {len(data)} bytes; at most {kind.item} are allowed per file"
        total += len(data)
    if kind.total is not None and total > kind.total:
        return f"files take {total} bytes together; at most {kind.total} are allowed"
    return None


def is_env_name(name: Any) -> bool:
    """An environment variable name a shell can export: a letter or '_', then letters, digits or '_'."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_SMALL_FIELD and name.isascii()
            and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name))


def _env_problem(value: Any, kind: Kind) -> str | None:
    if not isinstance(value, dict):
        return "must be a map of variable names to values"
    if len(value) > (kind.bound or 0):
        return f"has {len(value)} variables; at most {kind.bound} are allowed"
    for name, text in value.items():
        if not is_env_name(name):
            shown = _shown(name) if isinstance(name, str) else type(name).__name__
            return f"holds {shown}, which is not a variable name (letters, digits and '_', not first a digit)"
        if not isinstance(text, str) or len(text) > (kind.item or 0) or "\0" in text:
            return f"variable {name} must be text of at most {kind.item} characters, without NUL"
    return None


def _modes_problem(value: Any, kind: Kind) -> str | None:
    if not isinstance(value, dict) or len(value) > (kind.bound or 0):
        return f"must be a map of at most {kind.bound} input paths to permission bits"
    for path, mode in value.items():
        if not isinstance(path, str) or not is_safe_relative_path(path):
            return _path_problem(path)
        if not _is_int(mode) or not 0 <= mode <= 0o777:
            return f"gives {_shown(path)} a mode that is not permission bits (0 to 0o777)"
    return None


def argv_problem(argv: Any) -> str | None:
    """Why *argv* is not a command the guest can be given (count, sizes), or None."""
    return _problem(argv, ARGV)


_IDENTITY_FIELDS = {"network": str, "mac": bytes, "ip": str, "prefix": int, "hostname": str, "rank": int,
                    "size": int, "hosts": list}


def _is_ipv4(text: Any) -> bool:
    parts = text.split(".") if isinstance(text, str) else []
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts)


def _is_hostname(text: Any) -> bool:
    return (isinstance(text, str) and 0 < len(text) <= MAX_HOSTNAME and text.isascii()
            and all(c.isalnum() or c == "-" for c in text) and not text.startswith("-"))


def _identity_problem(value: Any) -> str | None:
    """A guest's conet identity: everything the guest is told about itself and its job's other guests."""
    if not isinstance(value, dict) or set(value) != set(_IDENTITY_FIELDS):
        return f"must be a map of exactly {', '.join(_IDENTITY_FIELDS)}"
    for name, kind in _IDENTITY_FIELDS.items():
        if not isinstance(value[name], kind) or (kind is int and isinstance(value[name], bool)):
            return f"has {name} of the wrong type"
    size, hosts = value["size"], value["hosts"]
    if not (1 <= size <= MAX_JOB_GUESTS and 0 <= value["rank"] < size and len(hosts) == size):
        return "has a rank, size or host list that do not agree"
    if len(value["mac"]) != 6 or value["mac"][0] & 1 or not 8 <= value["prefix"] <= 30:
        return "has an invalid MAC (6 bytes, unicast) or prefix length"
    if not _is_ipv4(value["ip"]) or not _is_hostname(value["hostname"]) or len(value["network"]) > MAX_SMALL_FIELD:
        return "has an invalid address, hostname or network"
    for entry in hosts:
        if not (isinstance(entry, list) and len(entry) == 2 and _is_hostname(entry[0]) and _is_ipv4(entry[1])):
            return "has a host entry that is not [hostname, IPv4 address]"
    return None


def image_chunk_count(size: int) -> int:
    """How many chunks an image of *size* bytes is cut into (the last one may be short)."""
    return -(-size // IMAGE_CHUNK_BYTES)


def _image_problem(value: Any) -> str | None:
    """An image a job runs on, as the coordinator describes it to the agent that fetches it."""
    fields = {"name": IMAGE_NAME, "sha256": SHA256, "size": IMAGE_SIZE, "chunks": DIGESTS}
    if not isinstance(value, dict) or set(value) != set(fields):
        return f"must be a map of exactly {', '.join(fields)}"
    for name, kind in fields.items():
        problem = _problem(value[name], kind)
        if problem is not None:
            return f"has {name} that {problem}"
    if len(value["chunks"]) != image_chunk_count(value["size"]):
        return f"lists {len(value['chunks'])} chunks for {value['size']} bytes"
    return None


def _peers_problem(value: Any, kind: Kind) -> str | None:
    problem = _list_problem(value, kind, "peers")
    if problem:
        return problem
    for peer in value:
        if not (isinstance(peer, dict) and {"node", "endpoint", "key"} <= set(peer) <= PEER_FIELDS
                and all(isinstance(peer[k], str) and len(peer[k]) <= MAX_SMALL_FIELD
                        for k in ("node", "endpoint", "key"))
                and _networks_ok(peer.get("networks", []))):
            return ("must hold maps of node, endpoint and key (text), and optionally networks (a list of at most "
                    f"{MAX_SHARED_NETWORKS} names)")
    return None


def _networks_ok(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_SHARED_NETWORKS and all(
        isinstance(name, str) and len(name) <= MAX_SMALL_FIELD for name in value)


def _check_field(name: str, value: Any, kind: Kind) -> None:
    problem = _problem(value, kind)
    if problem is not None:
        raise ProtocolError(f"field {name[:40]!r} {problem}")


def is_safe_relative_path(path: str) -> bool:
    """A job file name: relative, no '..' or '.' or empty part, no NUL, at most MAX_PATH_BYTES of UTF-8."""
    if not path or "\0" in path or path.startswith("/"):
        return False
    try:
        if len(path.encode("utf-8")) > MAX_PATH_BYTES:
            return False
    except UnicodeEncodeError:  # lone surrogates: not a name the guest could hold
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


_ABSENT = object()
_FLOAT_MAX = sys.float_info.max


def _quick_check(kind: Kind) -> Callable[[Any], bool]:
    """A predicate that accepts the common valid values of *kind* in one expression (a message's scalars), and
    says False for anything else, valid or not; validate then asks _problem, which decides. So the predicate needs
    only to be sound: it may never accept what _problem refuses."""
    tag, bound = kind.tag, kind.bound or 0
    if tag == "str":
        return lambda value: type(value) is str and len(value) <= bound
    if tag == "bytes":
        return lambda value: type(value) is bytes and len(value) <= bound
    if tag == "bool":
        return lambda value: type(value) is bool
    if tag == "int":
        low = -(2**63) if kind.low is None else max(kind.low, -(2**63))
        high = 2**63 - 1 if kind.high is None else min(kind.high, 2**63 - 1)
        return lambda value: type(value) is int and low <= value <= high
    if tag == "float":  # the bounds (finite) also refuse NaN and the infinities
        flow = -_FLOAT_MAX if kind.low is None else kind.low
        fhigh = _FLOAT_MAX if kind.high is None else kind.high
        return lambda value: type(value) in (float, int) and flow <= value <= fhigh
    if tag == "int_list":  # a heartbeat's running jobs: usually none or a few
        return lambda value: type(value) is list and not value
    return lambda value: False


# Each message type's fields as (name, quick check, kind, required): what validate walks, without attribute
# lookups; _problem runs only where the quick check does not accept.
_FIELD_CHECKS = {kind: tuple((name, _quick_check(field.kind), field.kind, field.required)
                             for name, field in fields.items())
                 for kind, (_, fields) in SCHEMAS.items()}


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
    for name, quick, field_kind, required in _FIELD_CHECKS[kind]:  # every message passes here: plain lookups
        value = message.get(name, _ABSENT)
        if value is _ABSENT:
            if required:
                raise ProtocolError(f"{kind} message lacks field {name!r}")
        elif not quick(value):
            _check_field(name, value, field_kind)
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
    except OverflowError:  # an integer msgpack cannot carry, inside a free-form map or list
        raise ProtocolError(f"{kind} message holds an integer beyond 64 bits") from None
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"{kind} message of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return data


def decode(frame: bytes) -> dict[str, Any]:
    """Unpack and validate one frame; raise ProtocolError on anything malformed or oversized."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME_BYTES,
                                  max_str_len=MAX_TEXT_FIELD, max_array_len=MAX_LIST_ENTRIES,
                                  max_map_len=MAX_LIST_ENTRIES)
    except Exception as exc:  # msgpack raises a zoo of types on hostile input; none may escape
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}") from None
    return validate(message)


def error(code: str, message: str, in_reply_to: str | None = None) -> bytes:
    fields: dict[str, Any] = {"code": code, "message": message[:MAX_SMALL_FIELD]}
    if in_reply_to:
        fields["in_reply_to"] = in_reply_to[:MAX_SMALL_FIELD]
    return encode("error", **fields)
