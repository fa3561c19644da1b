# SPDX-License-Identifier: GPL-2.0-or-later
"""The admin-facing pure parts: units in tables, quoted commands, strict TOML keys, remembered down nodes."""

from __future__ import annotations

import stat
import subprocess

import pytest

from conode.cluster.keys import new_key_pair
from conode.errors import ConodeError
from conode.shell import command
from conode.tomlfile import read_known, write_toml
from coordinator import render
from coordinator.config import CLIENT_KEYS, client_config_path, load_client_config, write_user_client_config
from coordinator.down import MAX_DOWN_NODES, DownNode, DownNodes, unknown_node

Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"


@pytest.mark.parametrize("seconds, shown", [(None, "-"), (float("nan"), "-"), (0, "0s"), (59.9, "59s"),
                                            (187, "3m07s"), (5 * 3600 + 120, "5h02m"), (3 * 86400 + 4 * 3600, "3d04h"),
                                            (1e9, "forever"), (float("inf"), "forever")])
def test_durations_read_as_people_say_them(seconds, shown):
    assert render.duration(seconds) == shown


def test_sizes_and_speeds_carry_their_units():
    assert render.size(512) == "512 bytes"
    assert render.size(1536) == "1.5 KiB"
    assert render.size(128 << 20) == "128.0 MiB"
    assert render.size(3 << 40) == "3.0 TiB"
    assert render.mib(256) == "256 MiB"
    assert render.speed(0.0) == "-"  # not measured yet
    assert render.speed(850.4) == "850 loops/s"
    assert render.speed(123_456) == "123k loops/s"


def test_printed_commands_come_back_word_for_word_from_a_shell():
    words = ["--state-dir", "/tmp/my state $HOME `id` 'q'", Z85, "-leading", "", "a\nb"]
    line = command("printf", "%s\\0", *words)
    out = subprocess.run(["sh", "-c", line], capture_output=True, check=True).stdout
    assert out.split(b"\0")[:-1] == [w.encode() for w in words]


def test_unknown_toml_keys_are_named_with_their_file_and_the_closest_known(tmp_path):
    path = tmp_path / "client.toml"
    write_toml(path, {"endpont": "tcp://x:1"})
    with pytest.raises(ConodeError, match=rf"{path}: unknown setting 'endpont'; did you mean 'endpoint'\?"):
        read_known(path, CLIENT_KEYS)
    write_toml(path, {"zzz": 1})
    with pytest.raises(ConodeError, match="unknown setting 'zzz'; known settings are endpoint, "):
        read_known(path, CLIENT_KEYS)
    write_toml(path, {"endpoint": "tcp://x:1"})
    assert read_known(path, CLIENT_KEYS) == {"endpoint": "tcp://x:1"}


def test_a_named_client_configuration_is_never_replaced_by_another(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("CONODE_CLIENT_CONFIG", raising=False)
    with pytest.raises(ConodeError, match="no client configuration: .*client.toml does not exist"):
        client_config_path(None)
    user = home / ".config" / "conode" / "client.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert client_config_path(None) == user
    missing = tmp_path / "typo.toml"
    with pytest.raises(ConodeError, match=rf"{missing} \(from --config\) does not exist"):
        client_config_path(missing)
    monkeypatch.setenv("CONODE_CLIENT_CONFIG", str(missing))
    with pytest.raises(ConodeError, match=r"\(from CONODE_CLIENT_CONFIG\) does not exist"):
        client_config_path(None)
    assert client_config_path(user) == user  # --config wins over the environment


def test_down_nodes_are_kept_until_they_return_or_are_forgotten():
    down = DownNodes()
    down.left(DownNode("b", 100.0, "silent for 10 s", 2, 256))
    down.left(DownNode("a", 200.0, "node said goodbye", 1, 128))
    assert [row["name"] for row in down.rows()] == ["a", "b"]
    assert down.rows()[1] == {"name": "b", "since": 100.0, "why": "silent for 10 s", "cores": 2, "mem_mib": 256}
    down.returned("a")
    assert down.names() == {"b"}
    assert not down.forget("a") and down.forget("b") and len(down) == 0


def test_down_nodes_are_bounded_oldest_first():
    down = DownNodes()
    for i in range(MAX_DOWN_NODES + 5):
        down.left(DownNode(f"n{i}", float(i), "lost", 1, 128))
    assert len(down) == MAX_DOWN_NODES and "n0" not in down.names() and f"n{MAX_DOWN_NODES + 4}" in down.names()


def test_an_unknown_node_is_refused_with_the_closest_name():
    assert unknown_node("node-x", {"node-a", "other"}) == "no node named 'node-x'; did you mean 'node-a'?"
    assert unknown_node("zzz", set()) == "no node named 'zzz'; `coordinator status` lists the nodes"


def test_a_users_client_configuration_holds_their_keys_and_is_theirs_alone(tmp_path):
    pair = new_key_pair()
    path = tmp_path / "alice.toml"
    write_user_client_config(path, "tcp://pool.example:7700", "S" * 40, pair)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = load_client_config(path)
    assert config.keys == pair and config.endpoint == "tcp://pool.example:7700" and config.server_public_key == "S" * 40
    with pytest.raises(ConodeError, match="alice.toml exists already"):
        write_user_client_config(path, "tcp://other:1", "S" * 40, new_key_pair())
    assert load_client_config(path).keys == pair  # never overwritten
    broken = tmp_path / "broken.toml"
    write_toml(broken, {"endpoint": "tcp://x:1", "server_public_key": "S" * 40, "public_key": pair.public,
                        "secret_key": "short"})
    with pytest.raises(ConodeError, match="broken.toml: public_key and secret_key must be CURVE keys"):
        load_client_config(broken)
    write_toml(broken, {"endpoint": "tcp://x:1", "server_public_key": "S" * 40, "public_key": pair.public})
    with pytest.raises(ConodeError, match="broken.toml lacks 'secret_key'"):
        load_client_config(broken)
