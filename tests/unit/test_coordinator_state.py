# SPDX-License-Identifier: GPL-2.0-or-later
"""The coordinator's state directory is private: directories 0700, database (with its WAL and SHM) and keys 0600."""

import os
import stat
import subprocess
import sys

from coordinator.config import StateDir
from coordinator.server import Coordinator


class NoTransport:
    def send(self, identity: bytes, payload: bytes) -> bool:
        return True

    def close(self) -> None:
        pass


def modes(state: StateDir) -> dict[str, int]:
    found = {}
    for directory in (state.root, state.keys):
        found[str(directory.relative_to(state.root.parent))] = stat.S_IMODE(directory.stat().st_mode)
        for entry in directory.iterdir():
            if entry.is_file():
                found[str(entry.relative_to(state.root.parent))] = stat.S_IMODE(entry.stat().st_mode)
    return found


def assert_private(state: StateDir) -> None:
    found = modes(state)
    assert {"state", "state/keys", "state/coordinator.db", "state/keys/coordinator.secret",
            "state/keys/coordinator.public", "state/client.toml"} <= set(found)
    loose = {path: oct(mode) for path, mode in found.items()
             if mode != (0o700 if path in ("state", "state/keys") else 0o600)}
    assert not loose


def test_init_makes_a_private_state_directory_whatever_the_umask(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    env.pop("CONODE_CLIENT_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "init", "--state-dir", str(tmp_path / "state")],
                          env=env, capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stderr
    assert_private(StateDir(tmp_path / "state"))


def test_a_loose_state_directory_is_made_private_when_the_coordinator_starts(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    subprocess.run([sys.executable, "-m", "coordinator.cli", "init", "--state-dir", str(tmp_path / "state")],
                   env=env, check=True, capture_output=True, timeout=60)
    state = StateDir(tmp_path / "state")
    for path, _ in modes(state).items():  # as an older coordinator, or a careless copy, left it
        (tmp_path / path).chmod(0o755 if (tmp_path / path).is_dir() else 0o644)
    coordinator = Coordinator(state, clock=lambda: 0.0, transport=NoTransport())
    try:
        coordinator.store.add_job(["true"], {}, [], 128, "admin")  # a write: the WAL and SHM files exist now
        assert (tmp_path / "state" / "coordinator.db-wal").exists()
        assert (tmp_path / "state" / "coordinator.db-shm").exists()
        assert_private(state)
    finally:
        coordinator.close()


def test_the_conet_relay_listens_on_the_next_port_unless_configured(tmp_path):
    state = StateDir(tmp_path / "state")
    assert state.conet_relay("tcp://0.0.0.0:7700") == "tcp://0.0.0.0:7701"
    assert state.conet_relay("tcp://10.1.2.3:*") == "tcp://10.1.2.3:*"
    state.root.mkdir()
    state.settings.write_text('conet_relay = "off"\n')
    assert state.conet_relay("tcp://0.0.0.0:7700") == "off"


def test_a_relay_that_cannot_listen_leaves_the_coordinator_running_without_one(tmp_path, caplog):
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    subprocess.run([sys.executable, "-m", "coordinator.cli", "init", "--state-dir", str(tmp_path / "state")],
                   env=env, check=True, capture_output=True, timeout=60)
    state = StateDir(tmp_path / "state")
    first = Coordinator(state, clock=lambda: 0.0, transport=NoTransport(), relay="tcp://127.0.0.1:*")
    try:
        assert first.relay is not None
        taken = first.relay.endpoint
        second = Coordinator(state, clock=lambda: 0.0, transport=NoTransport(), relay=taken)
        try:
            assert second.relay is None
            assert "no conet relay" in caplog.text and "conet_relay" in caplog.text
        finally:
            second.close()
    finally:
        first.close()
