# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared machinery of the benchmarks: the four ways of running the guest's work, markers, the table.

Every benchmark runs the same kernel and initramfs (the ones conode ships) in four places:

* **conode fast** and **conode stock**: conode on each of its two CPU engines (the patched Unicorn that
  ``conode engine build`` builds, and the stock Unicorn wheel with conode's Python passage). The engine is
  chosen when ``conode.vm`` is first imported, from ``CONODE_ENGINE``, so a process measures one engine only:
  every conode measurement runs in a child process (:func:`run_child`) with ``CONODE_ENGINE`` set. A child
  boots a :class:`conode.vm.session.GuestSession` (boot, ``start(argv)``, ``run()``); the command's stdout
  goes to a :class:`MarkerStream`, which timestamps marker lines as they arrive, and the stream comes back
  to the parent as JSON (:func:`run_conode`; ``python3 common.py --child SCRIPT`` is that child);
* **qemu-system-i386** (TCG), driven through the busybox shell that the in-guest agent starts on the serial
  port when there is no host channel (``conode.shell=1``): commands go in on qemu's stdin, their output comes
  back on its stdout and goes through the same :class:`MarkerStream`;
* **native**: the guest's own busybox (a static i386 binary, Debian's busybox-static:i386) run on the host.

Timed regions are delimited by marker lines that the shell in the guest prints (``echo @@bench:NAME.start``
... ``echo @@bench:NAME.end``); the time between them is host wall time, measured where the bytes arrive.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
SETUP_HINT = "run `bash benchmarks/setup.sh` (as root) to install qemu-system-i386 and busybox-static:i386"
DEFAULT_MEM_MIB = 128
GUEST_BUSYBOX = "/bin/busybox"
GUEST_TMP = "/tmp"

# conode's CPU engines, in the order of the table's columns (see conode/vm/cpu/engine).
ENGINES = ("fast", "stock")
PLACES = (*ENGINES, "qemu", "native")  # everywhere a workload can run
NOT_BUILT = "not built"
BUILD_HINT = "build it with `conode engine build` (about half a minute; needs cmake and a C compiler)"
# What would make a child run another engine than the one asked for: an explicit library, the marker of an
# inherited choice (conode.vm sets both when it picks the fast engine), or the fast engine's Python passage.
_ENGINE_OVERRIDES = ("LIBUNICORN_PATH", "CONODE_ENGINE_SELECTED", "CONODE_PASSAGE")


# --- progress -----------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (fraction in [0, 1])."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[rank]


# --- the guest image and the references ---------------------------------------------------------------------
def image_paths() -> tuple[Path, Path]:
    """The packaged kernel and initramfs: what conode boots, and what qemu is given."""
    from conode.vm.guest_image import INITRD_NAME, KERNEL_NAME, packaged_image_dir

    directory = packaged_image_dir()
    return directory / KERNEL_NAME, directory / INITRD_NAME


def find_qemu() -> str | None:
    return shutil.which("qemu-system-i386")


def find_busybox() -> str | None:
    """The busybox binary installed by Debian's busybox-static:i386 (the guest's busybox, run natively)."""
    try:
        listing = subprocess.run(["dpkg", "-L", "busybox-static"], capture_output=True, text=True,
                                 check=False)
    except OSError:
        return None
    for line in listing.stdout.splitlines():
        path = line.strip()
        if path.endswith("/bin/busybox") and os.access(path, os.X_OK):
            return path
    return None


# --- conode's engines -----------------------------------------------------------------------------------
def engine_env(engine: str) -> dict[str, str]:
    """The environment of a child process that must run conode on *engine* ("fast" or "stock").

    The cache directory is pinned to this process's (it holds the fast engine and the native slicer), so a
    child with another HOME still finds them.
    """
    from conode.cache import cache_dir

    env = {key: value for key, value in os.environ.items() if key not in _ENGINE_OVERRIDES}
    env["CONODE_ENGINE"] = engine
    env["CONODE_CACHE_DIR"] = str(cache_dir())
    return env


@functools.cache
def engine_report(engine: str) -> tuple[bool, str]:
    """(whether *engine* runs on this host, what `conode engine` says under CONODE_ENGINE=engine)."""
    try:
        result = subprocess.run([sys.executable, "-m", "conode.cli", "engine"], capture_output=True,
                                text=True, timeout=120, check=False, env=engine_env(engine))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`conode engine` failed: {exc}"
    text = "; ".join(" ".join(line.split()) for line in (result.stdout + result.stderr).splitlines())
    expected = {"fast": "conode's fast engine", "stock": "stock Unicorn"}[engine]
    return result.returncode == 0 and expected in text, text or "unknown"


