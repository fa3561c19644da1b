"""The CPU cap: a busy guest uses about its share of a core, enforced slice by slice."""

import io
import threading
import time

from conode.vm.guest_image import load_guest_image
from conode.vm.machine import MachineConfig
from conode.vm.session import GuestSession


def test_busy_guest_honours_its_cpu_cap():
    session = GuestSession.boot(load_guest_image(), MachineConfig(), io.BytesIO(), io.BytesIO())
    session.start(["sh", "-c", "while true; do :; done"])
    machine = session.machine
    runner = threading.Thread(target=machine.run)
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while session.ready_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert session.ready_at is not None
        time.sleep(0.5)  # the busy loop is running
        uncapped = _share_over(1.0)  # what this host gives the guest now (less than 1 on a busy host)
        machine.call_soon(lambda: setattr(machine, "cpu_cap", 0.25))
        time.sleep(0.2)
        share = _share_over(2.0)
    finally:
        machine.pause()
        runner.join(10)
    # The cap is an upper bound; below it the guest still gets its share of what the host can give.
    assert min(0.12, 0.2 * uncapped) < share < 0.40, (share, uncapped)


def _share_over(seconds: float) -> float:
    cpu_before, wall_before = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
