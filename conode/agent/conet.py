"""The agent's side of conet: its switch process, the guests' ports on it, and the peers it may talk to.

The switch runs in a process of its own (``python -m conode.conet.switchd``) so that guest traffic, however
heavy, never delays the agent's control loop, its heartbeats or the owner's yield. The agent feeds it: a port
for each guest it runs (a one-time token the guest's worker presents on the port socket, bound to the guest's
MAC, address and network), and the peer switches the coordinator names. If the switch cannot start (its port
is taken, say) the agent runs on without conet: guests then have no carrier, and the reason is logged once.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from conode.agent.pipe import PipeError
from conode.agent.supervisor import WorkerProcess
from conode.agent.wake import Signal

log = logging.getLogger("conode.agent")

DEFAULT_LISTEN = "tcp://0.0.0.0:7704"
OFF = "off"
READY_TIMEOUT_S = 10.0
RESTART_DELAY_S = 5.0
STATS_EVERY_S = 2.0  # how often the switch is asked for its counters (shown in status.json)
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
PORT_FIELDS = ("mac", "ip", "network")  # what the switch binds a guest's port to


def advertised(listen: str, coordinator: str) -> str:
    """The endpoint peers reach this switch at: *listen* itself, or, for a wildcard address, the address this
    host uses to reach the coordinator (the interface the pool is on)."""
    parts = urlsplit(listen)
    if parts.hostname not in ("0.0.0.0", "*", None):
        return listen
    return f"tcp://{local_address(coordinator)}:{parts.port}"


def local_address(coordinator: str) -> str:
    """The address this host uses to reach the coordinator at *coordinator*: where the pool reaches it."""
    target = urlsplit(coordinator)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((target.hostname or "127.0.0.1", target.port or 7700))  # no packet is sent
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def relay_endpoint(relay: str, coordinator: str) -> str:
    """The relay's endpoint as this agent reaches it: a wildcard address is the coordinator's own host."""
    parts = urlsplit(relay)
    if parts.hostname not in ("0.0.0.0", "*", None):
        return relay
    return f"tcp://{urlsplit(coordinator).hostname or '127.0.0.1'}:{parts.port}"


def port_socket_path(state_dir: Path) -> Path:
    path = state_dir / "conet.sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.gettempdir()) / f"conode-conet-{os.getpid()}.sock"


def worker_identity(net: dict[str, Any]) -> dict[str, Any]:
    """A run_job message's ``net`` as the worker takes it: the identity, hosts as a name → address map in rank
    order (the network is the switch's business, not the guest's)."""
    return {"mac": net["mac"], "ip": net["ip"], "prefix": net["prefix"], "hostname": net["hostname"],
            "hosts": {name: address for name, address in net["hosts"]}, "rank": net["rank"], "size": net["size"]}


class Unplugged:
    """No switch: a guest keeps its identity, and its NIC has no carrier."""

    def attach(self, guest: int, net: dict[str, Any]) -> dict[str, Any]:
        return worker_identity(net)

    def plug(self, guest: int, port: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def port_of(self, guest: int) -> dict[str, Any] | None:
        return None

    def detach(self, guest: int) -> None:
        pass


class ConetSwitch:
    """The agent's switch process and the state it must be given again if it is restarted."""

    def __init__(self, state_dir: Path, listen: str, coordinator: str, keys_dir: Path,
                 signal: Callable[[], Signal], clock: Callable[[], float] = time.monotonic,
                 coordinator_key: str = "") -> None:
        self.listen = listen
        self.socket_path = port_socket_path(state_dir)
        self._coordinator, self._coordinator_key = coordinator, coordinator_key
        self._keys_dir = keys_dir
        self._signal = signal
        self._clock = clock
        self._process: WorkerProcess | None = None
        self._ports: dict[int, dict[str, Any]] = {}  # guest -> its port message
        self._peers: list[dict[str, Any]] = []
        self._relay: str | None = None  # the coordinator's relay, as this agent reaches it
        self.endpoint: str | None = None  # what peers connect to, once the switch is up
        self.problem: str | None = None  # why there is no switch, if there is none
        self._restart_at = 0.0
        self._stats_at = 0.0
        self.stats: dict[str, Any] = {}

    @property
    def enabled(self) -> bool:
        return self.listen != OFF

    def pids(self) -> set[int]:
        """The switch's process, if it runs (its CPU is conode's, not the owner's)."""
        return {self._process.pid} if self._process is not None else set()

    # --- the process --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the switch and wait until it listens; on failure, say why and carry on without it."""
        if not self.enabled:
            return
        args = [sys.executable, "-m", "conode.conet.switchd", "--ports", str(self.socket_path),
                "--listen", self.listen, "--keys", str(self._keys_dir)]
        self._process = WorkerProcess(-1, args, self._signal, label="conet switch")
        deadline = self._clock() + READY_TIMEOUT_S
        while self._clock() < deadline and self.endpoint is None:
            if self._process.exit_code() is not None and self._process.drained():
                break
            self.pump()
            time.sleep(0.02)
        if self.endpoint is None:
            tail = "; ".join(self._process.stderr_tail) or "no reason given"
            self._fail(f"the conet switch did not start ({tail[-300:]})")
            return
        self.problem = None
        for message in self._ports.values():
            self._process.send(message)
        self._process.send(self._peers_message())
        log.info("conet switch listening at %s (ports at %s)", self.endpoint, self.socket_path)

    def _fail(self, why: str) -> None:
        if why != self.problem:
            log.warning("%s; guests run without a network until it does", why)
        self.problem = why
        if self._process is not None:
            self._process.kill()
        self._process = None
        self.endpoint = None
        self._restart_at = self._clock() + RESTART_DELAY_S

    def pump(self) -> None:
        """Take what the switch said; restart it (after a pause) if it died."""
        process = self._process
        if process is None:
            if self.enabled and self.problem is not None and self._clock() >= self._restart_at:
                self.start()
            return
        try:
            for message in process.messages():
                if message.get("type") == "ready" and isinstance(message.get("endpoint"), str):
                    self.endpoint = advertised(message["endpoint"], self._coordinator)
                elif message.get("type") == "stats":
                    self.stats = {k: v for k, v in message.items() if k != "type"}
        except PipeError as exc:
            self._fail(f"the conet switch sent garbage ({exc})")
            return
        if process.exit_code() is not None and process.drained() and self.endpoint is not None:
            self._fail(f"the conet switch exited with status {process.exit_code()}")
        elif self.endpoint is not None and self._clock() >= self._stats_at:
            self._stats_at = self._clock() + STATS_EVERY_S
            process.send({"type": "stats"})

    def close(self) -> None:
        if self._process is not None:
            self._process.stop(timeout=2.0)
            self._process = None
        try:
            self.socket_path.unlink()
        except OSError:
            pass

    # --- ports and peers --------------------------------------------------------------------------------------
    def attach(self, guest: int, net: dict[str, Any]) -> dict[str, Any]:
        """Give *guest* a port for its identity *net* (from run_job); the worker's ``net`` (identity, and the
        token and socket when there is a switch)."""
        worker_net = worker_identity(net)
        plug = self.plug(guest, {name: net[name] for name in PORT_FIELDS})
        if plug is not None:
            worker_net.update(plug)
        return worker_net

    def plug(self, guest: int, port: dict[str, Any]) -> dict[str, Any] | None:
        """Give *guest* a port for *port* (its MAC, address and network: what port_of returned, for a guest
        resumed from disk); what its worker needs to join it ({token, socket}), or None without a switch."""
        if not self.enabled:
            return None
        token = os.urandom(16)
        message = {"type": "port", "token": token, **{name: port[name] for name in PORT_FIELDS},
                   "guest": str(guest)}
        self._ports[guest] = message
        if self._process is not None:
            self._process.send(message)
        return {"token": token, "socket": str(self.socket_path)}

    def port_of(self, guest: int) -> dict[str, Any] | None:
        """The identity *guest*'s port carries (mac, ip, network), for plugging it in again after a vacate."""
        message = self._ports.get(guest)
        return None if message is None else {name: message[name] for name in PORT_FIELDS}

    def detach(self, guest: int) -> None:
        message = self._ports.pop(guest, None)
        if message is not None and self._process is not None:
            self._process.send({"type": "unport", "token": message["token"]})

    def set_peers(self, peers: list[dict[str, Any]], relay: str | None = None) -> None:
        """The switches of the agents that share a network with this one's guests, and the coordinator's relay
        for those it cannot reach (from conet_peers)."""
        self._peers = list(peers)
        self._relay = relay_endpoint(relay, self._coordinator) if relay and self._coordinator_key else None
        if self._process is not None:
            self._process.send(self._peers_message())

    def _peers_message(self) -> dict[str, Any]:
        relay = {"relay": {"endpoint": self._relay, "key": self._coordinator_key}} if self._relay else {}
        return {"type": "peers", "peers": [{"agent": p["node"], "endpoint": p["endpoint"], "key": p["key"],
                                            **({"networks": p["networks"]} if "networks" in p else {})}
                                           for p in self._peers], **relay}