def pool_engine() -> str:
    """The engine a benchmark's pool runs: CONODE_ENGINE, else the fast one if it runs here; set in this process's
    environment, which the agents and their workers inherit."""
    engine = os.environ.get("CONODE_ENGINE") or ("fast" if engine_runs("fast") else "stock")
    os.environ["CONODE_ENGINE"] = engine
    return engine


def engine_runs(engine: str) -> bool:
    return engine_report(engine)[0]


def conode_engines() -> list[str]:
    """The engines this host can measure (stock always; fast once built); says so when fast is not."""
    engines = [engine for engine in ENGINES if engine_runs(engine)]
    if "fast" not in engines:
        progress(f"the fast engine is not built here: {BUILD_HINT}; its column shows '{NOT_BUILT}'")
    return engines


def by_engine(figure: Callable[[str], "Value"]) -> dict[str, "Value"]:
    """A row's conode cells: figure(engine) for each engine that runs here, "not built" for the others."""
    return {engine: figure(engine) if engine_runs(engine) else NOT_BUILT for engine in ENGINES}


def engine_notes() -> list[str]:
    """Table notes about the engines: how to build the fast one when it is missing."""
    notes = []
    if not engine_runs("fast"):
        notes.append(f"conode fast: {NOT_BUILT} on this host — {BUILD_HINT}, then run the benchmark again")
    return notes


def conode_label() -> str:
    """"conode fast" or "conode stock": the engine this process runs (for progress lines)."""
    from conode.vm import ENGINE

    return f"conode {ENGINE.name}"


@dataclass(frozen=True)
class References:
    qemu: str | None
    busybox: str | None

    @classmethod
    def find(cls) -> "References":
        refs = cls(find_qemu(), find_busybox())
        if refs.qemu is None:
            progress("qemu-system-i386 not found: conode's figures only")
        if refs.busybox is None:
            progress("busybox-static not found: no native figures")
        return refs


# --- markers ------------------------------------------------------------------------------------------------
MARK_PREFIX = "@@bench:"


def mark(name: str, stamp: bool = False) -> str:
    """Shell code printing the marker line for *name*.

    With *stamp*, the line carries the shell's own clock ($EPOCHREALTIME, microseconds, busybox ash) and that
    is the marker's time. Natively the work is so fast that both markers often arrive in one read; in an
    emulated guest the guest clock is coarse (10 ms jiffies), so there the arrival time on the host counts.
    """
    return f"echo {MARK_PREFIX}{name}" + (" $EPOCHREALTIME" if stamp else "")


def marked(name: str, command: str, stamp: bool = False) -> str:
    """*command* between the markers NAME.start and NAME.end (one shell line)."""
    return f"{mark(name + '.start', stamp)}; {command}; {mark(name + '.end', stamp)}"


