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
        machine.call_soon(lambda: setattr(machine, "cpu_cap", 0.25))
        time.sleep(0.2)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        time.sleep(2.0)
        share = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
    finally:
        machine.pause()
        runner.join(10)
    assert 0.12 < share < 0.40, share
