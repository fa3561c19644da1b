"""CURVE key pairs on disk: the coordinator's, each agent's and each admin's (a user's travel inside the client
configuration an admin hands them, coordinator/config.py).

Keys are stored as Z85 text (40 characters), the public half in ``NAME.public`` and the secret half in
``NAME.secret`` (mode 0600). Only public keys ever leave a machine: they are what an admin enrols.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from conode.errors import ConodeError

Z85_KEY_LENGTH = 40


class KeyFileError(ConodeError):
    """A key file is missing or malformed."""


@dataclass(frozen=True)
class KeyPair:
    public: str
    secret: str


def is_valid_public_key(text: str) -> bool:
    if len(text) != Z85_KEY_LENGTH:
        return False
    try:
        z85.decode(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, KeyError, struct.error):  # a character or a group beyond Z85
        return False
    return True


def generate_key_pair(directory: Path, name: str) -> KeyPair:
    """Create NAME.public / NAME.secret in *directory*; refuse to overwrite an existing pair."""
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.public", directory / f"{name}.secret"
    if public_path.exists() or secret_path.exists():
        raise KeyFileError(f"a key pair named {name!r} already exists in {directory}; remove it first to replace it")
    pair = new_key_pair()
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(pair.secret + "\n")
    public_path.write_text(pair.public + "\n")
    return pair


def new_key_pair() -> KeyPair:
    """A fresh CURVE key pair, in memory only."""
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode("ascii"), secret.decode("ascii"))


def load_key_pair(directory: Path, name: str) -> KeyPair:
    try:
        public = (directory / f"{name}.public").read_text().strip()
        secret = (directory / f"{name}.secret").read_text().strip()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {exc.filename} is missing; create keys with `init` first") from None
    if not is_valid_public_key(public) or not is_valid_public_key(secret):
        raise KeyFileError(f"key pair {name!r} in {directory} is malformed")
    return KeyPair(public, secret)
