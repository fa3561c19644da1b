"""Small TOML files for settings: read with tomllib, written as flat key = value pairs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from conode.errors import ConodeError


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as src:
            return tomllib.load(src)
    except FileNotFoundError:
        raise ConodeError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConodeError(f"configuration file {path} is not valid TOML: {exc}") from None


def write_toml(path: Path, values: dict[str, str | int]) -> None:
    """Write flat key = value pairs (JSON string escaping is valid TOML for basic strings)."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("# written by conode\n" + "\n".join(lines) + "\n")
