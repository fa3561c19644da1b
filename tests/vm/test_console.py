"""`conode vm console`: an interactive shell on the guest's serial console, through a real terminal."""

import os
import pty
import select
import subprocess
import sys
import time

from conftest import REPO


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()  # not select(): late in a long test run the descriptor may be past 1023
    poller.register(fd, select.POLLIN)
    while needle not in seen and time.monotonic() < deadline:
        if poller.poll(200):
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_console_runs_a_shell_and_ctrl_bracket_leaves():
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "conode.cli", "vm", "console"], stdin=terminal,
                               stdout=terminal, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True)
    os.close(terminal)
    try:
        assert b"# " in read_until(controller, b"# ", 120)  # the shell's prompt
        os.write(controller, b"echo hi-$((2+3))\r")
        assert b"hi-5" in read_until(controller, b"hi-5", 30)
        os.write(controller, b"\x1d")  # Ctrl-]
        assert process.wait(timeout=30) == 0
        assert b"press Ctrl-] to leave" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
