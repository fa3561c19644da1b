"""Job descriptions: what `coordinator submit -f job.toml` reads, merged with the command line's options (which
win), and turned into one submit message.

    command = ["python3", "sweep.py", "--alpha", "$(item)"]   # or one string, split as a shell would
    inputs = ["sweep.py", "data/"]                            # files or directories, relative to this file
    outputs = ["result-$(index).csv", "plots/*.png"]          # paths or globs in the job's directory
    stdin = "params.txt"
    memory = 128                                              # MiB of guest memory
    guests = 1
    time_limit = 3600                                         # seconds
    image = "debian"
    disk_budget = 1024                                        # MiB, for a job on an image
    network = "lab"
    queue = ["0.1", "0.2", "0.5"]                             # or a count: queue = 10
    [environment]
    ALPHA = "$(item)"

``queue`` makes an array: one job per item (``queue = N``: items 0 to N-1), ``$(item)`` and ``$(index)``
replaced in the command, the environment's values and the outputs (coordinator/arrays.py).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from conode.cluster.protocol import is_env_name
from conode.errors import ConodeError
from conode.limits import (DEFAULT_GUEST_MEM_MIB, MAX_ARRAY_TASKS, MAX_DISK_BUDGET_MIB, MAX_GUEST_MEM_MIB,
                           MAX_JOB_GUESTS, MAX_JOB_INPUT_BYTES, MAX_JOB_TIMEOUT_S, MIN_GUEST_MEM_MIB)
from conode.tomlfile import read_known
from coordinator.inputs import collect

KNOWN_KEYS = ["command", "inputs", "outputs", "environment", "stdin", "memory", "guests", "time_limit", "image",
              "disk_budget", "network", "queue"]


@dataclass(frozen=True)
class JobDescription:
    """A job as described; None: not said (the default applies, or the file's value)."""

    command: list[str] = field(default_factory=list)
    inputs: list[tuple[str, Path]] = field(default_factory=list)  # as written, and the path it names
    outputs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin: Path | None = None
    mem_mib: int | None = None
    guests: int | None = None
    time_limit_s: float | None = None
    image: str | None = None
    disk_mib: int | None = None
    network: str | None = None
    items: list[str] | None = None  # an array's items; None: one job

    def merged(self, other: "JobDescription") -> "JobDescription":
        """This description with *other*'s (the command line's) said values over it; lists and the environment
        add up, a command given replaces the file's."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("inputs", "outputs"):
                changes[f.name] = [*mine, *theirs]
            elif f.name == "env":
                changes[f.name] = {**mine, **theirs}
            elif theirs not in (None, []):
                changes[f.name] = theirs
        return replace(self, **changes)

    def message(self) -> dict[str, Any]:
        """The submit message's fields: files read, defaults applied."""
        if not self.command:
            raise ConodeError("no command: give it after -- (submit [OPTIONS] -- COMMAND...) or as command in the "
                              "job description")
        if self.disk_mib is not None and self.image is None:
            raise ConodeError("a disk budget is for a job on an image: give the image too (--image NAME)")
        inputs, modes = collect(self.inputs)
        fields_: dict[str, Any] = {"argv": list(self.command), "inputs": inputs, "outputs": list(self.outputs),
                                   "mem_mib": self.mem_mib or DEFAULT_GUEST_MEM_MIB, "guests": self.guests or 1}
        optional = {"modes": modes, "env": self.env, "network": self.network, "image": self.image,
                    "disk_mib": self.disk_mib, "timeout_s": self.time_limit_s, "items": self.items}
        fields_.update({key: value for key, value in optional.items() if value not in (None, {})})
        if self.stdin is not None:
            fields_["stdin"] = read_stdin(self.stdin)
        return fields_


def read_stdin(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_JOB_INPUT_BYTES:
            raise ConodeError(f"stdin {path} takes {path.stat().st_size} bytes; a job's inputs and stdin may take "
                              f"at most {MAX_JOB_INPUT_BYTES}")
        return path.read_bytes()
    except OSError as exc:
        raise ConodeError(f"cannot read stdin {path}: {exc.strerror}") from None


def parse_env(pairs: list[str], where: str = "--env") -> dict[str, str]:
    """NAME=VALUE pairs, refused with the offending one named."""
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not is_env_name(name):
            raise ConodeError(f"{where} {pair[:80]!r} is not NAME=VALUE with NAME letters, digits and '_' (not first "
                              f"a digit)")
        env[name] = value
    return env


def count_items(count: int) -> list[str]:
    """The items of ``queue = N``: 0 to N-1."""
    return [str(index) for index in range(count)]


def read_items(path: Path) -> list[str]:
    """An items file: one item a line; blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConodeError(f"cannot read items from {path}: {getattr(exc, 'strerror', None) or exc}") from None
    items = [line for line in text.splitlines() if line.strip()]
    _check_items(items, str(path))
    return items


def _check_items(items: list[str], where: str) -> None:
    if not items:
        raise ConodeError(f"{where}: an array needs at least one item")
    if len(items) > MAX_ARRAY_TASKS:
        raise ConodeError(f"{where}: {len(items)} items; an array may have at most {MAX_ARRAY_TASKS}")


def read_description(path: Path) -> JobDescription:
    """Read a job description; every mistake is refused with the key and the file named."""
    values = read_known(path, KNOWN_KEYS)
    base = path.parent
    checker = _Checker(path)
    command = values.get("command", [])
    if isinstance(command, str):
        try:
            command = shlex.split(command)
        except ValueError as exc:
            raise ConodeError(f"{path}: command {command[:80]!r} cannot be split as a shell would: {exc}") from None
    command = checker.strings("command", command)
    inputs = [(text, base / text) for text in checker.strings("inputs", values.get("inputs", []))]
    env = checker.table("environment", values.get("environment", {}))
    stdin = values.get("stdin")
    queue = values.get("queue")
    items: list[str] | None = None
    if isinstance(queue, int) and not isinstance(queue, bool):
        checker.number("queue", queue, 1, MAX_ARRAY_TASKS)
        items = count_items(queue)
    elif queue is not None:
        items = checker.strings("queue", queue)
        _check_items(items, f"{path}: queue")
    return JobDescription(
        command=command, inputs=inputs, outputs=checker.strings("outputs", values.get("outputs", [])), env=env,
        stdin=base / checker.string("stdin", stdin) if stdin is not None else None,
        mem_mib=checker.number("memory", values.get("memory"), MIN_GUEST_MEM_MIB, MAX_GUEST_MEM_MIB),
        guests=checker.number("guests", values.get("guests"), 1, MAX_JOB_GUESTS),
        time_limit_s=checker.number("time_limit", values.get("time_limit"), 1, MAX_JOB_TIMEOUT_S, real=True),
        image=checker.optional_string("image", values.get("image")),
        disk_mib=checker.number("disk_budget", values.get("disk_budget"), 1, MAX_DISK_BUDGET_MIB),
        network=checker.optional_string("network", values.get("network")), items=items)


class _Checker:
    """Type checks of a description's values, each refusal naming the key and the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, wanted: str) -> ConodeError:
        return ConodeError(f"{self.path}: {key} must be {wanted}")

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string")
        return value

    def optional_string(self, key: str, value: Any) -> str | None:
        return None if value is None else self.string(key, value)

    def strings(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a list of strings")
        return value

    def table(self, key: str, value: Any) -> dict[str, str]:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.fail(key, "a table of NAME = \"value\" strings")
        bad = next((name for name in value if not is_env_name(name)), None)
        if bad is not None:
            raise self.fail(key, f"a table of variable names (letters, digits, '_'), not {bad[:40]!r}")
        return value

    def number(self, key: str, value: Any, low: float, high: float, real: bool = False) -> Any:
        if value is None:
            return None
        kinds = (int, float) if real else (int,)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            raise self.fail(key, f"{'a number' if real else 'an integer'} from {low:g} to {high:g}")
        return value
