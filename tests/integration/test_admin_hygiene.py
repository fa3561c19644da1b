# SPDX-License-Identifier: GPL-2.0-or-later
"""Admin hygiene through the real CLIs and real processes: commands printed for pasting work when pasted into a
shell, missing configuration files and unknown keys are errors that name them, a wrong coordinator key is
reported within seconds, unknown node names are refused, down nodes stay visible until forgotten, and the tables
carry their units."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from pool import free_port
from test_coordinator_cli_limits import cli, one_error_line
from test_coordinator_robustness import Link, running_coordinator

from conode.cluster import protocol
from conode.cluster.keys import KeyPair
from conode.tomlfile import read_toml, write_toml

WRONG_KEY_REPORTED_S = 10.0  # "within seconds": the handshake fails on the first try, ZeroMQ retries every 0.1 s


@pytest.fixture
def coordinator(tmp_path):
    with running_coordinator(tmp_path) as c:
        yield c


def scripted_node(coordinator, name: str, idle_s: float = 10.0, speed: float = 850.0) -> Link:
    """An enrolled node *name* that has said hello (a real CURVE socket speaking the protocol)."""
    public, secret = zmq.curve_keypair()
    coordinator.cli("keys", "add", "--state-dir", str(coordinator.state), "--role", "agent", "--", name,
                    public.decode())
    link = Link(coordinator, KeyPair(public.decode(), secret.decode()))
    welcome = link.ask(protocol.encode("hello", node=name, cores=2, mem_mib=256, speed=speed, state="Unclaimed",
                                       idle_s=idle_s, running=[], software="scripted"))
    assert welcome["type"] == "welcome"
    return link


@contextlib.contextmanager
def beating(links: dict[str, tuple[Link, float, float]]):
    """Keep scripted nodes (name: link, idle_s, speed) alive with a heartbeat every half second, as an agent
    would, however slowly the CLI runs on a loaded machine."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(0.5):
            for name, (link, idle_s, speed) in links.items():
                link.send(protocol.encode("heartbeat", node=name, state="Unclaimed", idle_s=idle_s, running=[],
                                          speed=speed, cpu_percent=0.0))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def stop(process: subprocess.Popen) -> str:
    """SIGTERM the process group, SIGKILL if it lingers; its output."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
    return out.decode(errors="replace") if out else ""


def scratch_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "PYTHONUNBUFFERED": "1"}
    for name in ("CONODE_CLIENT_CONFIG", "CONODE_COORDINATOR"):
        env.pop(name, None)
    return env


def printed(out: str, start: str) -> str:
    """The printed command that begins with *start* (after its label, if the line has one)."""
    return next(line[line.index(start):] for line in out.splitlines() if start in line)


# --- printed commands ----------------------------------------------------------------------------------------
def test_printed_commands_work_when_pasted_into_a_shell(tmp_path):
    """A state directory full of shell characters, and keys that (as Z85 does) may hold more: every command
    `coordinator init` and `conode agent init` print runs as printed, with only its placeholders filled in."""
    env = scratch_env(tmp_path)
    weird = tmp_path / "it's a $HOME `x` & (dir)"
    state, agent_dir = weird / "coordinator", weird / "agent one"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", "init", "--state-dir", str(state),
                          "--bind", endpoint], env=env, capture_output=True, text=True, check=True).stdout
    serve = subprocess.Popen(["sh", "-c", printed(out, "coordinator serve")], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    agent = None
    try:
        init_agent = printed(out, "conode agent init").replace("DIR", shlex.quote(str(agent_dir)))
        agent_out = subprocess.run(["sh", "-c", init_agent], env=env, capture_output=True, text=True, check=True)
        enrol = printed(agent_out.stdout, "coordinator keys add").replace("STATE", shlex.quote(str(state)))
        subprocess.run(["sh", "-c", enrol], env=env, capture_output=True, text=True, check=True)
        public = (agent_dir / "keys" / "agent.public").read_text().strip()
        listed = subprocess.run(["coordinator", "keys", "list", "--state-dir", str(state)], env=env,
                                capture_output=True, text=True, check=True).stdout
        assert public in listed
        run_agent = printed(out, "conode agent --state-dir").replace("DIR", shlex.quote(str(agent_dir)), 1)
        assert "--coordinator-key" in run_agent
        agent = subprocess.Popen(["sh", "-c", run_agent + " --owner present"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        node = read_toml(agent_dir / "agent.toml")["name"]
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run(["coordinator", "status", "--json"], env=env, capture_output=True, text=True,
                                  check=False)
            if done.returncode == 0 and node in [n["name"] for n in json.loads(done.stdout)["nodes"]]:
                break
            assert agent.poll() is None and serve.poll() is None, "a pasted command exited"
            assert time.monotonic() < deadline, f"the pasted agent never joined: {done.stderr}"
            time.sleep(0.5)
    finally:
        agent_log = stop(agent) if agent is not None else ""
        serve_log = stop(serve)
    assert "Traceback" not in agent_log + serve_log


# --- configuration files -------------------------------------------------------------------------------------
def test_a_missing_config_file_is_an_error_naming_it(coordinator, tmp_path):
    missing = tmp_path / "no such.toml"
    # The per-user client.toml `init` wrote exists, yet the file asked for is never silently replaced by it.
    line = one_error_line(cli(coordinator, "status", "--config", str(missing)))
    assert f"client configuration {missing} (from --config) does not exist" in line
    env = {**coordinator.env, "CONODE_CLIENT_CONFIG": str(missing)}
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "jobs"], env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2 and f"{missing} (from CONODE_CLIENT_CONFIG) does not exist" in done.stderr
    agent_dir = tmp_path / "agent"
    subprocess.run([sys.executable, "-m", "conode.cli", "agent", "init", "--state-dir", str(agent_dir)],
                   env=coordinator.env, check=True, capture_output=True)
    done = subprocess.run([sys.executable, "-m", "conode.cli", "agent", "--state-dir", str(agent_dir), "--config",
                           str(missing), "--coordinator", coordinator.endpoint, "--coordinator-key",
                           coordinator.server_public], env=coordinator.env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and f"configuration file {missing} does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_keys_in_every_toml_file_are_errors_naming_key_and_file(coordinator, tmp_path):
    client = dict(read_toml(coordinator.state / "client.toml"))
    typo = tmp_path / "client.toml"
    write_toml(typo, {**client, "key_nmae": "admin"})
    line = one_error_line(cli(coordinator, "status", "--config", str(typo)))
    assert f"{typo}: unknown setting 'key_nmae'; did you mean 'key_name'?" in line

    settings = coordinator.state / "coordinator.toml"
    write_toml(settings, {**read_toml(settings), "conet_subnt": "10.9.0.0/16"})
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--state-dir", str(coordinator.state),
                           "--bind", f"tcp://127.0.0.1:{free_port()}"], env=coordinator.env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert f"{settings}: unknown setting 'conet_subnt'; did you mean 'conet_subnet'?" in done.stderr

    agent_dir = tmp_path / "agent"
    subprocess.run([sys.executable, "-m", "conode.cli", "agent", "init", "--state-dir", str(agent_dir)],
                   env=coordinator.env, check=True, capture_output=True)
    agent_config = tmp_path / "agent-extra.toml"
    write_toml(agent_config, {"croes": 2})
    done = subprocess.run([sys.executable, "-m", "conode.cli", "agent", "--state-dir", str(agent_dir), "--config",
                           str(agent_config), "--coordinator", coordinator.endpoint, "--coordinator-key",
                           coordinator.server_public], env=coordinator.env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0 and f"{agent_config}: unknown setting 'croes'; did you mean 'cores'?" in done.stderr


# --- a wrong coordinator key ---------------------------------------------------------------------------------
def test_a_wrong_coordinator_key_is_reported_within_seconds(coordinator, tmp_path):
    wrong = zmq.curve_keypair()[0].decode()
    agent_dir = tmp_path / "agent"
    subprocess.run([sys.executable, "-m", "conode.cli", "agent", "init", "--state-dir", str(agent_dir), "--name",
                    "desk"], env=coordinator.env, check=True, capture_output=True)
    coordinator.cli("keys", "add", "--state-dir", str(coordinator.state), "--role", "agent", "--", "desk",
                    (agent_dir / "keys" / "agent.public").read_text().strip())
    agent = subprocess.Popen([sys.executable, "-m", "conode.cli", "agent", "--state-dir", str(agent_dir),
                              "--coordinator", coordinator.endpoint, "--coordinator-key", wrong, "--owner", "present"],
                             env=coordinator.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        started = time.monotonic()
        status = None
        while time.monotonic() - started < WRONG_KEY_REPORTED_S:
            done = subprocess.run([sys.executable, "-m", "conode.cli", "status", "--state-dir", str(agent_dir)],
                                  env=coordinator.env, capture_output=True, text=True, timeout=60, check=False)
            if "coordinator key given is most likely wrong" in done.stdout:
                status = done.stdout
                break
            assert agent.poll() is None, "the agent exited"
            time.sleep(0.5)
        assert status is not None, f"no word of the wrong key within {WRONG_KEY_REPORTED_S} s"
        assert "not connected" in status and "problem:" in status
    finally:
        log = stop(agent)
    assert re.search(r"ERROR the encrypted handshake with tcp://127\.0\.0\.1:\d+ fails: the coordinator key given "
                     r"is most likely wrong", log), log[-2000:]
    assert log.count("handshake with") == 1  # said once, not at every retry
    assert "desk" not in [n["name"] for n in coordinator.status()["nodes"]]

    # The admin CLI with a wrong key says the same at once, instead of waiting for a reply that cannot come.
    client = tmp_path / "wrong-key.toml"
    write_toml(client, {**read_toml(coordinator.state / "client.toml"), "server_public_key": wrong})
    began = time.monotonic()
    line = one_error_line(cli(coordinator, "status", "--config", str(client)))
    assert "coordinator key given is most likely wrong" in line and "server_public_key" in line
    assert time.monotonic() - began < WRONG_KEY_REPORTED_S


# --- nodes by name -------------------------------------------------------------------------------------------
def test_unknown_node_names_are_refused(coordinator):
    link = scripted_node(coordinator, "node-a")
    try:
        for args in (["drain", "node-x"], ["drain", "--undo", "node-x"], ["forget", "node-x"]):
            line = one_error_line(cli(coordinator, *args))
            assert "no node named 'node-x'" in line, (args, line)
        assert "did you mean 'node-a'?" in one_error_line(cli(coordinator, "drain", "node-x"))
        # A node enrolled but not yet connected may be drained before it first joins, and undrained again.
        public = zmq.curve_keypair()[0].decode()
        coordinator.cli("keys", "add", "--state-dir", str(coordinator.state), "--role", "agent", "--", "later",
                        public)
        assert cli(coordinator, "drain", "later").returncode == 0
        assert cli(coordinator, "drain", "--undo", "later").returncode == 0
        assert cli(coordinator, "drain", "node-a").returncode == 0
        # An up node cannot be forgotten (said hello again: it may have been lost meanwhile, as it did not beat).
        link.ask(protocol.encode("hello", node="node-a", cores=2, mem_mib=256, speed=850.0, state="Unclaimed",
                                 idle_s=1.0, running=[], software="scripted"))
        with beating({"node-a": (link, 1.0, 850.0)}):
            assert "node node-a is up" in one_error_line(cli(coordinator, "forget", "node-a"))
    finally:
        link.close()


def test_down_nodes_stay_in_status_until_forgotten(coordinator):
    link = scripted_node(coordinator, "node-a")
    try:
        link.send(protocol.encode("bye", node="node-a"))
        deadline = time.monotonic() + 10
        while not coordinator.status().get("down"):
            assert time.monotonic() < deadline, "the node that left is not shown as down"
            time.sleep(0.1)
        reply = json.loads(cli(coordinator, "status", "--json").stdout)
        assert reply["nodes"] == [] and reply["totals"]["nodes"] == 0
        (down,) = reply["down"]
        assert down["name"] == "node-a" and down["why"] == "node said goodbye" and abs(down["since"] - time.time()) < 30
        table = cli(coordinator, "status").stdout.decode()
        row = next(line for line in table.splitlines() if line.startswith("node-a"))
        assert re.search(r"down since \d{4}-\d\d-\d\d \d\d:\d\d \(\d+s ago\): node said goodbye", row), row
        assert "1 down" in table
        assert cli(coordinator, "drain", "node-a").returncode == 0  # a down node is still a node
        # Back again: up, not down.
        link.ask(protocol.encode("hello", node="node-a", cores=2, mem_mib=256, speed=850.0, state="Unclaimed",
                                 idle_s=1.0, running=[], software="scripted"))
        status = coordinator.status()
        assert [n["name"] for n in status["nodes"]] == ["node-a"] and status["down"] == []
        link.send(protocol.encode("bye", node="node-a"))
        deadline = time.monotonic() + 10
        while not coordinator.status().get("down"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        done = cli(coordinator, "forget", "node-a")
        assert done.returncode == 0 and b"node node-a forgotten" in done.stdout
        assert coordinator.status()["down"] == []
        assert "node-a" not in cli(coordinator, "status").stdout.decode()
    finally:
        link.close()


# --- units ---------------------------------------------------------------------------------------------------
def test_status_table_has_units_and_says_forever(coordinator):
    nodes = {"never-touched": (1e9, 123_456.0), "desk": (187.0, 850.0)}
    links = {name: (scripted_node(coordinator, name, idle, speed), idle, speed)
             for name, (idle, speed) in nodes.items()}
    try:
        for name, (link, idle, speed) in links.items():  # up again if lost while the other was enrolled
            link.ask(protocol.encode("hello", node=name, cores=2, mem_mib=256, speed=speed, state="Unclaimed",
                                     idle_s=idle, running=[], software="scripted"))
        with beating(links):
            table = cli(coordinator, "status").stdout.decode()
        rows = {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}
        assert re.search(r"2\s+256 MiB\s+123k loops/s\s+-\s+forever\s+-$", rows["never-touched"]), table
        assert re.search(r"850 loops/s\s+-\s+3m07s\s+-$", rows["desk"]), table
        assert "277777h" not in table and "512 MiB;" in table
    finally:
        for link, _, _ in links.values():
            link.close()
