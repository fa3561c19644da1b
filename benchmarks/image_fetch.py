#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Images in the pool: adding an image to a real coordinator and fetching it to an agent, on loopback.

A real coordinator runs in its own process (coordinator_scale.CoordinatorProcess). An image of random bytes
(``--mib``, default 100: incompressible and without repeated chunks, so every chunk travels) is

* **added** through the Python admin client as `coordinator image add` does (coordinator/uploads.py): read and
  cut into chunks, the missing ones asked for, each sent and checked and stored, then named;
* **fetched** as an agent fetches it (conode/agent/images.py): the agent's own DEALER with an enrolled agent
  key, IMAGE_FETCH_WINDOW chunks in flight, each checked, written in place, the whole file checked at the end.

Meanwhile an admin socket sends a cheap request (``job``) every 20 ms: its round trip during the fetch, against
the same round trip with nothing else to do, shows what a fetch costs the rest of the control plane. Target
(issue 12): a fetch at 50 MiB/s or more. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import zmq

from coordinator_scale import CoordinatorProcess, cpu_seconds, progress, wait_until_serving

from conode.agent.images import CoordinatorChunks, ImageCache, ImageSpec
from conode.cluster.chunks import manifest_of
from conode.cluster.keys import generate_key_pair
from coordinator.client import AdminClient
from coordinator.config import load_client_config
from coordinator.uploads import upload_image

TARGET_MIB_S = 50.0
PROBE_EVERY_S = 0.02


def probe_round_trips(config, stop: threading.Event) -> list[float]:
    """Round trips of a cheap admin request, every PROBE_EVERY_S, until *stop*."""
    times: list[float] = []
    with AdminClient(config, timeout_s=30.0, context=zmq.Context.instance()) as client:
        while not stop.is_set():
            started = time.monotonic()
            client.request("jobs", "jobs_reply", limit=1)
            times.append(time.monotonic() - started)
            stop.wait(PROBE_EVERY_S)
    return times


def probed(config, action):
    """Run *action* while probing the control plane; (its result, the probe's round trips)."""
    stop = threading.Event()
    found: list[list[float]] = []
    thread = threading.Thread(target=lambda: found.append(probe_round_trips(config, stop)))
    thread.start()
    try:
        result = action()
    finally:
        stop.set()
        thread.join()
    return result, found[0] if found else []


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="image size (MiB)")
    parser.add_argument("--quick", action="store_true", help="a 16 MiB image")
    args = parser.parse_args(argv)
    mib = 16 if args.quick else args.mib
    scratch = Path(tempfile.mkdtemp(prefix="conode-image-fetch-"))
    coordinator = CoordinatorProcess(scratch)
    try:
        coordinator.init()
        agent = generate_key_pair(scratch / "agent-keys", "agent")
        coordinator.enrol([("bench-agent", agent.public)])
        coordinator.serve()
        wait_until_serving(coordinator)
        config = load_client_config(coordinator.state.client_config)
        image = scratch / "image.bin"
        with open(image, "wb") as out:
            for _ in range(mib):
                out.write(os.urandom(1 << 20))
        _, idle = probed(config, lambda: time.sleep(1.0))

        progress(f"adding a {mib} MiB image")
        started = time.monotonic()
        with AdminClient(config, timeout_s=30.0, context=zmq.Context.instance()) as client:
            upload_image(client, "bench", image, lambda text, final=False: None)
        add_s = time.monotonic() - started

        progress("fetching it as an agent")
        manifest = manifest_of(image)
        spec = ImageSpec("bench", manifest.sha256, manifest.size, tuple(manifest.chunks))
        cache = ImageCache(scratch / "cache", (mib + 1) << 20)
        source = CoordinatorChunks(zmq.Context.instance(), coordinator.bind, config.server_public_key, agent)
        server = psutil.Process(coordinator.pid)
        server_cpu, own_cpu = cpu_seconds(server), time.process_time()
        started = time.monotonic()
        try:
            fetched, during = probed(config, lambda: cache.fetch(spec, source))
        finally:
            source.close()
        fetch_s = time.monotonic() - started
        server_cpu, own_cpu = cpu_seconds(server) - server_cpu, time.process_time() - own_cpu
        if cache.path(spec.sha256).read_bytes() != image.read_bytes():
            raise RuntimeError("the fetched image differs from the one added")

        fetch_rate = mib / fetch_s
        print(f"\nImages in the pool, {mib} MiB of random bytes ({fetched} chunks), loopback\n")
        print(f"{'what':52} {'figure':>12}   target")
        print(f"{'add (coordinator image add)':52} {f'{add_s:.2f} s':>12}   -")
        print(f"{'  rate':52} {f'{mib / add_s:.0f} MiB/s':>12}   -")
        print(f"{'fetch to an agent (checked, in place)':52} {f'{fetch_s:.2f} s':>12}   -")
        verdict = "met" if fetch_rate >= TARGET_MIB_S else "NOT met"
        print(f"{'  rate':52} {f'{fetch_rate:.0f} MiB/s':>12}   ≥ {TARGET_MIB_S:.0f} MiB/s: {verdict}")
        print(f"{'  CPU: coordinator / agent side (probes included)':52} "
              f"{f'{server_cpu:.2f} / {own_cpu:.2f} s':>12}   -")
        for label, values in (("admin round trip, idle", idle), ("admin round trip, during the fetch", during)):
            print(f"{label + ' (p50 / p99 ms)':52} {ms(values, 0.5) + ' / ' + ms(values, 0.99):>12}   -")
        if statistics.median(during or [0]) > 0:
            print(f"\n{len(during)} probes during the fetch, {len(idle)} idle; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        return 0 if fetch_rate >= TARGET_MIB_S else 1
    finally:
        coordinator.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
