"""Compiling conode's small native helpers (``native/*.c``) once per source version into the user's cache.

Each helper is built with the host C compiler the first time it is needed and reused afterwards; the build is
atomic, so concurrent processes never load a half-written library. Callers fall back to Python when there is
no compiler (the helper raises OSError with the reason).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from conode.cache import cache_dir


def build(name: str, flags: tuple[str, ...] = (), tag_extra: bytes = b"") -> Path:
    """Compile ``native/NAME.c`` with *flags* (once per source, flags and *tag_extra*) and return the library."""
    source = resources.files("conode.vm.cpu").joinpath(f"native/{name}.c").read_bytes()
    tag = hashlib.sha256(source + "\0".join(flags).encode() + tag_extra).hexdigest()[:16]
    target = cache_dir() / f"libconode_{name}-{tag}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    src_path = target.with_suffix(".c")
    src_path.write_bytes(source)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    result = subprocess.run([compiler, "-O2", "-fPIC", "-shared", "-o", str(tmp), str(src_path), *flags],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"compiling native/{name}.c failed: {result.stderr.strip()[:500]}")
    os.replace(tmp, target)
    return target
