"""Small TOML files for settings: read with tomllib, written with tomli-w (full TOML, any Unicode)."""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from conode.errors import ConodeError

HEADER = "# written by conode\n"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as src:
            return tomllib.load(src)
    except FileNotFoundError:
        raise ConodeError(f"configuration file {path} does not exist") from None
    except IsADirectoryError:
        raise ConodeError(f"configuration file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError:
        raise ConodeError(f"configuration file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConodeError(f"configuration file {path} is not valid TOML: {exc}") from None


def check_keys(values: dict[str, Any], known: list[str], where: Path) -> None:
    """Refuse a key *known* lacks (a typo, a setting of another version), naming it, the file and the closest
    known key: a setting silently ignored is a setting the admin believes is in force."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConodeError(f"{where}: unknown setting {key!r}; {hint}known settings are {', '.join(known)}"[:600])


def read_known(path: Path, known: list[str]) -> dict[str, Any]:
    """Read *path* and refuse any key not in *known*."""
    values = read_toml(path)
    check_keys(values, known, path)
    return values


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Write *values* atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(HEADER + tomli_w.dumps(values), encoding="utf-8")
    os.replace(tmp, path)


def create_private_toml(path: Path, values: dict[str, Any]) -> None:
    """Write *values* to a new file of mode 0600 (it holds a secret); an existing *path* is an error, never
    overwritten (it may be someone else's)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConodeError(f"{path} exists already; remove it first or choose another file") from None
    except OSError as exc:
        raise ConodeError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(HEADER + tomli_w.dumps(values))