class MarkerStream:
    """A binary file-like sink that timestamps marker lines (time.monotonic()) as they arrive.

    A marker counts only as a whole line (a terminal's echo of the command that prints it never matches).
    *on_marker* is called with each marker's name at the moment it is seen. With *cpu_clock* (the CPU seconds
    the emulator has used, all its threads), each marker also records that: on a shared host the CPU time a
    region cost is steadier than its wall time, which waits whenever other processes hold the cores.
    """

    def __init__(self, on_marker: Callable[[str], None] | None = None, announce: str | None = None,
                 cpu_clock: Callable[[], float] | None = None) -> None:
        self.announce = announce  # when set, each finished span is reported on stderr under this label
        self.data = bytearray()
        self.times: dict[str, float] = {}
        self.cpu_times: dict[str, float] = {}
        self._cpu_clock = cpu_clock
        self.offsets: dict[str, tuple[int, int]] = {}  # marker -> (start, end) of its line in data
        self.first_byte_at: float | None = None
        self._line_start = 0
        self._on_marker = on_marker

    def write(self, data: bytes) -> int:
        now = time.monotonic()
        if data and self.first_byte_at is None:
            self.first_byte_at = now
        buf = self.data
        buf += data
        while True:
            newline = buf.find(b"\n", self._line_start)
            if newline < 0:
                break
            line = buf[self._line_start:newline].decode(errors="replace").strip()
            start, self._line_start = self._line_start, newline + 1
            if line.startswith(MARK_PREFIX):
                name, _, stamp = line[len(MARK_PREFIX):].partition(" ")
                if name not in self.times:
                    # A stamped marker: the shell's wall clock, brought onto time.monotonic().
                    self.times[name] = float(stamp) - (time.time() - time.monotonic()) if stamp else now
                    if self._cpu_clock is not None:
                        self.cpu_times[name] = self._cpu_clock()
                    self.offsets[name] = (start, newline + 1)
                    if self._on_marker is not None:
                        self._on_marker(name)
                    if self.announce and name.endswith(".end") and name[:-4] + ".start" in self.times:
                        progress(f"{self.announce}: {name[:-4]} took {self.span(name[:-4]):.3f} s")
        return len(data)

    def flush(self) -> None:
        pass

    def span(self, name: str) -> float:
        """Seconds between NAME.start and NAME.end."""
        try:
            return self.times[name + ".end"] - self.times[name + ".start"]
        except KeyError as exc:
            raise BenchmarkError(f"marker {exc.args[0]} never arrived; "
                                 f"output tail: {self.tail()!r}") from None

    def cpu_span(self, name: str) -> float:
        """CPU seconds the emulator used between NAME.start and NAME.end (with a cpu_clock only)."""
        try:
            return self.cpu_times[name + ".end"] - self.cpu_times[name + ".start"]
        except KeyError as exc:
            raise BenchmarkError(f"no CPU time for marker {exc.args[0]}") from None

    def between(self, name: str) -> str:
        """The text printed between NAME.start and NAME.end (carriage returns removed)."""
        start = self.offsets[name + ".start"][1]
        end = self.offsets[name + ".end"][0]
        return self.data[start:end].decode(errors="replace").replace("\r", "")

    def tail(self, size: int = 400) -> str:
        return self.data[-size:].decode(errors="replace")

    def to_json(self) -> dict:
        """The stream as JSON (for a child process to hand it back): bytes as latin-1, times, offsets."""
        return {"data": self.data.decode("latin-1"), "times": self.times, "cpu_times": self.cpu_times,
                "offsets": {name: list(span) for name, span in self.offsets.items()},
                "first_byte_at": self.first_byte_at}

    @classmethod
    def from_json(cls, document: dict) -> "MarkerStream":
        stream = cls()
        stream.data = bytearray(document["data"].encode("latin-1"))
        stream.times = {name: float(at) for name, at in document["times"].items()}
        stream.cpu_times = {name: float(at) for name, at in document.get("cpu_times", {}).items()}
        stream.offsets = {name: (int(a), int(b)) for name, (a, b) in document["offsets"].items()}
        stream.first_byte_at = document["first_byte_at"]
        stream._line_start = len(stream.data)
        return stream


