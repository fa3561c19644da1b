"""Ending guest CPU slices on time: the native block hook, built on first use, or a pure-Python fallback.

The native hook (``native/slice.c``) is compiled once per source version into the user's cache directory with
the host C compiler against the headers Unicorn ships in its wheel. Where no compiler is available, a Python
block hook does the same job, correctly but several times slower; ``conode engine`` says which one runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from conode.cache import cache_dir

log = logging.getLogger(__name__)

SLICE_RUNNING = 0
SLICE_DEADLINE = 1
SLICE_REQUEST = 2
SLICE_IRQ_WINDOW = 3
EFLAGS_IF = 0x200
_CLOCK_EVERY = 16


class SliceControl(ctypes.Structure):
    """Mirror of ``struct conode_slice`` in native/slice.c."""

    _fields_ = [
        ("deadline_ns", ctypes.c_int64),
        ("stop_request", ctypes.c_int32),
        ("wait_for_if", ctypes.c_int32),
        ("countdown", ctypes.c_int32),
        ("reason", ctypes.c_int32),
        ("blocks", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class SlicerInfo:
    """Which slicer runs and why, for ``conode engine`` and benchmarks."""

    native: bool
    detail: str


def _unicorn_dirs() -> tuple[Path, Path]:
    import unicorn

    root = Path(unicorn.__file__).parent
    return root / "include", root / "lib"


def build_native_slicer() -> Path:
    """Compile native/slice.c (once per source and Unicorn version) and return the library's path."""
    source = resources.files("conode.vm").joinpath("native/slice.c").read_bytes()
    include, libdir = _unicorn_dirs()
    import unicorn

    tag = hashlib.sha256(source + unicorn.__version__.encode()).hexdigest()[:16]
    target = cache_dir() / f"libconode_slice-{tag}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    if not (include / "unicorn" / "unicorn.h").exists():
        raise OSError(f"Unicorn headers not found under {include}")
    target.parent.mkdir(parents=True, exist_ok=True)
    src_path = target.with_suffix(".c")
    src_path.write_bytes(source)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    cmd = [
        compiler, "-O2", "-fPIC", "-shared", f"-I{include}", "-o", str(tmp), str(src_path),
        f"-L{libdir}", "-l:libunicorn.so.2", f"-Wl,-rpath,{libdir}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"compiling the native slicer failed: {result.stderr.strip()[:500]}")
    os.replace(tmp, target)  # atomic: concurrent builders never load a half-written library
    return target


class Slicer:
    """Owns the shared slice-control block and the hook that honours it."""

    def __init__(self, uc: object, reg_read_eflags: Callable[[], int]) -> None:
        self.control = SliceControl()
        self._uc = uc
        self._hook_ref: object = None
        self.info = self._attach(reg_read_eflags)

    def _attach(self, reg_read_eflags: Callable[[], int]) -> SlicerInfo:
        if os.environ.get("CONODE_PURE_PYTHON") != "1":
            try:
                path = build_native_slicer()
                lib = ctypes.CDLL(str(path))
                handle = ctypes.c_size_t()
                err = lib.conode_slice_attach(
                    self._uc._uch, ctypes.byref(self.control), ctypes.byref(handle)  # type: ignore[attr-defined]
                )
                if err != 0:
                    raise OSError(f"uc_hook_add failed with error {err}")
                self._hook_ref = lib
                return SlicerInfo(True, f"native block hook ({path.name})")
            except OSError as exc:
                log.warning("native slicer unavailable, using the slower Python hook: %s", exc)
                reason = str(exc)
        else:
            reason = "CONODE_PURE_PYTHON=1"
        self._attach_python(reg_read_eflags)
        return SlicerInfo(False, f"Python block hook ({reason})")

    def _attach_python(self, reg_read_eflags: Callable[[], int]) -> None:
        from unicorn import UC_HOOK_BLOCK

        control = self.control

        def on_block(uc: object, address: int, size: int, user_data: object) -> None:
            if control.reason != SLICE_RUNNING:
                return
            if control.stop_request:
                control.reason = SLICE_REQUEST
            elif control.wait_for_if and reg_read_eflags() & EFLAGS_IF:
                control.reason = SLICE_IRQ_WINDOW
            else:
                control.countdown -= 1
                if control.countdown > 0 or time.monotonic_ns() < control.deadline_ns:
                    return
                control.countdown = _CLOCK_EVERY
                control.reason = SLICE_DEADLINE
            uc.emu_stop()  # type: ignore[attr-defined]

        self._hook_ref = self._uc.hook_add(UC_HOOK_BLOCK, on_block)  # type: ignore[attr-defined]

    def arm(self, deadline_ns: int, wait_for_if: bool) -> None:
        """Prepare the next slice (called on the machine thread before the CPU runs)."""
        c = self.control
        c.deadline_ns = deadline_ns
        c.wait_for_if = 1 if wait_for_if else 0
        c.countdown = 1  # read the clock at the first block: the deadline may already be near
        c.reason = SLICE_RUNNING

    def request_stop(self) -> None:
        """End the current slice at the next block boundary; safe from any thread."""
        self.control.stop_request = 1

    def clear_request(self) -> None:
        self.control.stop_request = 0
