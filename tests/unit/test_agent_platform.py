"""Per-platform behaviour: priority lowering and per-user directories.

Linux runs for real here; Windows and macOS are exercised with their platform calls faked (sys.platform, psutil's
priority constants, the Windows known-folder lookup), since this machine cannot run them.
"""

import subprocess
import sys
from pathlib import Path

import platformdirs.windows
import psutil
import pytest

from conode.agent.platform import POSIX_NICENESS, lower_priority
from conode.cache import cache_dir, config_dir


class FakeProcess:
    """Records the priority calls; refuses the values in *refuse* as the OS would."""

    def __init__(self, refuse=()):
        self.calls = []
        self._refuse = set(refuse)

    def nice(self, value):
        if value in self._refuse:
            raise psutil.AccessDenied()
        self.calls.append(("nice", value))

    def ionice(self, value):
        self.calls.append(("ionice", value))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="real priorities are checked on Linux")
def test_lower_priority_really_lowers_a_process_on_linux():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        process = psutil.Process(child.pid)
        assert lower_priority(process)
        assert process.nice() == POSIX_NICENESS
        assert process.ionice().ioclass == psutil.IOPRIO_CLASS_IDLE
    finally:
        child.kill()
        child.wait()


def test_lower_priority_on_windows_uses_the_idle_class_and_falls_back(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(psutil, "IDLE_PRIORITY_CLASS", 0x40, raising=False)
    monkeypatch.setattr(psutil, "BELOW_NORMAL_PRIORITY_CLASS", 0x4000, raising=False)
    monkeypatch.setattr(psutil, "IOPRIO_VERYLOW", 0, raising=False)
    process = FakeProcess()
    assert lower_priority(process)
    assert process.calls == [("nice", 0x40), ("ionice", 0)]
    strict = FakeProcess(refuse={0x40})
    assert lower_priority(strict)
    assert strict.calls[0] == ("nice", 0x4000)
    nothing = FakeProcess(refuse={0x40, 0x4000})
    assert not lower_priority(nothing)  # says so, never raises


def test_lower_priority_on_macos_is_niceness_only(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    process = FakeProcess()
    assert lower_priority(process)
    assert process.calls == [("nice", POSIX_NICENESS)]


def test_directories_follow_xdg_on_linux(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("CONODE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert cache_dir() == tmp_path / "cache" / "conode"
    assert config_dir() == tmp_path / "config" / "conode"
    monkeypatch.setenv("CONODE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_directories_on_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("CONODE_CACHE_DIR", raising=False)
    assert cache_dir() == Path.home() / "Library" / "Caches" / "conode"
    assert config_dir() == Path.home() / "Library" / "Application Support" / "conode"


def test_directories_on_windows(monkeypatch):
    folders = {"CSIDL_LOCAL_APPDATA": r"C:\Users\ann\AppData\Local", "CSIDL_APPDATA": r"C:\Users\ann\AppData\Roaming"}
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(platformdirs.windows, "get_win_folder", folders.__getitem__)
    monkeypatch.delenv("CONODE_CACHE_DIR", raising=False)

    def windows(path):
        return str(path).replace("\\", "/")  # this host joins with "/"; Windows would with "\"

    assert windows(cache_dir()) == "C:/Users/ann/AppData/Local/conode/Cache"
    assert windows(config_dir()) == "C:/Users/ann/AppData/Local/conode"


URGENT_CHILD = """
import os, threading
from conode.agent.platform import urgent
os.setpriority(os.PRIO_PROCESS, 0, 19)
go, done, seen = threading.Event(), threading.Event(), []
def other():  # a thread that was there before, as ZeroMQ's I/O thread is
    while not done.is_set():
        go.wait(); go.clear()
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))
        if not done.is_set():
            seen.append("|")
thread = threading.Thread(target=other); thread.start()
def look():
    go.set()
    while not seen or seen[-1] != "|":
        pass
    seen.pop()
with urgent() as raised:
    seen.append(os.getpriority(os.PRIO_PROCESS, 0))
    look()
seen.append(os.getpriority(os.PRIO_PROCESS, 0))
done.set(); go.set(); thread.join()
print(raised, *seen)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are Linux's")
def test_urgent_raises_every_threads_priority_for_the_block_then_lowers_them_again():
    """Where raising is allowed (root), this thread and the process's other threads run at niceness 0 in the
    block, and are back at 19 after; where it is not, the block runs at 19 and says so."""
    out = subprocess.run([sys.executable, "-c", URGENT_CHILD], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    assert out[1:] == (["0", "0", "19", "19"] if out[0] == "True" else ["19"] * 4)