class Discard:
    """A binary sink that drops everything (a guest's stderr we do not need)."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


class BenchmarkError(Exception):
    """A benchmark could not measure what it set out to (message for a person)."""


# --- conode ---------------------------------------------------------------------------------------------
# These run in a child process whose engine was set by its parent (run_child, run_conode).
def conode_boot(stdout: object, stderr: object | None = None, mem_mib: int = DEFAULT_MEM_MIB,
                on_progress: Callable[[str], None] | None = None, initrd: Path | None = None) -> object:
    """Boot a GuestSession on the packaged image, or the packaged kernel with *initrd* (stdout/stderr: binary
    sinks). Returns the session."""
    from conode.vm.guest_image import load_guest_image
    from conode.vm.machine import MachineConfig
    from conode.vm.session import GuestSession

    label = conode_label()

    def show(line: str) -> None:
        progress(f"{label}: {line}")
        if on_progress is not None:
            on_progress(line)

    image = load_guest_image(None, initrd)
    return GuestSession.boot(image, MachineConfig(mem_mib=mem_mib), stdout, stderr or Discard(), show)


def conode_run_script(script: str, timeout_s: float = 3600.0,
                      on_marker: Callable[[str], None] | None = None,
                      initrd: Path | None = None) -> tuple[MarkerStream, object]:
    """Boot conode in this process (with *initrd* instead of the packaged initramfs when given), run
    ``sh -c script`` in it, return the stdout stream and the session."""
    stream = MarkerStream(on_marker, announce=conode_label(), cpu_clock=time.process_time)
    errors = MarkerStream()
    session = conode_boot(stream, errors, initrd=initrd)
    session.start(["sh", "-c", script])  # type: ignore[attr-defined]
    status = session.run(timeout_s=timeout_s)  # type: ignore[attr-defined]
    if status != 0:
        raise BenchmarkError(f"the conode guest command exited with status {status}; "
                             f"stderr tail: {errors.tail()!r}")
    return stream, session


def run_conode(engine: str, script: str, timeout_s: float = 3600.0, initrd: Path | None = None) -> MarkerStream:
    """Run ``sh -c script`` in a conode guest on *engine* (booted with *initrd* when given), in a child
    process; return its stdout stream."""
    _, result = run_child(Path(__file__), [script, *([str(initrd)] if initrd else [])], engine=engine,
                          timeout_s=timeout_s + 120)
    return MarkerStream.from_json(result["stream"])


def _script_child(argv: Sequence[str]) -> int:
    """``python3 common.py --child SCRIPT [INITRD]``: the child of run_conode."""
    stream, _ = conode_run_script(argv[0], initrd=Path(argv[1]) if len(argv) > 1 else None)
    return child_emit({"stream": stream.to_json()})


# --- qemu-system-i386 ---------------------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QEMU_CPU = "qemu32"
# qemu32 with the instruction set conode's CPUID advertises (conode/vm/cpu/cpuid.py): software that picks its
# code by CPUID (OpenSSL, glibc's string functions) then runs the same code under both emulators.
QEMU_CPU_LIKE_CONODE = "qemu32,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+aes,+pclmulqdq"
QEMU_PROMPT = b"~ # "  # busybox ash's prompt for root in /root
QEMU_AGENT_LINE = b"coagent: cannot open /dev/hvc0"  # the agent gave up on the host channel


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz, measured against CLOCK_MONOTONIC over 0.2 s; None on a host other than x86-64.

    qemu's TCG guests read the host's own counter (RDTSC is the host's, offset), and the guest kernel cannot
    calibrate it (no HPET or PM timer in conode's kernel, and the PIT method fails under TCG), so it is told this
    rate, as conode's guests are told theirs.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    import ctypes
    import mmap

    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(bytes.fromhex("0f31" "48c1e220" "4809d0" "c3"))  # rdtsc; shl $32,%rdx; or %rdx,%rax; ret
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    start_ns, start = time.monotonic_ns(), rdtsc()
    time.sleep(0.2)
    end_ns, end = time.monotonic_ns(), rdtsc()
    return round((end - start) * 1_000_000 / (end_ns - start_ns))


def qemu_append() -> str:
    """The kernel command line for qemu: conode's own (``BASE_CMDLINE``: the clocksource, devices, TCP buffers)
    with the TSC rate of qemu's guests (the host's: :func:`host_tsc_khz`), plus quiet and the serial shell.
    Where the host's rate is not known, qemu's guests keep time with the PIT instead."""
    from conode.vm.clock import TSC_HZ
    from conode.vm.guest_image import BASE_CMDLINE

    stated = f"tsc_early_khz={TSC_HZ // 1000}"
    assert stated in BASE_CMDLINE and "clocksource=tsc" in BASE_CMDLINE
    khz = host_tsc_khz()
    cmdline = (BASE_CMDLINE.replace(stated, f"tsc_early_khz={khz}") if khz
               else BASE_CMDLINE.replace("clocksource=tsc", "clocksource=pit"))
    return f"{cmdline} quiet conode.shell=1"


class QemuGuest:
    """qemu-system-i386 on the same kernel and initramfs, driven through the serial shell."""

    def __init__(self, qemu: str, mem_mib: int = DEFAULT_MEM_MIB, initrd: Path | None = None,
                 cpu: str = QEMU_CPU, extra_args: Sequence[str] = (), append: str = "", niceness: int = 0) -> None:
        """*extra_args* go to qemu (devices), *append* to the kernel's command line; *niceness* is qemu's (all
        its threads)."""
        from conode.vm.guest_image import inflate_initramfs

        kernel, packaged_initrd = image_paths()
        initrd = initrd or packaged_initrd
        # The very bytes conode's guest receives: the archive inflated on the host, so neither guest spends its
        # boot inflating it in emulated code.
        self.initrd = tempfile.NamedTemporaryFile(prefix="conode-bench-initrd-", suffix=".cpio")
        self.initrd.write(inflate_initramfs(initrd.read_bytes(), str(initrd)))
        self.initrd.flush()
        self.argv = [
            *(["nice", "-n", str(niceness)] if niceness else []), qemu, "-machine", "pc", "-accel", "tcg", "-cpu", cpu, "-m", str(mem_mib),
            "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", str(kernel), "-initrd", self.initrd.name, "-append", f"{qemu_append()} {append}".strip(),
            *extra_args,
        ]
        self.out = MarkerStream(announce="qemu", cpu_clock=self.cpu_seconds)
        self.prompt = QEMU_PROMPT  # the shell's prompt (another userland's shell has another)
        self.proc: subprocess.Popen | None = None
        self.launched_at = 0.0
        self._errors = tempfile.TemporaryFile()
        self._prompt_from = 0

    def __enter__(self) -> "QemuGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def launch(self) -> float:
        """Start qemu; return the launch time (time.monotonic())."""
        self.launched_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._errors, bufsize=0)
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]
        return self.launched_at

    def cpu_seconds(self) -> float:
        """The CPU time qemu has used, all its threads (user + system, from /proc/PID/stat)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15)

    def _pump(self, timeout: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            return
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._errors.seek(0)
            err = self._errors.read().decode(errors="replace").strip()
            raise BenchmarkError(f"qemu-system-i386 exited (status {self.proc.wait()}): {err[-400:]}; "
                                 f"output tail: {self.out.tail()!r}")
        self.out.write(chunk)

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str) -> float:
        """Read qemu's output until done() holds; return the time it first held."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchmarkError(f"qemu: no {what} within {timeout:g} s; "
                                     f"output tail: {self.out.tail()!r}")
            self._pump(min(left, 1.0))
        return time.monotonic()

    def wait_for_bytes(self, pattern: bytes, timeout: float, start: int = 0) -> tuple[float, int]:
        """Wait for *pattern* in the output at or after offset *start*; return (time, offset past it)."""
        found = -1

        def seen() -> bool:
            nonlocal found
            found = self.out.data.find(pattern, start)
            return found >= 0

        at = self.wait_until(seen, timeout, repr(pattern.decode(errors="replace")))
        return at, found + len(pattern)

    def wait_prompt(self, timeout: float = 300.0) -> float:
        """Wait for the shell prompt that follows everything seen so far."""
        at, self._prompt_from = self.wait_for_bytes(self.prompt, timeout, self._prompt_from)
        return at

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def run_marked(self, name: str, command: str, timeout: float = 1800.0) -> float:
        """Run *command* at the prompt between markers; return the seconds between them."""
        self.send(marked(name, command))
        self.wait_until(lambda: name + ".end" in self.out.times, timeout, f"end marker of {name}")
        self._prompt_from = self.out.offsets[name + ".end"][1]
        self.wait_prompt(timeout)
        return self.out.span(name)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._errors.close()
        self.initrd.close()


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def qemu_boot(qemu: str, timeout: float = 300.0, initrd: Path | None = None, cpu: str = QEMU_CPU) -> QemuGuest:
    """Launch qemu (with *initrd* instead of the packaged initramfs when given, and CPU model *cpu*) and wait
    for the shell prompt; the caller closes it."""
    guest = QemuGuest(qemu, initrd=initrd, cpu=cpu)
    try:
        guest.launch()
        guest.wait_prompt(timeout)
    except BaseException:
        guest.close()
        raise
    return guest


# --- native ------------------------------------------------------------------------------------------------
class NativeDir:
    """A scratch directory for native runs; its ``true`` links to busybox (as /bin/true does in the guest)."""

    def __init__(self, busybox: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="conode-bench-")
        self.path = self._tmp.name
        self.true = os.path.join(self.path, "true")
        os.symlink(busybox, self.true)

    def __enter__(self) -> "NativeDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def native_run_script(busybox: str, script: str, cwd: str, timeout_s: float = 3600.0) -> MarkerStream:
    """Run ``busybox sh -c script`` on the host, streaming its stdout through a MarkerStream.

    The script's markers should be stamped (see :func:`mark`).
    """
    env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "LC_ALL": "C"}
    proc = subprocess.Popen([busybox, "sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=cwd, env=env, bufsize=0)
    assert proc.stdout is not None
    stream = MarkerStream(announce="native")
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise BenchmarkError(f"native busybox run did not finish within {timeout_s:g} s")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            stream.write(chunk)
    status = proc.wait()
    if status != 0:
        raise BenchmarkError(f"native busybox run exited with status {status}; "
                             f"output tail: {stream.tail()!r}")
    return stream


# --- the guest workloads (shared by workloads.py and traps.py) ---------------------------------------------
@dataclass(frozen=True)
class Sizes:
    loop: int  # sh loop iterations
    data: int  # bytes hashed and compressed
    forks: int  # fork+exec of /bin/true
    dd: int  # dd bs=1 count (2 syscalls per byte)

    @classmethod
    def for_run(cls, quick: bool) -> "Sizes":
        if quick:
            return cls(loop=2000, data=256 << 10, forks=20, dd=2000)
        return cls(loop=20000, data=4 << 20, forks=200, dd=20000)


@dataclass(frozen=True)
class Workload:
    name: str  # marker name
    metric: str  # table label
    command: str  # shell code; {tmp} is the scratch directory, {true} the path of busybox's true
    unit: str
    per_second: float  # the figure is elapsed seconds * per_second

    def figure(self, seconds: float) -> float:
        return seconds * self.per_second

    def shell(self, tmp: str, true: str) -> str:
        return self.command.format(tmp=tmp, true=true)


def _size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 and size % (1 << 20) == 0 else f"{size >> 10} KiB"


def workloads(sizes: Sizes) -> list[Workload]:
    data = _size_label(sizes.data)
    return [
        Workload("loop", f"sh loop, {sizes.loop} iterations",
                 f"i=0; while [ $i -lt {sizes.loop} ]; do i=$((i+1)); done", "s", 1.0),
        Workload("sha256", f"sha256sum, {data}", "sha256sum {tmp}/d >/dev/null", "s", 1.0),
        Workload("gzip", f"gzip -c, {data}", "gzip -c {tmp}/d >/dev/null", "s", 1.0),
        Workload("fork", f"fork+exec /bin/true ({sizes.forks}x), per call",
                 f"n=0; while [ $n -lt {sizes.forks} ]; do {{true}}; n=$((n+1)); done", "ms",
                 1e3 / sizes.forks),
        Workload("dd", f"dd bs=1 count={sizes.dd}, per syscall",
                 f"dd if=/dev/zero of=/dev/null bs=1 count={sizes.dd} 2>/dev/null", "µs",
                 1e6 / (2 * sizes.dd)),
    ]


def data_setup(sizes: Sizes, tmp: str, busybox: str) -> str:
    """Create the data file: the busybox binary repeated (the same bytes in the guest and on the host)."""
    copies = " ".join([busybox] * 3)  # 3 x 2 MB covers 4 MiB
    return f"cat {copies} | head -c {sizes.data} > {tmp}/d"


def data_check(tmp: str) -> str:
    """Prints what must agree across conode, qemu and native: the data's hash and its compressed size."""
    return f"sha256sum < {tmp}/d; gzip -c {tmp}/d | wc -c"


