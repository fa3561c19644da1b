"""The agent ↔ guest worker pipe: every message type, its fields and its limits, in one place.

The pipe carries length-prefixed msgpack maps (pipe.py) with a ``type`` and the type's fields, described here the
way conode/cluster/protocol.py describes the control plane, and checked with the same field machinery. The agent
validates what it sends (a job the worker could not take fails before it reaches the worker) and everything a
worker sends: the worker runs the untrusted guest, so an invalid message means a broken worker, never a broken
agent. Fields not in the schema are dropped, so nothing reaches the agent that it does not read.
"""

from __future__ import annotations

from typing import Any

from conode.agent.pipe import PipeError
from conode.cluster.protocol import (ARGV, BOOL, INPUTS, INT, INT_LIST, MEASURE, MISSING, PATHS, SHA256, STR, TEXT,
                                     Field, Kind, ProtocolError, _check_field, is_safe_relative_path)
from conode.conet.port import TOKEN_BYTES
from conode.limits import (CHANNEL_MAX_PAYLOAD, MAX_DISK_BUDGET_MIB, MAX_FILES, MAX_JOB_OUTPUT_BYTES,
                           MAX_OUTPUT_FILE_BYTES, MAX_SMALL_FIELD)
from conode.vm.net_identity import IdentityError, NetIdentity

CHUNK = Kind("bytes", CHANNEL_MAX_PAYLOAD)  # the worker forwards output as the guest channel delivers it
RESULTS = Kind("files", MAX_FILES)  # sizes are checked apart: over the limits is the job's fault (OutputLimitError)
STREAMS = ("stdout", "stderr")
# The guest's conet port and identity: token (16 bytes), socket (the switch's Unix socket path), mac (6 bytes),
# ip, prefix, hostname, hosts ({hostname: ip}, in rank order), rank, size. Checked whole by _check_net.
NET = Kind("map", 9)
MAX_SOCKET_PATH = 107  # what a Unix socket address holds
# The guest's root disk, for a job on a pool image: base (the cached image file), overlay (the guest's
# copy-on-write file), budget_mib. Checked whole by _check_disk.
DISK = Kind("map", 3)
TOKEN = Kind("bytes", TOKEN_BYTES)
# Checkpoints of the job's guest (checkpointer.py): dir (where the worker writes pieces), interval_s (0: only in
# its gang's cuts), seq (the next piece's number). Checked whole by _check_checkpoint.
CHECKPOINT = Kind("map", 3)
PIECES = Kind("str_list", 64, item=MAX_SMALL_FIELD)  # a checkpoint chain's piece files, in order
COUNT = Kind("int", low=0, high=1 << 40)
OUTPUTS = Kind("map", 2)  # stdout, stderr: bytes the job had written. Checked whole by _check_outputs.
# What a vacated guest's checkpoints go on from (checkpointer.py): interval_s, seq, stdout, stderr.
CARRIED = Kind("map", 4)

TO_WORKER: dict[str, dict[str, Field]] = {
    "run": {"job": Field(INT), "argv": Field(ARGV), "inputs": Field(INPUTS), "outputs": Field(PATHS),
            "net": Field(NET, required=False), "disk": Field(DISK, required=False),
            "checkpoint": Field(CHECKPOINT, required=False)},
    "restore": {"job": Field(INT), "pieces": Field(PIECES), "net": Field(NET, required=False),
                "disk": Field(DISK, required=False), "checkpoint": Field(CHECKPOINT, required=False)},
    "checkpoint_reset": {"job": Field(INT)},
    "checkpoint_start": {"job": Field(INT), "checkpoint": Field(CHECKPOINT), "outputs": Field(OUTPUTS)},
    # a gang's cut (checkpointer.py): pre-copy a piece now, make its final copy on cut_final and keep the guest
    # still after it until cut_resume (each waited for hold_s at most)
    "cut": {"job": Field(INT), "cut": Field(COUNT), "hold_s": Field(MEASURE)},
    "cut_final": {"job": Field(INT), "cut": Field(COUNT)},
    "cut_resume": {"job": Field(INT), "cut": Field(COUNT)},
    "cancel": {"job": Field(INT)},
    "pause": {},
    "resume": {},
    "vacate": {"path": Field(STR)},
    "quit": {},
    "plug": {"token": Field(TOKEN), "socket": Field(STR)},  # a resumed guest's NIC joins the switch again
    # Moves (worker_moves.py): keys is the agent's keys directory, peer the other agent's public key.
    "migrate": {"job": Field(INT), "endpoint": Field(STR), "peer": Field(STR), "keys": Field(STR),
                "max_bytes_per_s": Field(MEASURE, required=False)},
    "receive": {"job": Field(INT), "bind": Field(STR), "peer": Field(STR), "keys": Field(STR),
                "base": Field(STR, required=False), "overlay": Field(STR, required=False)},
    "move_go": {"job": Field(INT)},
    "move_abort": {"job": Field(INT), "reason": Field(TEXT)},
}

