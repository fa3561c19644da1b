"""Both engines — conode's fast engine and stock Unicorn with the Python passage — run the same guest alike."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, fast_engine_built

import conode.vm

pytestmark = pytest.mark.skipif(not fast_engine_built(), reason="the fast engine is not built (`conode engine build`)")

WORKLOAD = ("i=0; s=7; while [ $i -lt 400 ]; do s=$(( (s * 1103515245 + 12345) % 2147483648 )); i=$((i+1)); done; "
            "echo $s; seq 1 3000 | sha256sum; seq 1 3000 | gzip -c | wc -c; ls /bin | wc -l; "
            "grep -E '^(model name|vendor_id|cpu family)' /proc/cpuinfo; uname -srm; exit 5")
# (The flags differ on purpose: the stock engine's guest has no FPU, see conode/vm/cpu/cpuid.py.)


def run_on(engine: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conode.cli", *args], capture_output=True, timeout=300, cwd=REPO,
                          env={**os.environ, "CONODE_ENGINE": engine})


def test_guest_output_is_identical_on_both_engines():
    fast = run_on("fast", "vm", "run", "-q", "--", "sh", "-c", WORKLOAD)
    stock = run_on("stock", "vm", "run", "-q", "--", "sh", "-c", WORKLOAD)
    assert fast.returncode == stock.returncode == 5, (fast.stderr, stock.stderr)
    assert fast.stdout == stock.stdout
    assert len(fast.stdout.splitlines()) >= 6


def test_engine_report_names_the_engine_in_use():
    fast = run_on("fast", "engine")
    stock = run_on("stock", "engine")
    assert b"conode's fast engine" in fast.stdout and b"native" in fast.stdout
    assert b"stock Unicorn" in stock.stdout and b"Python passage" in stock.stdout


@pytest.mark.skipif(conode.vm.ENGINE.name != "fast", reason="this process already runs on stock Unicorn")
def test_the_python_passage_suite_passes_on_stock_unicorn():
    tests = ["tests/unit/test_passage.py", "tests/unit/test_code_coherence.py", "tests/vm/test_cpu_cap.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                            capture_output=True, text=True, timeout=600, cwd=REPO,
                            env={**os.environ, "CONODE_ENGINE": "stock"})
    assert result.returncode == 0, result.stdout[-3000:]