def workload_steps(chosen: Iterable[Workload], sizes: Sizes, reps: int, tmp: str, true: str,
                   busybox: str, with_data: bool = True) -> list[tuple[str, str]]:
    """(marker name, shell command) of a run: data setup, each workload *reps* times, the check."""
    steps = []
    if with_data:
        steps.append(("setup", data_setup(sizes, tmp, busybox)))
    for rep in range(reps):
        for work in chosen:
            steps.append((f"{work.name}.{rep}", work.shell(tmp, true)))
    if with_data:
        steps.append(("check", data_check(tmp)))
    return steps


def as_script(steps: Iterable[tuple[str, str]], stamp: bool = False) -> str:
    """The steps as one shell script, each between its markers."""
    return "\n".join(marked(name, command, stamp) for name, command in steps)


StepMaker = Callable[[str, str, str], list[tuple[str, str]]]  # (tmp, true, busybox) -> steps


def run_on(place: str, make_steps: StepMaker, refs: References, initrd: Path | None = None,
           qemu_cpu: str = QEMU_CPU) -> MarkerStream:
    """Run the steps *make_steps* gives for *place*'s paths on "fast", "stock", "qemu" or "native".

    Returns the stream holding the markers. In the guest (conode on either engine, qemu with CPU model
    *qemu_cpu*; booted with *initrd* when given) the scratch directory is /tmp and true is /bin/true; natively
    they are a fresh directory and a link to the busybox binary.
    """
    if place in ENGINES:
        steps = make_steps(GUEST_TMP, "/bin/true", GUEST_BUSYBOX)
        progress(f"conode {place}: booting in a child process")
        return run_conode(place, as_script(steps), initrd=initrd)
    if place == "qemu":
        assert refs.qemu is not None
        steps = make_steps(GUEST_TMP, "/bin/true", GUEST_BUSYBOX)
        progress("qemu: booting")
        with qemu_boot(refs.qemu, initrd=initrd, cpu=qemu_cpu) as guest:
            for name, command in steps:
                guest.run_marked(name, command)
            return guest.out
    if place == "native":
        assert refs.busybox is not None
        with NativeDir(refs.busybox) as scratch:
            steps = make_steps(scratch.path, scratch.true, refs.busybox)
            return native_run_script(refs.busybox, as_script(steps, stamp=True), cwd=scratch.path)
    raise ValueError(place)


