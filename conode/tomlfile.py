"""Small TOML files for settings: read with tomllib, written with tomli-w (full TOML, any Unicode)."""

from __future__ import annotations

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


def write_toml(path: Path, values: dict[str, Any]) -> None:
    """Write *values* atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(HEADER + tomli_w.dumps(values), encoding="utf-8")
    os.replace(tmp, path)
