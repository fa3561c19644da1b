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


def test_the_session_helper_reports_input_to_the_agent(display, tmp_path):
    """`conode idle-report` in an X session writes the last input's time; the agent's source reads it."""
    from conode.idle.report import ReportsSource

    helper = subprocess.Popen([sys.executable, "-m", "conode.cli", "idle-report", "--to", str(tmp_path),
                               "--every", "0.5"], env={**os.environ, "DISPLAY": display})
    try:
        source = ReportsSource(tmp_path)
        deadline = time.monotonic() + 30
        while source.read().idle_s is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        before = source.read().idle_s
        assert before is not None and before >= 1.0
        moved = time.time()
        subprocess.run(["xdotool", "mousemove", "200", "200"], env={**os.environ, "DISPLAY": display}, check=True)

        def last_input() -> float:
            return time.time() - source.read().idle_s

        deadline = time.monotonic() + 10
        while last_input() < moved - 0.1 and time.monotonic() < deadline:  # the helper's next report
            time.sleep(0.1)
        assert last_input() >= moved - 0.1  # the input that came after `moved`, not the earlier ones
        assert (tmp_path / str(os.getuid())).stat().st_mode & 0o777 == 0o644
    finally:
        helper.kill()
        helper.wait()