def available_places(refs: References) -> list[str]:
    """Where workloads can run here: the engines that run, then the references that are installed."""
    places = conode_engines()
    if refs.qemu is not None:
        places.append("qemu")
    if refs.busybox is not None:
        places.append("native")
    return places


def place_label(place: str) -> str:
    """How progress lines and notes name *place*: "conode fast", "conode stock", "qemu", "native"."""
    return f"conode {place}" if place in ENGINES else place


def place_cell(place: str) -> str:
    """What a column shows when *place* could not run here."""
    return NOT_BUILT if place in ENGINES else "missing"


def place_figures(streams: dict[str, MarkerStream], work: Workload, reps: int) -> dict[str, "Value"]:
    """*work*'s figure in every place (median over its *reps* runs), or why a place has none."""
    figures: dict[str, Value] = {}
    for place in PLACES:
        if place in streams:
            seconds = median([streams[place].span(f"{work.name}.{rep}") for rep in range(reps)])
            figures[place] = work.figure(seconds)
        else:
            figures[place] = place_cell(place)
    return figures


def normalise_check(text: str) -> str:
    return " ".join(text.replace("-", " ").split())


# --- child processes (cold starts, one engine each) --------------------------------------------------------
def run_child(script: Path, args: Sequence[str], engine: str | None = None,
              timeout_s: float = 600.0) -> tuple[float, dict]:
    """Run ``python3 script --child args...``; return (launch time, the JSON object it printed last).

    With *engine*, the child runs conode on that engine (CONODE_ENGINE set before it imports conode.vm) and
    must say so (:func:`child_emit`).
    """
    launched = time.monotonic()
    env = engine_env(engine) if engine is not None else None
    try:
        result = subprocess.run([sys.executable, str(script), "--child", *args], stdout=subprocess.PIPE,
                                timeout=timeout_s, check=False, env=env)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"{script.name} child ({engine or 'no engine'}) did not finish within "
                             f"{timeout_s:g} s") from None
    lines = result.stdout.decode(errors="replace").strip().splitlines()
    if result.returncode != 0 or not lines:
        raise BenchmarkError(f"{script.name} child ({engine or 'no engine'}) failed with status "
                             f"{result.returncode}")
    document = json.loads(lines[-1])
    if engine is not None and document.get("engine") != engine:
        raise BenchmarkError(f"{script.name} child asked for the {engine} engine ran on "
                             f"{document.get('engine')!r}")
    return launched, document


