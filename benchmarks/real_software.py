#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Real software: Debian's own i386 programs in conode (both engines), in qemu-system-i386 and natively.

xz, bzip2, zstd, openssl's digests, bc, gawk (a numeric table through libm) and python3 (pure-Python work),
as Debian builds them (``setup.sh`` fetches the packages and the libraries they load into one tree). The guest
is conode's own kernel and initramfs with the programs, their libraries and the input files appended to the
initramfs as a second cpio archive, under /opt/debian; the same combined initramfs boots qemu. Every program
runs through the tree's own dynamic loader (``ld-linux.so.2 --library-path ...``), in the guest and natively
alike, so all three run the very same bytes. Each program's output is compared byte for byte (its SHA-256 is
printed for every place; a difference is reported as a MISMATCH). Its time is taken between markers, as in
workloads.py, twice: the host's wall time, and the CPU time the emulator's process used (all its threads),
which on a shared host is the steadier of the two and the one the targets judge. Three rounds go through every
place, conode's fast engine and qemu at the same time (so that the host's load falls on both alike); the tables
give the medians, conode/qemu per program and the geometric mean of those ratios.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import stat
import struct
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import common
from common import Row, Target

FETCH_HINT = "run `bash benchmarks/setup.sh` (as root) to fetch Debian's i386 programs"
GUEST_ROOT = "/opt/debian"  # where the appended archive puts the tree in the guest
GUEST_DATA = "/opt/debian-data"  # and the input files
LIB_DIRS = ("lib/i386-linux-gnu", "usr/lib/i386-linux-gnu")
LOADER = "lib/ld-linux.so.2"
PYTHON_LIB = "usr/lib/python3.11"  # python3.11-minimal's standard library (only what -S needs is used)
TARGET = Target.at_most("≤ 1.25 × qemu", 1.25, relative=True, engines=("fast",))
MEAN_TARGET = 1.0
SIDE_BY_SIDE = ("fast", "qemu")  # run at the same time in each round
DEFAULT_PLACES = ("fast", "qemu", "native")
# Why the stock engine is left out unless asked for (--places stock): there the guest has no FPU, and the
# kernel emulates the x87 (gawk's and python3's floating point); the answers are the same, many times slower.
STOCK_NOTE = ("conode stock: not run by default (--places stock runs it): on the stock engine the guest has no "
              "FPU (nor SSE) and the kernel emulates the x87, so the programs run their generic code, slowly")
# (marker name, table label, binary in the tree, shell command). {run} starts a binary of the tree through its
# loader, {out} is the output file; the commands run in the input directory (so outputs name their inputs the
# same everywhere). The sizes keep each program to a few seconds under qemu's TCG on a 2020s x86 host.
PROGRAMS = (
    ("xz", "xz -6, 384 KiB of text", "usr/bin/xz", "{run}/usr/bin/xz -6 -c text384k > {out}"),
    ("bzip2", "bzip2 -9, 2 MiB of text", "bin/bzip2", "{run}/bin/bzip2 -9 -c text2m > {out}"),
    ("zstd", "zstd -19, 384 KiB of text", "usr/bin/zstd", "{run}/usr/bin/zstd -q -19 -c text384k > {out}"),
    ("zstd3", "zstd -3, 4 × 2 MiB of text", "usr/bin/zstd",
     "{run}/usr/bin/zstd -q -3 -c text2m text2m text2m text2m > {out}"),
    ("sha256", "openssl dgst -sha256, 8 × 2 MiB", "usr/bin/openssl",
     "{run}/usr/bin/openssl dgst -sha256 " + " ".join(["text2m"] * 8) + " > {out}"),
    ("sha512", "openssl dgst -sha512, 4 × 2 MiB", "usr/bin/openssl",
     "{run}/usr/bin/openssl dgst -sha512 " + " ".join(["text2m"] * 4) + " > {out}"),
    ("md5", "openssl dgst -md5, 8 × 2 MiB", "usr/bin/openssl",
     "{run}/usr/bin/openssl dgst -md5 " + " ".join(["text2m"] * 8) + " > {out}"),
    ("bc", "bc -l, π to 700 digits", "usr/bin/bc", "{run}/usr/bin/bc -l pi.bc < /dev/null > {out}"),
    ("gawk", "gawk, exp/log/sqrt/atan2 table, 20000 rows", "usr/bin/gawk",
     "{run}/usr/bin/gawk -f table.awk > {out}"),
    ("python3", "python3, pure-Python work", "usr/bin/python3.11",
     "PYTHONHASHSEED=0 {run}/usr/bin/python3.11 -S -B work.py > {out}"),
)
BC_PROGRAM = "scale=700\n4*a(1)\nquit\n"
AWK_PROGRAM = r"""BEGIN {
    for (i = 1; i <= 20000; i++) {
        x = i / 37
        printf "%d %.17g %.17g %.17g %.17g\n", i, exp(x / 50), log(x), sqrt(x), atan2(x, 3)
    }
}
"""
# Integers, strings, dicts, floats and classes; deterministic (hash seed fixed) and printed in full.
PYTHON_PROGRAM = r"""
def sieve(n):
    flags = bytearray([1]) * (n + 1)
    flags[0] = flags[1] = 0
    for i in range(2, int(n ** 0.5) + 1):
        if flags[i]:
            flags[i * i::i] = bytes(len(range(i * i, n + 1, i)))
    return [i for i, f in enumerate(flags) if f]

class Body:
    __slots__ = ("x", "v")
    def __init__(self, x, v):
        self.x, self.v = x, v

def simulate(steps):
    bodies = [Body(float(i), 0.0) for i in range(8)]
    for _ in range(steps):
        for a in bodies:
            force = 0.0
            for b in bodies:
                if a is not b:
                    d = b.x - a.x
                    force += d / (abs(d) ** 3 + 0.01)
            a.v += 0.001 * force
        for a in bodies:
            a.x += 0.001 * a.v
    return [repr(b.x) for b in bodies]

primes = sieve(200000)
print(len(primes), sum(primes), primes[-5:])
words = {}
for p in primes:
    key = format(p % 9973, "x")
    words[key] = words.get(key, 0) + len(str(p * p))
print(len(words), sorted(words.items())[:8])
print(" ".join(simulate(300)))
print(sum(int(str(i)[::-1]) for i in range(60000)))
"""


@dataclass(frozen=True)
class Paths:
    """Where a place finds the tree and the inputs, and where it writes outputs."""

    root: str
    data: str
    tmp: str

    def command(self, name: str, template: str) -> str:
        run = (f"{self.root}/{LOADER} --library-path "
               + ":".join(f"{self.root}/{d}" for d in LIB_DIRS) + f" {self.root}")
        # A subshell: qemu's serial shell is driven by its prompt, which shows the working directory.
        return f"(cd {self.data} && " + template.format(run=run, out=self.output(name)) + ")"

    def output(self, name: str) -> str:
        return f"{self.tmp}/{name}.out"


def debian_tree() -> Path | None:
    """The unpacked Debian packages setup.sh fetched, or None."""
    from conode.cache import cache_dir

    tree = cache_dir() / "debian-i386"
    return tree / "root" if (tree / ".complete").exists() else None


# --- the programs' files ----------------------------------------------------------------------------------
def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED names of a 32-bit little-endian ELF file (its dynamic section read through its sections)."""
    if data[:4] != b"\x7fELF" or data[4] != 1 or data[5] != 1:
        raise common.BenchmarkError("not a 32-bit little-endian ELF file")
    shoff, = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
    sections = [struct.unpack_from("<IIIIIIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize or 8):
            tag, value = struct.unpack_from("<iI", data, at)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value:end].decode())
    return needed


def program_files(tree: Path) -> list[str]:
    """Every file of the tree the programs need (paths relative to it): the binaries, the loader, the shared
    libraries they load (transitively, symlinks and their targets) and Python's standard library."""
    files: set[str] = set()
    pending = [LOADER] + [binary for _, _, binary, _ in PROGRAMS]
    while pending:
        relative = pending.pop()
        if relative in files:
            continue
        files.add(relative)
        path = tree / relative
        if path.is_symlink():  # followed inside the tree (its absolute links name the guest's paths)
            target = os.readlink(path)
            pending.append(os.path.normpath(target.lstrip("/") if target.startswith("/")
                                            else os.path.join(os.path.dirname(relative), target)))
            continue
        for name in elf_needed(path.read_bytes()):
            found = [f"{d}/{name}" for d in LIB_DIRS if (tree / d / name).exists()]
            if not found:
                raise common.BenchmarkError(f"{relative} needs {name}, which is not in {tree}; {FETCH_HINT}")
            pending.append(found[0])
    files.update(str(p.relative_to(tree)) for p in (tree / PYTHON_LIB).rglob("*") if "__pycache__" not in p.parts)
    return sorted(files)


def input_files(tree: Path) -> dict[str, bytes]:
    """The inputs, the same bytes everywhere: text (Python's standard library's sources, repeated and cut) and
    the bc, awk and Python programs."""
    sources = b"".join(p.read_bytes() for p in sorted((tree / PYTHON_LIB).rglob("*.py")))
    text = (sources * (1 + (2 << 20) // len(sources)))[:2 << 20]
    return {"text2m": text, "text384k": text[:384 << 10], "pi.bc": BC_PROGRAM.encode(),
            "table.awk": AWK_PROGRAM.encode(), "work.py": PYTHON_PROGRAM.encode()}


class Cpio:
    """A newc cpio archive being written (the format the kernel unpacks into its initial root file system)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.inode = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, body: bytes) -> None:
        fields = (self.inode, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0)
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields) + name.encode() + b"\0"
        self.out.write(header + b"\0" * (-len(header) % 4) + body + b"\0" * (-len(body) % 4))

    def directory(self, name: str) -> None:
        parent = os.path.dirname(name)
        if parent and parent not in self.dirs:
            self.directory(parent)
        if name not in self.dirs:
            self.dirs.add(name)
            self._entry(name, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, body: bytes, executable: bool = False) -> None:
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | (0o755 if executable else 0o644), body)

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self.out.getvalue()


def guest_archive(tree: Path, inputs: dict[str, bytes]) -> bytes:
    """The programs, their libraries and the inputs as a gzip'd cpio archive rooted at the guest's /."""
    archive = Cpio()
    for relative in program_files(tree):
        path = tree / relative
        name = f"{GUEST_ROOT.lstrip('/')}/{relative}"
        if path.is_symlink():
            archive.symlink(name, os.readlink(path))
        elif path.is_dir():
            archive.directory(name)
        else:
            archive.file(name, path.read_bytes(), executable=bool(path.stat().st_mode & 0o111))
    for name, body in inputs.items():
        archive.file(f"{GUEST_DATA.lstrip('/')}/{name}", body)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


def combined_initrd(tree: Path, inputs: dict[str, bytes], into: Path) -> Path:
    """conode's packaged initramfs followed by the programs' archive (the kernel unpacks both in turn)."""
    _, packaged = common.image_paths()
    base = packaged.read_bytes()
    path = into / "initramfs-debian.cpio.gz"
    path.write_bytes(base + b"\0" * (-len(base) % 4) + guest_archive(tree, inputs))
    return path


# --- the run ----------------------------------------------------------------------------------------------
def steps_for(paths: Paths, programs: tuple[tuple[str, str, str, str], ...]) -> list[tuple[str, str]]:
    """Each program once (a failure prints a FAILED line inside its timed region), then the digests."""
    steps = []
    for name, _, _, template in programs:
        command = paths.command(name, template)
        steps.append((name, f"{command} 2>{paths.tmp}/{name}.err || echo FAILED {name} $?"))
    for name, *_ in programs:
        out = paths.output(name)
        steps.append((f"digest.{name}", f"sha256sum < {out}; wc -c < {out}; head -c 300 {paths.tmp}/{name}.err"))
    return steps


def digest(stream: common.MarkerStream, name: str) -> tuple[str, str]:
    """(SHA-256 and size of *name*'s output, its error text) as printed in a place."""
    lines = stream.between(f"digest.{name}").strip().splitlines()
    if len(lines) < 2:
        return "no output", "\n".join(lines)
    sha, size = lines[0].split()[0], lines[1].strip()
    return f"{sha[:16]}… {size} B", " ".join(" ".join(lines[2:]).split())


def failures(stream: common.MarkerStream, name: str) -> list[str]:
    """The exit statuses of *name*'s failed runs in *stream* (whole lines: qemu's shell echoes the command)."""
    return re.findall(rf"^FAILED {name} (\d+)\r?$", stream.data.decode(errors="replace"), re.M)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def output_note(name: str, runs: dict[str, list[common.MarkerStream]]) -> str:
    """Whether *name*'s output was the same in every place and round (and every run succeeded), loudly if not."""
    outputs = {f"{common.place_label(place)} #{n + 1}": digest(stream, name)
               for place, streams in runs.items() for n, stream in enumerate(streams)}
    failed = [f"{run}: {err}" for run, (_, err) in outputs.items() if err]
    failed += [f"{common.place_label(place)}: exit status {status}" for place, streams in runs.items()
               for stream in streams for status in failures(stream, name)]
    shas = {sha for sha, _ in outputs.values()}
    places = ", ".join(common.place_label(place) for place in runs)
    if len(shas) == 1 and not failed:
        return f"{name}: output identical ({shas.pop()}) in {places}"
    shown = "; ".join(f"{run} {sha}" for run, (sha, _) in outputs.items())
    return f"{name}: OUTPUT MISMATCH — {shown}" + (f" — errors: {'; '.join(failed)}" if failed else "")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--places", nargs="+", choices=common.PLACES, metavar="PLACE",
                   default=list(DEFAULT_PLACES),
                   help=f"where to run (of: {', '.join(common.PLACES)}; default: {' '.join(DEFAULT_PLACES)})")
    names = [name for name, *_ in PROGRAMS]
    p.add_argument("--programs", nargs="+", choices=names, metavar="NAME", default=names,
                   help=f"which rows to run (of: {', '.join(names)}; default: all; the mean is over these)")
    args = p.parse_args(argv)
    programs = tuple(program for program in PROGRAMS if program[0] in args.programs)
    refs = common.References.find()
    tree = debian_tree()
    if tree is None:
        raise common.BenchmarkError(f"Debian's i386 programs are not fetched; {FETCH_HINT}")
    rounds = 1 if args.quick else 3
    runs: dict[str, list[common.MarkerStream]] = {}
    with tempfile.TemporaryDirectory(prefix="conode-realsw-") as scratch:
        data = Path(scratch) / "data"
        data.mkdir()
        inputs = input_files(tree)
        for name, body in inputs.items():
            (data / name).write_bytes(body)
        initrd = combined_initrd(tree, inputs, Path(scratch))
        common.progress(f"initramfs with the programs: {initrd.stat().st_size >> 10} KiB")
        guest = Paths(GUEST_ROOT, GUEST_DATA, common.GUEST_TMP)

        def make_steps(tmp: str, true: str, busybox: str) -> list[tuple[str, str]]:
            return steps_for(guest if tmp == common.GUEST_TMP else Paths(str(tree), str(data), tmp), programs)

        def run(place: str) -> common.MarkerStream:
            return common.run_on(place, make_steps, refs, initrd, common.QEMU_CPU_LIKE_CONODE)

        places = [place for place in common.available_places(refs) if place in args.places]
        together = [place for place in places if place in SIDE_BY_SIDE]
        # Round after round through every place, the fast engine and qemu at the same time (the ratio the target
        # judges): a change in the shared host's load falls on both alike.
        for round_ in range(rounds):
            common.progress(f"round {round_ + 1} of {rounds}: {len(programs)} programs in "
                            + ", ".join(common.place_label(place) for place in places))
            with ThreadPoolExecutor(max_workers=len(together) or 1) as pool:
                for place, stream in zip(together, pool.map(run, together)):
                    runs.setdefault(place, []).append(stream)
            for place in places:
                if place not in together:
                    runs.setdefault(place, []).append(run(place))

    def rows_of(seconds: Callable[[common.MarkerStream, str], float]) -> list[Row]:
        """A row per program: the median over the rounds of *seconds* (natively always the wall time)."""
        rows = []
        for name, label, _, _ in programs:
            figures: dict[str, common.Value] = {}
            for place in common.PLACES:
                if place in runs:
                    measure = common.MarkerStream.span if place == "native" else seconds
                    figures[place] = common.median([measure(stream, name) for stream in runs[place]])
                else:
                    figures[place] = common.place_cell(place) if place in args.places else "not run"
            rows.append(Row.across(label, "s", figures, TARGET))
        return rows

    def mean_note(rows: list[Row]) -> tuple[dict[str, float], str]:
        means = {}
        for engine in common.ENGINES:
            ratios = [row.ratio(engine) for row in rows]
            if all(r is not None for r in ratios):
                means[engine] = geometric_mean(ratios)  # type: ignore[arg-type]
        verdict = {engine: "✓" if mean <= MEAN_TARGET else "✗" for engine, mean in means.items()}
        return means, ("geometric mean of conode/qemu: " + (", ".join(
            f"{engine} {mean:.2f} {verdict[engine]}" for engine, mean in means.items()) or "—")
            + f" (target for fast ≤ {MEAN_TARGET:g})")

    kind = "quick" if args.quick else "full"
    wall_rows, cpu_rows = rows_of(common.MarkerStream.span), rows_of(common.MarkerStream.cpu_span)
    wall_means, wall_mean_note = mean_note(wall_rows)
    print(common.format_table(f"Debian i386 programs, wall time ({kind} run)", wall_rows))
    print(f"  {wall_mean_note}\n  host wall time between markers: it also counts the time other processes "
          f"hold the cores\n", flush=True)
    means, cpu_mean_note = mean_note(cpu_rows)
    notes = [f"CPU time of the emulator's process (all its threads) between markers, median of {rounds} "
             f"round(s) through every place (a fresh guest each; conode fast and qemu at the same time); "
             f"natively the wall time; boot excluded",
             f"qemu's CPU is {common.QEMU_CPU_LIKE_CONODE}: the instruction set conode's CPUID advertises, so "
             f"that OpenSSL and glibc choose the same code in both",
             *(output_note(name, runs) for name, *_ in programs), cpu_mean_note,
             *([STOCK_NOTE] if "stock" not in args.places else [])]
    mismatched = any("MISMATCH" in note for note in notes)
    title = f"Debian i386 programs, CPU time ({kind} run)"
    status = common.report("real_software", title, args, cpu_rows, notes, refs,
                           extra={"rounds": rounds, "geometric_mean": means, "wall_geometric_mean": wall_means,
                                  "wall_rows": [row.to_json() for row in wall_rows],
                                  "digests": {name: {common.place_label(place): digest(streams[0], name)[0]
                                                     for place, streams in runs.items()}
                                              for name, *_ in programs}})
    if mismatched:
        print("real_software: error: the outputs differ between places (see the MISMATCH lines)", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    common.run_main(main)
