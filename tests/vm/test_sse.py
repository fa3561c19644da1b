"""SSE2, SSSE3 and MMX integer operations, and scalar rotates with their flags, compute what the host CPU
computes, bit for bit.

The fast engine translates the commonest of them inline (engine patches 0007 and 0008; 0015 those on XMM
registers, and the moves between them, as host vector operations) instead of calling QEMU's helpers;
sse/intops.c runs each, and the moves alone and chained with them, over fixed and pseudo-random operands, the
shifts with counts up to past the lane width, the byte shifts and PALIGNR with immediates 0, 15, 16 and beyond,
PSHUFD with several orders, from registers and from memory, in the guest and natively: the outputs must be equal. ROL and ROR by an immediate leave the
flags of the instruction before them in place and add their own C and O (engine patch 0009) instead of computing
all the flags: sse/rotates.c rotates after each kind of flag-setting instruction and reads the flags back in
every way (PUSHF, SETcc, ADC, Jcc, and across a page fault taken in between).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from guest_programs import build_static_i386, run_in_guest, run_natively

from conode.vm import ENGINE

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(ENGINE.name != "fast", reason="SSE needs the fast engine (the stock one has no FPU)")]

SOURCE = Path(__file__).parent / "sse" / "intops.c"
ROTATES = Path(__file__).parent / "sse" / "rotates.c"


@pytest.mark.parametrize("optimise", ["-O0", "-O2"])  # -O0 takes operands from memory, -O2 from registers
def test_sse2_integer_operations_match_the_host(tmp_path, optimise):
    program = build_static_i386(SOURCE, tmp_path / "intops", "-msse2", optimise=optimise)
    expected = run_natively(program)
    assert expected.count(b"\n") == 40 * (9 + 5 + 8 + 6 + 9 * 10 + 9 * 2 + 13 * 3)
    assert run_in_guest(program) == expected


def test_rotates_and_their_flags_match_the_host(tmp_path):
    program = build_static_i386(ROTATES, tmp_path / "rotates")
    expected = run_natively(program)
    assert expected.count(b"\n") == 40 * (16 * 19 + 3 + 1)
    assert run_in_guest(program) == expected