def child_emit(result: dict) -> int:
    """A child's last act: print *result* as one JSON line on stdout, with the engine it ran on."""
    from conode.vm import ENGINE

    print(json.dumps({**result, "engine": ENGINE.name}), flush=True)
    return 0


# --- the table ----------------------------------------------------------------------------------------------
Value = float | str | None


@dataclass(frozen=True)
class Target:
    """A goal as printed, and how the table judges it: each engine's figure ≤ its limit.

    With *relative*, the limits are multiples of qemu's figure (and need one). Only the engines in *limits*
    are judged (a target for native delivery says nothing about the Python passage).
    """

    text: str
    limits: dict[str, float]
    relative: bool = False

    @classmethod
    def at_most(cls, text: str, limit: float, relative: bool = False,
                engines: Sequence[str] = ENGINES) -> "Target":
        return cls(text, {engine: limit for engine in engines}, relative)

    def met(self, row: "Row") -> dict[str, bool]:
        verdicts = {}
        for engine, limit in self.limits.items():
            value = row.conode.get(engine)
            if not isinstance(value, (int, float)):
                continue
            if self.relative:
                if not isinstance(row.qemu, (int, float)) or not row.qemu:
                    continue
                limit *= row.qemu
            verdicts[engine] = value <= limit
        return verdicts

    def cell(self, row: "Row") -> str:
        verdicts = self.met(row)
        judged = " ".join(f"{engine} {'✓' if ok else '✗'}" for engine, ok in verdicts.items())
        return f"{self.text}: {judged}" if judged else self.text


@dataclass
class Row:
    metric: str
    unit: str
    conode: dict[str, Value]  # engine ("fast", "stock") -> figure; see by_engine
    qemu: Value = None
    native: Value = None
    target: str | Target = ""

    def ratio(self, engine: str = "fast") -> float | None:
        """conode's figure on *engine* over qemu's (times: above 1 means conode is slower)."""
        value = self.conode.get(engine)
        if isinstance(value, (int, float)) and isinstance(self.qemu, (int, float)) and self.qemu:
            return value / self.qemu
        return None

    @classmethod
    def across(cls, metric: str, unit: str, figures: dict[str, Value], target: str | Target = "") -> "Row":
        """A row from figures by place (fast, stock, qemu, native), as place_figures gives them."""
        return cls(metric, unit, {engine: figures[engine] for engine in ENGINES}, figures["qemu"],
                   figures["native"], target)

    def target_text(self) -> str:
        return self.target.cell(self) if isinstance(self.target, Target) else self.target

    def to_json(self) -> dict:
        target = self.target
        return {"metric": self.metric, "unit": self.unit, "conode": dict(self.conode), "qemu": self.qemu,
                "native": self.native, **{f"ratio_{engine}_qemu": self.ratio(engine) for engine in ENGINES},
                "target": target.text if isinstance(target, Target) else target,
                "target_met": target.met(self) if isinstance(target, Target) else None}


