"""A truthful CPUID: every feature the guest's CPUID advertises executes and computes what the host CPU
computes; every feature it does not advertise raises SIGILL, as on hardware without it.

tests/vm/cpuid/probe.c prints, per feature, whether CPUID advertises it, whether its instruction executed
and the result on fixed inputs; it runs in a real guest and natively on the host.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guest_programs import build_static_i386, run_in_guest, run_job_in_guest, run_natively

from conode.vm import ENGINE
from conode.vm.clock import NS_PER_S, TSC_HZ

pytestmark = pytest.mark.guest

PROBE = Path(__file__).parent / "cpuid" / "probe.c"
TSC_PROBE = Path(__file__).parent / "cpuid" / "tsc.c"
# On a CPU without LZCNT its encoding is REP BSR, which executes as BSR: hardware does the same.
LEGACY_ENCODINGS = {"lzcnt": "00000017"}
# Stock Unicorn runs VEX-encoded SSE as if it were legacy SSE; conode's engine (patch 0005) refuses it.
STOCK_ENGINE_GAPS = {"avx"}


def _table(output: bytes) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in output.decode().splitlines():
        name, *values = line.split()
        if name != "vendor":
            rows[name] = tuple(values)
    return rows


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    program = build_static_i386(PROBE, tmp_path_factory.mktemp("probe") / "probe")
    return _table(run_in_guest(program)), _table(run_natively(program))


# On the stock engine the guest has no FPU (its x87 is the kernel's emulator): nothing that needs one.
NEEDS_FPU = {"mmx", "fxsr", "sse", "sse2", "sse3", "pclmulqdq", "ssse3", "sse4_1", "sse4_2", "aes"}
EXPECTED = {"cmov", "popcnt", "cx8", "tsc", "clflush"} | (NEEDS_FPU if ENGINE.name == "fast" else set())


def test_advertised_features_execute_and_compute_what_the_host_computes(tables):
    guest, host = tables
    advertised = [name for name, (adv, _, _) in guest.items() if adv == "1"]
    assert set(advertised) == EXPECTED
    for name in advertised:
        _, executed, result = guest[name]
        if executed == "-":
            continue  # advertised for the kernel, not probed from user space
        assert executed == "1", f"{name} is advertised but raised SIGILL"
        host_adv, host_executed, host_result = host[name]
        if host_executed == "1":
            assert result == host_result, f"{name}: guest computed {result}, the host CPU {host_result}"


def test_absent_features_fault(tables):
    guest, _ = tables
    for name, (adv, executed, result) in guest.items():
        if adv != "0" or executed == "-":
            continue
        if name in LEGACY_ENCODINGS:
            assert result == LEGACY_ENCODINGS[name], f"{name} should run as its legacy encoding"
        elif ENGINE.name == "stock" and name in STOCK_ENGINE_GAPS:
            continue
        else:
            assert executed == "0", f"{name} is not advertised but executed"


def test_the_kernel_sees_conodes_cpu_and_what_it_offers():
    cpuinfo = run_job_in_guest(["cat", "/proc/cpuinfo"]).stdout.decode()
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())}
    assert fields["model name"] == "conode virtual CPU (Unicorn TCG)"
    # "cpu MHz" is the kernel's own measure of the CPU against the PIT, and a busy host can skew that by a few
    # parts in a million; the delay loop's loops per jiffy come from the stated TSC rate (not a preset lpj).
    assert abs(float(fields["cpu MHz"]) - TSC_HZ / 1e6) < TSC_HZ / 1e6 * 1e-3
    assert float(fields["bogomips"]) == 2 * TSC_HZ / 1e6
    flags = set(fields["flags"].split())
    with_fpu = {"fpu", "sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "aes"}
    assert {"popcnt", "hypervisor"} <= flags
    assert not {"sep", "apic", "avx", "movbe"} & flags  # the guest stays on int 0x80 and the 8259s
    if ENGINE.name == "fast":
        assert with_fpu | {"cmov"} <= flags  # (without an FPU the kernel lists no CMOV: it ties it to FXSR)
    else:  # the kernel's own x87 emulator instead of stock Unicorn's inexact one
        assert not with_fpu & flags and fields["fpu"] == "no"


def test_the_tsc_runs_at_its_stated_rate_on_the_guest_s_clock(tmp_path):
    """Across a sleep, RDTSC advances by TSC_HZ per second of the guest's CLOCK_MONOTONIC. That clock is the TSC
    once the kernel has switched to it (clocksource=tsc); until then it counts PIT ticks, and a timer interrupt the
    emulated CPU takes late collapses missed periods into one: it can lose time against the virtual clock, never
    gain it."""
    program = build_static_i386(TSC_PROBE, tmp_path / "tsc")
    ticks_per_ns = float(run_in_guest(program)) / (TSC_HZ / NS_PER_S)
    assert 0.99 < ticks_per_ns < 1.2
