"""A real pool for tests: a coordinator and agents as separate processes, real guests.

By default every process runs on this machine and the coordinator listens on loopback. Given hosts (anything
with an ``address``, ``spawn`` and ``run``, such as the multi-host harness's test hosts in tests/multihost), the
coordinator and its admin CLI run on one host, listening on its address, and each agent on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Protocol

from conode.cache import cache_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host(Protocol):
    """Where a pool's process runs."""

    address: str

    def spawn(self, argv: list[str], **popen: Any) -> subprocess.Popen: ...

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess: ...


class ThisMachine:
    """Processes run here as they are, in their own process group; the coordinator listens on loopback."""

    address = "127.0.0.1"

    def spawn(self, argv: list[str], **popen: Any) -> subprocess.Popen:
        return subprocess.Popen(argv, start_new_session=True, **popen)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        return subprocess.run(argv, **kwargs)  # noqa: PLW1510  (the caller's check=)


THIS_MACHINE = ThisMachine()


class Pool:
    def __init__(self, root: Path, host: Host = THIS_MACHINE) -> None:
        """*host* runs the coordinator and the admin CLI."""
        self.root = root
        self.host = host
        self.agent_hosts: dict[str, Host] = {}
        self.state = root / "coordinator"
        self.port = free_port()
        self.endpoint = f"tcp://{host.address}:{self.port}"
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "HOME": str(home), "CONODE_CLIENT_CONFIG": str(self.state / "client.toml"),
                    "CONODE_CACHE_DIR": str(cache_dir()), "PYTHONUNBUFFERED": "1"}
        self.coordinator: subprocess.Popen | None = None
        self.agents: dict[str, subprocess.Popen] = {}
        self.cli("init", "--state-dir", str(self.state), "--bind", self.endpoint)
        self.server_key = (self.state / "keys" / "coordinator.public").read_text().strip()

    @classmethod
    @contextmanager
    def running(cls, root: Path, nodes: tuple[str, ...], timeout: float = 180) -> Iterator["Pool"]:
        """A coordinator and an agent per name in *nodes* on this machine, each with its guest ready; all
        stopped at the end."""
        pool = cls(root)
        pool.start_coordinator()
        for name in nodes:
            pool.add_agent(name)
        try:
            pool.wait_until(f"{len(nodes)} ready nodes", lambda: len(pool.ready_nodes()) == len(nodes), timeout)
            yield pool
        finally:
            pool.close()

    # --- processes ---------------------------------------------------------------------------------------
    def _spawn(self, host: Host, args: list[str], log: str) -> subprocess.Popen:
        with open(self.root / log, "ab") as out:
            return host.spawn(args, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def start_coordinator(self) -> None:
        self.coordinator = self._spawn(self.host, [sys.executable, "-m", "coordinator.cli", "serve", "--state-dir",
                                                   str(self.state)], "coordinator.log")

    def add_agent(self, name: str, *extra: str, enrol: bool = True, host: Host | None = None) -> subprocess.Popen:
        """Create, enrol and start an agent on *host* (default: the coordinator's); *extra* are agent flags
        (default: the owner is away)."""
        self.agent_hosts[name] = host or self.host
        directory = self.root / name
        subprocess.run([sys.executable, "-m", "conode.cli", "agent", "init", "--state-dir", str(directory),
                        "--name", name], env=self.env, capture_output=True, text=True, check=True)
        public = (directory / "keys" / "agent.public").read_text().strip()
        if enrol:
            self.cli("keys", "add", "--state-dir", str(self.state), "--role", "agent", name, public)
        return self.start_agent(name, *(extra or ("--owner", "away")))

    def start_agent(self, name: str, *extra: str) -> subprocess.Popen:
        process = self._spawn(self.agent_hosts.get(name, self.host),
                              [sys.executable, "-m", "conode.cli", "agent", "--state-dir", str(self.root / name),
                               "--coordinator", self.endpoint, "--coordinator-key", self.server_key, *extra],
                              f"{name}.log")
        self.agents[name] = process
        return process

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL a process group: the process and whatever it started."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        for process in [*self.agents.values(), self.coordinator]:
            if process is not None and process.poll() is None:
                self.kill(process)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- the admin CLI --------------------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = 60, **run: Any) -> subprocess.CompletedProcess:
        """Run the admin CLI; *run*: more of subprocess.run's arguments (cwd, input)."""
        result = self.host.run([sys.executable, "-m", "coordinator.cli", *args], env=self.env, capture_output=True,
                               timeout=timeout, check=False, **run)
        if check and result.returncode != 0:
            raise AssertionError(f"coordinator {' '.join(args)} failed ({result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def jobs(self) -> dict[int, dict]:
        return {j["id"]: j for j in json.loads(self.cli("jobs", "--json", "--limit", "1000").stdout)}

    def submit(self, *command: str, inputs: tuple[Path, ...] = (), outputs: tuple[str, ...] = ()) -> int:
        args = ["submit"]
        for path in inputs:
            args += ["--input", str(path)]
        for path in outputs:
            args += ["--output", path]
        return int(self.cli(*args, "--", *command).stdout.strip())

    def wait_until(self, what: str, predicate, timeout: float = 120, interval: float = 0.5):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except AssertionError:
                last = None
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}\n--- coordinator log ---\n{self.log('coordinator')[-3000:]}")

    def ready_nodes(self) -> list[str]:
        return [n["name"] for n in self.status()["nodes"] if n["speed"] > 0]