def fmt(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(value: Value, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{fmt(value)} {unit}".strip()


HEADERS = ("metric", "conode fast", "conode stock", "qemu-system-i386", "native", "ratio fast/qemu", "target")


def format_table(title: str, rows: Sequence[Row]) -> str:
    def ratio(row: Row) -> str:
        value = row.ratio("fast")
        return f"{value:.2f}" if value is not None else "—"

    body = [
        (r.metric, *(_cell(r.conode.get(engine), r.unit) for engine in ENGINES), _cell(r.qemu, r.unit),
         _cell(r.native, r.unit), ratio(r), r.target_text())
        for r in rows
    ]
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(HEADERS)]
    right = (False, True, True, True, True, True, False)

    def render(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, "=" * len(title), render(HEADERS), rule, *(render(line) for line in body)])


def host_info(refs: References | None = None) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "conode_source": _source_state(),
        "guest_image": _image_build(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "conode_engines": {engine: engine_report(engine)[1] for engine in ENGINES},
    }
    if refs is not None:
        info["qemu"] = qemu_version(refs.qemu) if refs.qemu else None
        info["busybox"] = refs.busybox
    return info


def _source_state() -> str:
    """The commit the benchmarks ran on, and whether conode's sources differed from it."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(BENCH_DIR.parent), *argv], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("diff", "--stat", "HEAD", "--", "conode")
    return f"{head} with uncommitted changes in conode/" if changed else head


def _image_build() -> str:
    """The guest image's build line (conode/vm/images/BUILDINFO), to tell rebuilt images apart."""
    kernel, _ = image_paths()
    try:
        lines = (kernel.parent / "BUILDINFO").read_text().splitlines()
    except OSError:
        return "unknown"
    return "; ".join(line for line in lines if line.startswith(("kernel:", "built:"))) or "unknown"


def parser(description: str | None) -> argparse.ArgumentParser:
    summary = description.strip().splitlines()[0] if description else None
    p = argparse.ArgumentParser(description=summary)
    p.add_argument("--quick", action="store_true", help="small sizes and few repetitions (for development)")
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the figures to FILE as JSON")
    return p


def report(name: str, title: str, args: argparse.Namespace, rows: Sequence[Row], notes: Sequence[str],
           refs: References | None, extra: dict | None = None) -> int:
    """Print the table (stdout), write --json, and return the exit status.

    The status is 2 when a column could not be measured: a reference is missing (*refs*; None when the
    benchmark has none) or the fast engine is not built.
    """
    notes = [*notes, *engine_notes()]
    if any(isinstance(row.target, Target) for row in rows):
        notes.append("target column: ✓ met, ✗ missed, for each engine the target applies to")
    print(format_table(title, rows))
    for note in notes:
        print(f"  {note}")
    print(flush=True)
    if args.json is not None:
        document = {
            "benchmark": name,
            "quick": bool(args.quick),
            "host": host_info(refs),
            "rows": [row.to_json() for row in rows],
            "notes": list(notes),
            **(extra or {}),
        }
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        progress(f"figures written to {args.json}")
    status = 0
    if refs is not None:
        missing = [what for what, path in (("qemu-system-i386", refs.qemu), ("busybox-static", refs.busybox))
                   if path is None]
        if missing:
            print(f"{name}: error: {' and '.join(missing)} not found; {SETUP_HINT}", file=sys.stderr)
            status = 2
    if not engine_runs("fast"):
        print(f"{name}: error: the fast engine is not built; {BUILD_HINT}", file=sys.stderr)
        status = 2
    return status


def run_main(main: Callable[[], int]) -> None:
    """A benchmark's entry point: its exit status, or one clear line (no traceback) when it cannot measure."""
    from conode.errors import ConodeError

    name = Path(sys.argv[0]).stem
    try:
        status = main()
    except (BenchmarkError, ConodeError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        status = 130
    sys.exit(status)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--child"]:
        sys.exit("common.py is a library; as a script it only runs a conode child: common.py --child SCRIPT")
    run_main(lambda: _script_child(sys.argv[2:]))
