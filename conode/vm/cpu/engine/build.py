"""Build the fast engine: the pinned Unicorn sdist from PyPI, conode's patches, x86 only.

Everything comes from the package registry (``pip download`` of the sdist) and the host's C toolchain
(cc, cmake, make); nothing else is downloaded. The result, ``libunicorn.so.2``, goes to the engine directory
in the user's cache, where :mod:`conode.vm.cpu.engine` finds it. The patches (``patches/``), each small and
explained in its own file:

- ``0001-code-page-tracking``: only pages that hold translated code make stores take the slow,
  code-invalidating path (stock Unicorn sends every store there), and host writes into guest RAM invalidate
  translated code on the pages they touch.
- ``0002-native-interrupts``: a switch to deliver exceptions and interrupts through the guest IDT with QEMU's own
  code instead of calling UC_HOOK_INTR, an external interrupt line acknowledged through a callback to the
  host's PIC, and a way to tell a triple fault from HLT.
- ``0003-lean-blocks-and-kick``: translation blocks that check for exit requests only at their start, as QEMU
  does (stock Unicorn also checks after every memory access, so an asynchronous stop can cut an instruction in
  half — which is why Unicorn's own timeout corrupts a guest), and a kick that ends the run at the next block
  boundary from any thread: slices end on a deadline timer instead of a per-block hook.
- ``0004-x87-as-hardware``: the x87 as hardware computes it — 80-bit arithmetic with softfloat's exception
  flags and C1 in the status word, special cases, loads, stores and compares as the hardware treats them,
  exact partial remainders and scaling, and the transcendental instructions (F2XM1, FYL2X, FYL2XP1, FPATAN,
  FSIN, FCOS, FSINCOS, FPTAN) computed in float128 and rounded once (stock Unicorn uses host doubles, and
  FYL2X of zero or a negative number returns garbage).
- ``0005-vex-needs-avx``: VEX-encoded instructions raise #UD on a CPU model without AVX and BMI, as hardware
  does (stock Unicorn runs them as legacy SSE), so that CPUID's missing AVX is the truth.
- ``0006-inline-exit-check``: with lean blocks, a translation block tests for an exit request with an inline
  load and branch at its start, as QEMU does, instead of a helper call (a call and a return for every block
  executed; it showed in profiles of interpreters such as gawk and bc).
- ``0007-inline-sse-integer-ops``: the commonest SSE2 integer operations on XMM registers (PAND, PANDN, POR,
  PXOR, PADDD/Q, PSUBD/Q and the shifts of 32- and 64-bit lanes by an immediate) are translated inline, lane by
  lane, instead of into a helper call per instruction (OpenSSL's SSSE3 digests are made of them);
  tests/vm/test_sse.py compares them with the host CPU.
- ``0008-inline-sse-byte-shifts``: the byte shifts PSRLDQ and PSLLDQ and SSSE3's PALIGNR of XMM registers by an
  immediate are translated inline too (SHA-256's SSSE3 message schedule is made of them): moves of 32-bit lanes
  when the count is a multiple of 4, as the lane operations around them store them (64-bit loads of lanes just
  stored 32 bits at a time stall the host's store forwarding and made it slower than the helper), 64-bit funnel
  shifts otherwise; PSHUFB stays a helper call, since a shuffle by a mask held in a register costs more as TCG ops.
- ``0009-lazy-rotate-flags``: ROL and ROR by an immediate no longer compute all the flags first (a helper call,
  and the commonest one in profiles of SHA-256, which rotates between additions and logic whose flags the next
  instruction overwrites): the flags of the instruction before stay where they are, under a new lazy flags state
  (CC_OP_ROT) that adds the rotate's C and O; tests/vm/test_sse.py compares the flags with the host CPU.
- ``0010-chain-full-blocks``: a translation block that ends only because it is full (a page's worth of code or
  the instruction limit) jumps to the next one by a chained direct jump, as QEMU does since 7.2, instead of
  returning to the main loop and looking the next block up, every few hundred instructions of straight-line code
  (unrolled digests). Blocks ended by single-stepping, an interrupt shadow, RF, or an instruction that changes
  what the next block is translated for (a segment load) still return there.
- ``0011-dirty-page-log``: a log of the guest RAM pages written since it was last taken, for migration's
  pre-copy (conode/vm/cpu/dirty.py): while it is on, pages not yet written in a round keep their TLB entries on
  the slow store path, which marks them; the page-table walker's accessed/dirty bits and host writes are marked
  too (Unicorn dropped QEMU's marking of both).
- ``0015-sse-as-vector-ops``: the operations of 0007 on XMM registers and the whole-register moves between them
  (MOVDQA, MOVAPS, MOVUPS) become TCG vector operations, one host SSE/AVX instruction each, as QEMU 7.2 translates
  them, instead of a TCG operation per 32- or 64-bit lane: fewer host instructions, and an XMM register written
  whole is read whole by the next instruction, where lanes stored 4 bytes at a time and loaded 8 or 16 at a time
  stall the host's store forwarding (SHA-256's SSSE3 message schedule alternates shifts, XORs and additions on the
  same registers). MMX registers, a single 64-bit lane, keep 0007's code. TCG's x86 backend loads and stores
  16-byte vectors with unaligned moves, since Unicorn's CPUX86State keeps the XMM registers 8 bytes off a 16-byte
  boundary (conode's context layout stays as it is).
- ``0016-virtual-tsc``: RDTSC reads the machine's virtual clock in C (``uc_conode_virtual_tsc``: its base, and
  the host's CLOCK_MONOTONIC time of its last resume, which conode sets at every pause, resume and restore)
  instead of calling a hook, before which Unicorn searched for the instruction's address (``cpu_restore_state``)
  on every read: the guest kernel's scheduler clock and, with ``clocksource=tsc``, its timekeeping read it
  thousands of times a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from conode.errors import EngineError
from conode.vm.cpu.engine import LIBRARY, UNICORN_VERSION, engine_dir, patch_files

REQUIRED_TOOLS = ("cmake", "make")


class ToolsMissing(EngineError):
    """The host lacks what the build needs; conode runs on stock Unicorn instead."""


def missing_tools() -> list[str]:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        missing.append("a C compiler (cc)")
    if shutil.which("git") is None and shutil.which("patch") is None:
        missing.append("git or patch")
    return missing


def _run(args: list[str], cwd: Path, what: str, log: Path) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        result = subprocess.run(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise EngineError(f"{what} failed (exit {result.returncode}); last lines of {log}:\n" + "\n".join(tail))


def _apply_patch(patch: Path, source: Path, log: Path) -> None:
    if shutil.which("git"):
        _run(["git", "apply", "--whitespace=nowarn", str(patch)], source, f"applying {patch.name}", log)
    else:
        _run(["patch", "-p1", "-i", str(patch)], source, f"applying {patch.name}", log)


def build_engine(progress: Callable[[str], None] = print, jobs: int | None = None) -> Path:
    """Build (if needed) and return the engine directory. Raises ToolsMissing or EngineError."""
    target = engine_dir()
    if (target / LIBRARY).exists():
        progress(f"the fast engine is already built in {target}")
        return target
    missing = missing_tools()
    if missing:
        raise ToolsMissing(f"cannot build the fast engine without {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conode-engine-") as tmp:
        work = Path(tmp)
        log = target.parent / f"{target.name}.build.log"
        log.write_text("")
        progress(f"downloading the unicorn {UNICORN_VERSION} sources from PyPI")
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--disable-pip-version-check", "-d", str(work), f"unicorn=={UNICORN_VERSION}"], work,
             "downloading the unicorn sdist", log)
        archives = list(work.glob("unicorn-*.tar.gz"))
        if not archives:
            raise EngineError("pip downloaded no unicorn sdist")
        with tarfile.open(archives[0]) as archive:
            archive.extractall(work, filter="data")
        source = work / f"unicorn-{UNICORN_VERSION}"
        for name, data in patch_files():
            progress(f"applying {name}")
            patch = work / name
            patch.write_bytes(data)
            _apply_patch(patch, source, log)
        build = source / "src" / "build"
        progress("configuring (x86 only)")
        _run(["cmake", "-S", str(source / "src"), "-B", str(build), "-DUNICORN_ARCH=x86", "-DCMAKE_BUILD_TYPE=Release",
              "-DUNICORN_BUILD_TESTS=OFF", "-DUNICORN_INSTALL=OFF"], source, "configuring the engine", log)
        progress("compiling (about a minute on two cores)")
        _run(["cmake", "--build", str(build), "--target", "unicorn", "-j", str(jobs or os.cpu_count() or 2)], source,
             "compiling the engine", log)
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        shutil.copy2(build / LIBRARY, staging / LIBRARY)
        (staging / "BUILDINFO").write_text(
            f"unicorn {UNICORN_VERSION} from PyPI, x86 only\npatches: {', '.join(n for n, _ in patch_files())}\n")
        _check(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # atomic: a half-built engine is never picked up
    progress(f"the fast engine is built in {target}")
    return target


def _check(directory: Path) -> None:
    """Load the new library through the stock binding, in a fresh process, and find conode's entry points."""
    env = {**os.environ, "LIBUNICORN_PATH": str(directory), "CONODE_ENGINE_SELECTED": "1"}
    probe = ("import unicorn; from unicorn.unicorn_py3.unicorn import uclib; "
             "assert hasattr(uclib, 'uc_conode_native_interrupts'); print(unicorn.__version__)")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise EngineError(f"the built engine does not load: {result.stderr.strip()[-500:]}")
