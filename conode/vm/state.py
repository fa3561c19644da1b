"""Typed, versioned saved state: each device describes what it saves as a small frozen record.

A record is a frozen dataclass whose fields carry their bounds (:func:`uint`, :func:`bounded`, :func:`blob`,
:func:`one_of`, :func:`items`). :func:`dump` turns one into plain msgpack-able data; :func:`load` checks plain
data completely — every key, type, bound and the record's version — and builds the record, so that a damaged
or hostile snapshot is refused with one :class:`~conode.errors.SnapshotError` line and never reaches a
device half-checked. Only what the guest can observe is saved; devices recompute derived state (interrupt
lines, ring positions in memory) when they restore a record.

A top-level record names its component (``KIND``) and its ``VERSION``. When a record's layout changes, its
version goes up and ``MIGRATIONS`` gains a step that turns the previous version's plain data into the new
one; a version with no step is refused with a message saying which conode wrote it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, ClassVar, TypeVar

from conode.errors import SnapshotError

VERSION_KEY = "version"
U64_MAX = (1 << 64) - 1
GUEST_NS_MAX = (1 << 63) - 1  # guest time in nanoseconds: 292 years

R = TypeVar("R")


class Record:
    """Base of top-level state records (dataclasses): the component's name and its state version."""

    KIND: ClassVar[str]
    VERSION: ClassVar[int]
    # old version -> a function turning that version's plain data into the next version's
    MIGRATIONS: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}


# --- field declarations --------------------------------------------------------------------------------------
def bounded(low: int, high: int, default: Any = dataclasses.MISSING) -> Any:
    """An integer in [low, high]."""
    return dataclasses.field(default=default, metadata={"min": low, "max": high})


def uint(bits: int, default: Any = dataclasses.MISSING) -> Any:
    """An unsigned integer of *bits* bits: a register."""
    return bounded(0, (1 << bits) - 1, default)


def bits(mask: int) -> Any:
    """An integer whose set bits all lie within *mask*: a register with reserved bits."""
    return dataclasses.field(metadata={"min": 0, "max": mask, "mask": mask})


def one_of(*values: int) -> Any:
    """An integer from a fixed set (modes, steps of a state machine)."""
    return dataclasses.field(metadata={"choices": frozenset(values)})


def blob(max_len: int | None = None, exact: int | None = None) -> Any:
    """Bytes (or text), at most *max_len* long or exactly *exact* long."""
    return dataclasses.field(metadata={"max_len": max_len, "exact": exact})


def items(exact: int | None = None, max_len: int | None = None) -> Any:
    """A tuple of records or values, of exactly *exact* or at most *max_len* elements."""
    return dataclasses.field(metadata={"exact": exact, "max_len": max_len})


# --- records and the objects they describe ----------------------------------------------------------------------
def capture(cls: type[R], source: object) -> R:
    """A record of class *cls* from the same-named attributes of *source*."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def assign(record: object, target: object) -> None:
    """Set the same-named attributes of *target* from *record*."""
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        setattr(target, f.name, getattr(record, f.name))


# --- dumping -------------------------------------------------------------------------------------------------
def dump(record: Any) -> dict[str, Any]:
    """Plain data for *record*; a top-level record carries its version."""
    data: dict[str, Any] = {}
    if isinstance(record, Record):
        data[VERSION_KEY] = record.VERSION
    for f in dataclasses.fields(record):
        data[f.name] = _dump_value(getattr(record, f.name))
    return data


def _dump_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dump(value)
    if isinstance(value, tuple):
        return [_dump_value(v) for v in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


# --- loading -------------------------------------------------------------------------------------------------
def load(cls: type[R], data: Any) -> R:
    """Check *data* completely against record class *cls* and return the record; raise SnapshotError."""
    kind = cls.KIND  # type: ignore[attr-defined]
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot {kind} state is not a map ({type(data).__name__}); the file is damaged")
    data = _migrate(cls, data)
    body = {k: v for k, v in data.items() if k != VERSION_KEY}
    return _load_record(cls, body, kind)


def _migrate(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    kind, current = cls.KIND, cls.VERSION  # type: ignore[attr-defined]
    version = data.get(VERSION_KEY)
    if type(version) is not int:
        raise SnapshotError(f"snapshot {kind} state has no version; it was not written by conode")
    while version != current:
        step = cls.MIGRATIONS.get(version)  # type: ignore[attr-defined]
        if step is None:
            writer = "an older" if version < current else "a newer"
            raise SnapshotError(f"snapshot {kind} state is version {version}, written by {writer} conode; this "
                                f"conode reads version {current}: boot the guest afresh")
        data = step(data)
        version += 1
    return data


def _load_record(cls: type[R], data: Any, where: str) -> R:
    if not isinstance(data, dict):
        raise SnapshotError(f"snapshot state {where} is not a map; the file is damaged")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise SnapshotError(f"snapshot state {where} has unexpected field {str(unknown[0])[:40]!r}; "
                            f"the file is damaged")
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            raise SnapshotError(f"snapshot state {where} lacks {f.name!r}; the file is damaged")
        values[f.name] = _load_value(hints[f.name], f.metadata, data[f.name], f"{where}.{f.name}")
    return cls(**values)


def _load_value(hint: Any, meta: typing.Mapping[str, Any], value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _load_value(options[0], meta, value, where)
    if origin is tuple:
        element = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, "a list", value)
        _check_length(len(value), meta, where)
        return tuple(_load_value(element, {}, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _load_record(hint, value, where)
    if hint is dict:  # another component's state: only its shape is checked here, its owner checks the rest
        if not isinstance(value, dict):
            raise _wrong(where, "a map", value)
        return value
    if hint is bool:
        if type(value) is not bool:
            raise _wrong(where, "true or false", value)
        return value
    if hint is int:
        if type(value) is not int:
            raise _wrong(where, "an integer", value)
        low, high = meta.get("min", 0), meta.get("max", U64_MAX)
        if (not low <= value <= high or ("choices" in meta and value not in meta["choices"])
                or value & ~meta.get("mask", -1)):
            raise SnapshotError(f"snapshot state {where} = {value} is out of range; the file is damaged")
        return value
    if hint is float:  # a measurement: finite (NaN and infinities are no values a device or job records)
        if type(value) not in (int, float) or not math.isfinite(value):
            raise _wrong(where, "a finite number", value)
        return float(value)
    if hint in (bytes, str):
        if type(value) is not hint:
            raise _wrong(where, "bytes" if hint is bytes else "text", value)
        _check_length(len(value), meta, where)
        return value
    raise TypeError(f"unsupported state field type {hint!r} at {where}")  # a programming error, not data


def _check_length(length: int, meta: typing.Mapping[str, Any], where: str) -> None:
    exact, max_len = meta.get("exact"), meta.get("max_len")
    if (exact is not None and length != exact) or (max_len is not None and length > max_len):
        wanted = f"exactly {exact}" if exact is not None else f"at most {max_len}"
        raise SnapshotError(f"snapshot state {where} has length {length}, {wanted} expected; "
                            f"the file is damaged")


def _wrong(where: str, expected: str, value: Any) -> SnapshotError:
    return SnapshotError(f"snapshot state {where} should be {expected}, not {type(value).__name__}; "
                         f"the file is damaged")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints
