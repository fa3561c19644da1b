"""On the stock engine the guest has no FPU, MMX or SSE (stock Unicorn's x87 is inexact; see
conode/vm/cpu/cpuid.py), and ordinary programs still run there and give the hardware's answers: glibc's string
functions take their i686 versions (glibc picks SSE2 copies by CPU model alone on a Westmere, which is why that
CPU gives a model of its own), the kernel's math emulator runs the x87 including the P6's FCOMI and FCMOVcc,
and a program that asks CPUID before using SSE2 takes its other path. One small static program is compared
with the host CPU; Debian's own openssl (fetched from Debian's archive, cached; skipped with the reason where
apt cannot fetch it) digests a file as hashlib does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # the guest half, run in its own process: tests/ holds conftest
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO  # noqa: E402
from guest_programs import build_static_i386, run_job_in_guest, run_natively  # noqa: E402

from conode.cache import cache_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
GUEST_TIMEOUT_S = 900
# Debian 12's openssl and what it loads: (package, file in the package, name in the job directory).
OPENSSL_FILES = (("libc6", "lib/i386-linux-gnu/ld-linux.so.2", "ld-linux.so.2"),
                 ("libc6", "lib/i386-linux-gnu/libc.so.6", "libc.so.6"),
                 ("libssl3", "usr/lib/i386-linux-gnu/libssl.so.3", "libssl.so.3"),
                 ("libssl3", "usr/lib/i386-linux-gnu/libcrypto.so.3", "libcrypto.so.3"),
                 ("openssl", "usr/bin/openssl", "openssl"))

pytestmark = pytest.mark.guest


def run_on_stock(directory: Path, command: str) -> bytes:
    """*command* (a shell command) in a guest on the stock engine, in a job directory holding *directory*'s files
    (made executable); its stdout. The guest runs in a process of its own: the engine is chosen at import."""
    env = {**os.environ, "CONODE_ENGINE": "stock"}
    result = subprocess.run([sys.executable, __file__, str(directory), command], cwd=REPO, env=env,
                            capture_output=True, timeout=GUEST_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return (directory.parent / f"{directory.name}.guest").read_bytes()


def test_a_program_that_asks_cpuid_runs_as_on_the_hardware(tmp_path):
    """String functions over many sizes, FCOMI/FCMOVcc (the kernel's math emulator) and an SSE2 sum taken only
    where CPUID offers SSE2. (A static glibc picks its string functions once, at build time.)"""
    work = tmp_path / "nofpu"
    work.mkdir()
    program = build_static_i386(HERE / "stock" / "nofpu.c", work / "nofpu", "-march=i686")
    assert run_on_stock(work, "./nofpu") == run_natively(program)


def debian_openssl() -> dict[str, bytes]:
    """OPENSSL_FILES' contents, from Debian's i386 packages (downloaded once into the cache)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs Debian's apt-get and dpkg-deb to fetch Debian's openssl")
    directory = cache_dir() / "debian-openssl"
    root = directory / "root"
    if not all((root / path).exists() for _, path, _ in OPENSSL_FILES):
        directory.mkdir(parents=True, exist_ok=True)
        packages = sorted({f"{package}:i386" for package, _, _ in OPENSSL_FILES})
        fetched = subprocess.run(["apt-get", "download", *packages], cwd=directory, capture_output=True, text=True,
                                 timeout=600)
        if fetched.returncode != 0:
            pytest.skip(f"cannot fetch {' '.join(packages)} (run `dpkg --add-architecture i386 && apt-get update`): "
                        f"{fetched.stderr.strip()[-300:]}")
        for deb in directory.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return {name: (root / path).read_bytes() for _, path, name in OPENSSL_FILES}


def test_debians_openssl_runs_and_digests_as_hashlib(tmp_path):
    """Debian's openssl died with SIGILL here, in the SSE2 memcpy the shared glibc picked for a Westmere; with a
    model of its own the CPU gets the i686 one, and openssl runs its generic code (CPUID shows no SSE)."""
    work = tmp_path / "openssl"
    work.mkdir()
    for name, data in debian_openssl().items():
        (work / name).write_bytes(data)
    text = b"".join(hashlib.sha512(str(i).encode()).digest() for i in range(4096))  # 256 KiB
    (work / "data").write_bytes(text)
    run = "./ld-linux.so.2 --library-path . ./openssl"
    out = run_on_stock(work, f"{run} dgst -sha256 -r data && {run} dgst -sha512 -r data && {run} dgst -md5 -r data")
    assert out.decode().split() == [hashlib.sha256(text).hexdigest(), "*data", hashlib.sha512(text).hexdigest(),
                                    "*data", hashlib.md5(text).hexdigest(), "*data"]


if __name__ == "__main__":
    source, command = Path(sys.argv[1]), sys.argv[2]
    inputs = {path.name: path.read_bytes() for path in sorted(source.iterdir())}
    result = run_job_in_guest(["sh", "-c", f"chmod +x * && {command}"], inputs)
    (source.parent / f"{source.name}.guest").write_bytes(bytes(result.stdout))
