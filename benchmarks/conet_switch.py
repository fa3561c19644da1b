"""How fast the conet switch process moves frames: one switch (guest port to guest port on one agent) and two
(port -> peer -> port, over CURVE on loopback), with MTU-sized and 64 KiB (GSO) frames.

Each guest port is a separate process (conode/testing/conet.py), sending as fast as the switch takes frames;
the figures are frames and MiB delivered per second and the switches' CPU time per MiB delivered. The
per-guest rate limits of conode/limits.py apply, as they do in the pool.

    python3 benchmarks/conet_switch.py [--seconds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from conode.testing.conet import SwitchProcess, ipv4, load_process, load_result, sized

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")
SIZES = {"1514-byte": (1514 + 12, 0), "64 KiB GSO": (12 + 14 + 65535, 1)}


def measure(directory: Path, across: bool, size: int, gso: int, seconds: float, options: tuple[str, ...]
            ) -> dict[str, float]:
    left = SwitchProcess(directory / "left", "left", options=options).start()
    right = SwitchProcess(directory / "right", "right", options=options).start() if across else left
    switches = [left, right] if across else [left]
    try:
        if across:
            left.set_peers(right)
            right.set_peers(left)
        sender = left.add_port(A, "10.9.0.1", "bench", "sender")
        receiver = right.add_port(B, "10.9.0.2", "bench", "receiver")
        sender.close()
        receiver.close()
        time.sleep(1.5)  # the peer links are up (a refused first handshake is retried each second)
        frame = sized(ipv4(B, A, "10.9.0.1", "10.9.0.2", gso_type=gso), size)
        sink = load_process("receive", right.ports_path, receiver.token, seconds + 5)
        time.sleep(0.3)
        cpu = sum(s.cpu_seconds() for s in switches)
        source = load_process("send", left.ports_path, sender.token, seconds, frame)
        sent, got = load_result(source), load_result(sink)
        cpu = sum(s.cpu_seconds() for s in switches) - cpu
        dropped = {f"{s.name}: {reason}": n for s in switches for reason, n in s.stats()["dropped"].items()}
    finally:
        for s in switches:
            s.stop()
    span = max(got["last"] - got["first"], 1e-3)
    mib = got["bytes"] / (1 << 20)
    return {"frames_per_s": got["frames"] / span, "mib_per_s": mib / span, "cpu_ms_per_mib": 1000 * cpu / max(mib, 1e-9),
            "delivered": got["frames"] / max(sent["frames"], 1), "dropped": dropped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--unlimited", action="store_true",
                        help="lift the per-guest rate limits, to see what the switch itself can do")
    args = parser.parse_args()
    results = {}
    print(f"{'path':<28}{'frames':>12}{'frames/s':>12}{'MiB/s':>10}{'CPU ms/MiB':>12}{'delivered':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for across in (False, True):
            for label, (size, gso) in SIZES.items():
                name = f"{'two switches' if across else 'one switch'}, {label}"
                print(f"measuring {name}...", file=sys.stderr)
                options = ("--port-bytes-per-s", "1e12", "--port-frames-per-s", "1e9") if args.unlimited else ()
                r = measure(Path(tmp) / f"{across}{size}", across, size, gso, args.seconds, options)
                results[name] = r
                print(f"{name:<28}{size:>12}{r['frames_per_s']:>12,.0f}{r['mib_per_s']:>10.1f}"
                      f"{r['cpu_ms_per_mib']:>12.2f}{r['delivered']:>10.0%}  {r['dropped'] or ''}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
