"""Ending guest CPU slices on time.

Three ways, best first:

- with conode's engine, a deadline timer thread kicks the CPU out at the deadline (blocks there check for exit
  requests only at their start, so an asynchronous kick never leaves an instruction half done): no hook at all;
- with stock Unicorn, a native block hook that checks the deadline (and the host's requests) at every
  translation block — stock Unicorn also checks for exit requests after memory accesses in mid-block, where an
  asynchronous stop would cut an instruction in half;
- without a C compiler, the same block hook in Python: correct, several times slower.

The native code (``native/slice.c``) is compiled once per source version into the user's cache directory with the
host C compiler against the headers Unicorn ships in its wheel; ``conode engine`` says which way runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from conode.vm.cpu import native_build

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
    import unicorn

    include, libdir = _unicorn_dirs()
    if not (include / "unicorn" / "unicorn.h").exists():
        raise OSError(f"Unicorn headers not found under {include}")
    return native_build.build("slice", (f"-I{include}", f"-L{libdir}", "-l:libunicorn.so.2",
                                        f"-Wl,-rpath,{libdir}"), unicorn.__version__.encode())


def holding_gil(function: object, restype: object, *argtypes: object) -> Callable[..., object]:
    """*function*, a ctypes function of a CDLL (which hands the GIL over around each call), called holding it.

    For short native calls only — a flag stored, a lock no Python thread holds, a copy into guest RAM — where
    handing the GIL over and taking it back costs more than the call: with other threads busy (a port's
    reader, the watchdog, another guest) taking it back waits up to a switch interval.
    """
    address = ctypes.cast(function, ctypes.c_void_p).value
    return ctypes.PYFUNCTYPE(restype, *argtypes)(address)  # type: ignore[arg-type]


def _engine_function(name: str) -> object | None:
    """A function only conode's engine exports, or None on stock Unicorn."""
    from unicorn.unicorn_py3.unicorn import uclib

    return getattr(uclib, name, None)


class Slicer:
    """Owns the shared slice-control block and the hook that honours it."""

    def __init__(self, uc: object, reg_read_eflags: Callable[[], int]) -> None:
        self.control = SliceControl()
        # With kicks, a request is its flag *and* its kick: the lock keeps the two together, so that a kick
        # whose flag the machine already cleared cannot land in a later slice and end it for no reason
        # (which would read as HLT).
        self._request_lock = threading.Lock()
        self._uc = uc
        self._hook_ref: object = None
        self._timer: int | None = None
        self.info = self._attach(reg_read_eflags)

    def _attach(self, reg_read_eflags: Callable[[], int]) -> SlicerInfo:
        if os.environ.get("CONODE_PURE_PYTHON") != "1":
            try:
                path = build_native_slicer()
                lib = ctypes.CDLL(str(path))
                kick = _engine_function("uc_conode_kick")
                # The timer cannot end a slice when interrupts get enabled; the Python passage needs that.
                python_passage = os.environ.get("CONODE_PASSAGE") == "python"
                if kick is not None and os.environ.get("CONODE_SLICER") != "hook" and not python_passage:
                    return self._attach_timer(lib, kick, path)
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

    def _attach_timer(self, lib: ctypes.CDLL, kick: object, path: Path) -> SlicerInfo:
        from unicorn.unicorn_py3.unicorn import uclib

        handle = self._uc._uch  # type: ignore[attr-defined]
        uclib.uc_conode_lean_blocks(handle, True)  # before anything is translated
        lib.conode_timer_start.restype = ctypes.c_void_p
        lib.conode_timer_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.conode_timer_stop.argtypes = [ctypes.c_void_p]
        self._timer_arm = holding_gil(lib.conode_timer_arm, None, ctypes.c_void_p, ctypes.c_int64)
        self._timer_disarm = holding_gil(lib.conode_timer_disarm, None, ctypes.c_void_p)
        kick_address = ctypes.cast(kick, ctypes.c_void_p).value
        timer = lib.conode_timer_start(handle, kick_address, ctypes.addressof(self.control))
        if not timer:
            raise OSError("cannot start the deadline timer thread")
        self._timer = timer
        self._lib = lib
        self._kick = holding_gil(kick, ctypes.c_int, ctypes.c_void_p)
        self._unkick = holding_gil(_engine_function("uc_conode_unkick"), ctypes.c_int, ctypes.c_void_p)
        return SlicerInfo(True, f"deadline timer with engine kicks ({path.name})")

    def close(self) -> None:
        if self._timer is not None:
            self._lib.conode_timer_stop(self._timer)
            self._timer = None

    def __del__(self) -> None:
        self.close()

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
        if self._timer is not None:
            with self._request_lock:
                self._unkick(self._uc._uch)  # type: ignore[attr-defined]  # a kick meant for an earlier slice
                if c.stop_request:
                    self._kick(self._uc._uch)  # type: ignore[attr-defined]
            self._timer_arm(self._timer, deadline_ns)

    def disarm(self) -> None:
        """The slice is over (called on the machine thread after the CPU returned)."""
        if self._timer is not None:
            self._timer_disarm(self._timer)

    def request_stop(self) -> None:
        """End the current slice at the next block boundary; safe from any thread."""
        if self._timer is None:
            self.control.stop_request = 1
            return
        with self._request_lock:
            self.control.stop_request = 1
            self._kick(self._uc._uch)  # type: ignore[attr-defined]

    def clear_request(self) -> None:
        with self._request_lock:
            self.control.stop_request = 0