FROM_WORKER: dict[str, dict[str, Field]] = {
    "ready": {"guest": Field(STR), "speed": Field(MEASURE)},
    "output": {"job": Field(INT), "stream": Field(STR), "data": Field(CHUNK)},
    "finished": {"job": Field(INT), "status": Field(INT), "outputs": Field(RESULTS), "missing": Field(MISSING),
                 "runtime_s": Field(MEASURE)},
    "failed": {"job": Field(INT), "reason": Field(TEXT)},
    "paused": {"at": Field(MEASURE)},
    "resumed": {},
    "vacated": {"path": Field(STR), "jobs": Field(INT_LIST), "checkpoint": Field(CARRIED, required=False)},
    "checkpoint": {"job": Field(INT), "seq": Field(COUNT), "base": Field(Kind("int", low=-1, high=1 << 40)),
                   "path": Field(STR), "size": Field(COUNT), "sha256": Field(SHA256), "pages": Field(COUNT),
                   "final_pages": Field(COUNT), "stall_s": Field(MEASURE), "took_s": Field(MEASURE),
                   "stall_cpu_s": Field(MEASURE, required=False)},  # the machine thread's CPU time in the stall
    "cut_ready": {"job": Field(INT), "cut": Field(COUNT)},
    "cut_taken": {"job": Field(INT), "cut": Field(COUNT), "seq": Field(COUNT)},
    "cut_failed": {"job": Field(INT), "cut": Field(COUNT), "reason": Field(TEXT)},  # its piece was not taken
    "cut_resumed": {"job": Field(INT), "cut": Field(COUNT), "held_s": Field(MEASURE)},
    "listening": {"job": Field(INT), "endpoint": Field(STR)},
    "move_ready": {"job": Field(INT)},
    "moved_out": {"job": Field(INT), "downtime_s": Field(MEASURE, required=False), "total_s": Field(MEASURE),
                  "paused_s": Field(MEASURE), "bytes": Field(INT), "rounds": Field(INT),
                  # the stop-and-copy phase: last pages sent, destination ready, hand-over done (from the pause)
                  "sent_s": Field(MEASURE, required=False), "ready_s": Field(MEASURE, required=False),
                  "handed_s": Field(MEASURE, required=False), "final_pages": Field(INT, required=False)},
    "moved_in": {"job": Field(INT), "rounds": Field(INT), "bytes": Field(INT)},
    "move_failed": {"job": Field(INT), "reason": Field(TEXT), "handed_over": Field(BOOL)},
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
            if not spec.required:
                continue
            raise PipeError(f"{kind} message {direction} lacks field {name!r}")
        try:
            _check_field(name, message[name], spec.kind)
        except ProtocolError as exc:
            raise PipeError(f"{kind} message {direction}: {exc}") from None
        checked[name] = message[name]
    return checked


def _check_missing(kind: str, missing: list[str]) -> None:
    """Outputs reported missing: "path" or "path: reason", the path inside the job directory."""
    for entry in missing:
        if not is_safe_relative_path(entry.split(": ", 1)[0]):
            raise PipeError(f"{kind}: {entry[:40]!r} does not name a file inside the job directory")


def validate_to_worker(message: Any) -> dict[str, Any]:
    """Check a message the agent is about to send a worker; return it, or raise PipeError saying why not."""
    checked = _check(message, TO_WORKER, "to the worker")
    kind = checked["type"]
    if kind == "run" and not checked["argv"]:
        raise PipeError("run: the command is empty")
    if kind == "restore" and not checked["pieces"]:
        raise PipeError("restore: no checkpoint pieces")
    if kind in ("run", "restore") and "net" in checked:
        _check_net(checked["net"])
    if kind in ("run", "restore") and "disk" in checked:
        _check_disk(checked["disk"])
    if kind in ("run", "restore", "checkpoint_start") and "checkpoint" in checked:
        _check_checkpoint(kind, checked["checkpoint"])
    if kind == "checkpoint_start":
        _check_outputs(kind, checked["outputs"])
    if checked["type"] == "plug":
        _check_port("plug", checked["token"], checked["socket"])
    return checked


def _check_disk(disk: dict[str, Any]) -> None:
    if set(disk) != {"base", "overlay", "budget_mib"}:
        raise PipeError("run: the disk map must hold exactly base, overlay and budget_mib")
    for name in ("base", "overlay"):
        if not isinstance(disk[name], str) or not 0 < len(disk[name]) <= MAX_SMALL_FIELD:
            raise PipeError(f"run: the disk's {name} must be a path of at most {MAX_SMALL_FIELD} characters")
    budget = disk["budget_mib"]
    if not isinstance(budget, int) or isinstance(budget, bool) or not 1 <= budget <= MAX_DISK_BUDGET_MIB:
        raise PipeError(f"run: the disk budget must be from 1 to {MAX_DISK_BUDGET_MIB} MiB")


def _check_map(kind: str, what: str, value: dict[str, Any], fields: dict[str, Kind]) -> None:
    """A map of exactly *fields*, each of its kind."""
    if set(value) != set(fields):
        raise PipeError(f"{kind}: the {what} map must hold exactly {', '.join(fields)}")
    for name, spec in fields.items():
        try:
            _check_field(name, value[name], spec)
        except ProtocolError as exc:
            raise PipeError(f"{kind}: {what} {exc}") from None


def _check_checkpoint(kind: str, settings: dict[str, Any]) -> None:
    _check_map(kind, "checkpoint", settings, {"dir": STR, "interval_s": MEASURE, "seq": COUNT})


def _check_outputs(kind: str, outputs: dict[str, Any]) -> None:
    _check_map(kind, "output offsets", outputs, {s: COUNT for s in STREAMS})


def _check_carried(kind: str, carried: dict[str, Any]) -> None:
    """What a vacated guest's checkpoints go on from: interval_s, seq and the output offsets."""
    _check_map(kind, "checkpoint", carried, {"interval_s": MEASURE, "seq": COUNT, **{s: COUNT for s in STREAMS}})


def _check_port(kind: str, token: Any, path: Any) -> None:
    if not isinstance(token, bytes) or len(token) != TOKEN_BYTES:
        raise PipeError(f"{kind}: the conet token must be {TOKEN_BYTES} bytes")
    if not isinstance(path, str) or not 0 < len(path.encode(errors="replace")) <= MAX_SOCKET_PATH:
        raise PipeError(f"{kind}: the conet socket must be a path of at most {MAX_SOCKET_PATH} bytes")


def _check_net(net: dict[str, Any]) -> None:
    """A run message's conet port and identity, checked whole (the identity as coagent will check it)."""
    token, path = net.get("token"), net.get("socket")
    if token is not None or path is not None:  # else no switch on this agent: the guest keeps its identity
        _check_port("run", token, path)
    unknown = set(net) - {"token", "socket", "mac", "ip", "prefix", "hostname", "hosts", "rank", "size"}
    if unknown:
        raise PipeError(f"run: the conet map has unknown field {min(unknown)[:40]!r}")
    try:
        NetIdentity.from_message(net)
    except IdentityError as exc:
        raise PipeError(f"run: {exc}") from None


def validate_from_worker(message: Any) -> dict[str, Any]:
    """Check a message a worker sent; return it (known fields only), or raise PipeError.

    OutputLimitError (a PipeError) marks a result that is well formed but whose files are over the limits.
    """
    checked = _check(message, FROM_WORKER, "from the worker")
    kind = checked["type"]
    if kind == "output" and checked["stream"] not in STREAMS:
        raise PipeError(f"output: unknown stream {checked['stream'][:40]!r}")
    if kind == "vacated" and "checkpoint" in checked:
        _check_carried(kind, checked["checkpoint"])
    if kind == "finished":
        _check_missing(kind, checked["missing"])
        outputs = checked["outputs"]
        for name, data in outputs.items():
            if len(data) > MAX_OUTPUT_FILE_BYTES:
                raise OutputLimitError(checked["job"], f"output {name[:80]!r} of {len(data)} bytes exceeds the "
                                       f"{MAX_OUTPUT_FILE_BYTES}-byte limit for one file")
        total = sum(len(data) for data in outputs.values())
        if total > MAX_JOB_OUTPUT_BYTES:
            raise OutputLimitError(checked["job"], f"outputs of {total} bytes exceed the "
                                   f"{MAX_JOB_OUTPUT_BYTES}-byte limit for one job; write less, or split the job")
    return checked
