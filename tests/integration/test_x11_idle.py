"""The X11 idle source against a real X server (Xvfb), moved by a real input event (xdotool)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conode.idle.sources import X11Source

pytestmark = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("xdotool")),
    reason="needs Xvfb, xdotool and libXss (Debian: xvfb xdotool libxss1)")


@pytest.fixture
def display():
    number = 90 + os.getpid() % 100
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = f":{number}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and X11Source(name).read().idle_s is None:
        time.sleep(0.1)
    try:
        yield name
    finally:
        server.kill()
        server.wait()


def test_x11_idle_time_grows_and_input_resets_it(display):
    source = X11Source(display)
    time.sleep(1.2)
    before = source.read()
    assert before.idle_s is not None and before.idle_s >= 1.0
    subprocess.run(["xdotool", "mousemove", "100", "100"], env={**os.environ, "DISPLAY": display}, check=True)
    assert source.read().idle_s < 0.5


def test_conode_status_reports_the_real_idle_time(display):
    result = subprocess.run([sys.executable, "-m", "conode.cli", "status", "--json"], capture_output=True, text=True,
                            env={**os.environ, "DISPLAY": display}, timeout=60)
    report = json.loads(result.stdout)
    x11 = next(s for s in report["sources"] if s["name"] == "x11")
    assert x11["idle_s"] is not None and x11["detail"] == f"display {display}"
