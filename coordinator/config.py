"""Where the coordinator keeps its state, and the client configuration the admin CLI reads.

A client configuration is a small TOML file naming the coordinator's endpoint and public key and the key pair to
use: an admin's names the directory of its key files (``init`` writes it), a user's holds the pair itself
(``public_key``, ``secret_key``: one file, mode 0600, that an admin hands to the person, `coordinator user add`).
The CLI looks for it in ``--config``, then ``$CONODE_CLIENT_CONFIG``, then ``~/.config/conode/client.toml``; the
endpoint can be overridden by a flag or ``$CONODE_COORDINATOR``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from conode import shell
from conode.cache import config_dir
from conode.cluster.keys import KeyPair, is_valid_public_key, load_key_pair
from conode.errors import ConodeError
from conode.limits import (DEFAULT_CHECKPOINT_BUDGET_MIB, DEFAULT_CHECKPOINT_INTERVAL_S, MAX_CHECKPOINT_BUDGET_MIB,
                           MAX_CHECKPOINT_INTERVAL_S)
from conode.metrics import OFF as METRICS_OFF
from conode.tomlfile import create_private_toml, read_known
from coordinator.identity import DEFAULT_SUBNET
from coordinator.moves import OWNER_LOAD, OWNER_LOAD_PERSIST_S, OwnerLoadPolicy

DEFAULT_PORT = 7700
DEFAULT_BIND = f"tcp://127.0.0.1:{DEFAULT_PORT}"
SERVER_KEY_NAME = "coordinator"
ADMIN_KEY_NAME = "admin"
RELAY_OFF = "off"
MAX_OWNER_LOAD = 1024.0  # cores: more than any workstation has
MAX_OWNER_LOAD_S = 86400.0
PRIVATE_UMASK = 0o077  # what the coordinator creates is its own: directories 0700, files 0600
SETTINGS_KEYS = ["bind", "conet_relay", "conet_subnet", "metrics", "checkpoint_interval_s", "checkpoint_budget_mib",
                 "migrate_on_owner", "migrate_speedup", "migrate_owner_load",
                 "migrate_owner_load_s"]  # what coordinator.toml may hold
CLIENT_KEYS = ["endpoint", "server_public_key", "key_directory", "key_name", "public_key", "secret_key"]


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def database(self) -> Path:
        return self.root / "coordinator.db"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def chunks(self) -> Path:
        """The chunks of the pool's disk images (coordinator/images.py)."""
        return self.root / "chunks"

    @property
    def settings(self) -> Path:
        return self.root / "coordinator.toml"

    @property
    def client_config(self) -> Path:
        return self.root / "client.toml"

    def require(self) -> None:
        if not self.database.exists():
            raise ConodeError(f"{self.root} is not a coordinator state directory; create it with "
                              f"`{shell.command('coordinator', 'init', '--state-dir', self.root)}`")

    def make_private(self) -> None:
        """Directories 0700, and every file in them 0600: the database and its WAL and SHM files hold job
        inputs and outputs, the key files the coordinator's secret. Fixes a directory made by an older
        coordinator or under a loose umask."""
        for directory in (self.root, self.keys):
            if not directory.is_dir():
                continue
            try:
                os.chmod(directory, 0o700)
                for entry in os.scandir(directory):
                    if entry.is_file(follow_symlinks=False):
                        os.chmod(entry.path, 0o600)
            except OSError as exc:
                raise ConodeError(f"cannot make the coordinator state {directory} private: {exc.strerror}; "
                                  f"run the coordinator as the owner of that directory") from None

    def server_keys(self) -> KeyPair:
        return load_key_pair(self.keys, SERVER_KEY_NAME)

    def default_bind(self) -> str:
        return str(self._setting("bind", DEFAULT_BIND))

    def conet_relay(self, bind: str) -> str:
        """Where the conet relay listens (``conet_relay`` in coordinator.toml; "off": no relay): by default the
        control endpoint *bind*'s address, on the next port."""
        relay = self._setting("conet_relay", None)
        if relay is not None:
            return str(relay)
        match = re.fullmatch(r"(tcp://.+):(\d+|\*)", bind)
        if match is None:
            return RELAY_OFF
        port = match[2] if match[2] == "*" else str(int(match[2]) + 1)
        return f"{match[1]}:{port}"

    def conet_subnet(self) -> str:
        """The guests' own IPv4 subnet (``conet_subnet`` in coordinator.toml): guest-only, never routed."""
        return str(self._setting("conet_subnet", DEFAULT_SUBNET))

    def migrate_on_owner(self) -> bool:
        """Whether a guest whose workstation's owner returns moves to an idle one (``migrate_on_owner`` in
        coordinator.toml; default true); if not, or with no idle one, it is paused and vacated there."""
        value = self._setting("migrate_on_owner", True)
        if not isinstance(value, bool):
            raise ConodeError(f"migrate_on_owner in {self.settings} must be true or false")
        return value

    def migrate_speedup(self) -> float:
        """How much faster an idle node must run guests for a running one to move there (``migrate_speedup`` in
        coordinator.toml; 0, the default, never moves guests for speed: nodes' measured speeds are noisy)."""
        value = self._setting("migrate_speedup", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or value >= 1):
            raise ConodeError(f"migrate_speedup in {self.settings} must be 0 (off) or a ratio of at least 1")
        return float(value)

    def owner_load_policy(self) -> OwnerLoadPolicy:
        """When a workstation's owner's own CPU use moves its guests away: above ``migrate_owner_load`` cores
        (0: never) for ``migrate_owner_load_s`` seconds."""
        return OwnerLoadPolicy(self._number("migrate_owner_load", OWNER_LOAD, 0.0, MAX_OWNER_LOAD),
                               self._number("migrate_owner_load_s", OWNER_LOAD_PERSIST_S, 0.0, MAX_OWNER_LOAD_S))

    def metrics(self) -> str:
        """Where the Prometheus endpoint listens (``metrics`` in coordinator.toml, conode/metrics.py): off by
        default."""
        return str(self._setting("metrics", METRICS_OFF))

    @property
    def checkpoints(self) -> Path:
        """Running jobs' checkpoint chains (coordinator/checkpoints.py)."""
        return self.root / "checkpoints"

    def checkpoint_interval_s(self) -> float:
        """Seconds between a running job's checkpoints (``checkpoint_interval_s``; 0: none)."""
        return self._number("checkpoint_interval_s", DEFAULT_CHECKPOINT_INTERVAL_S, 0.0, MAX_CHECKPOINT_INTERVAL_S)

    def checkpoint_budget_mib(self) -> int:
        """The disk all checkpoints together may take (``checkpoint_budget_mib``)."""
        return int(self._number("checkpoint_budget_mib", DEFAULT_CHECKPOINT_BUDGET_MIB, 0, MAX_CHECKPOINT_BUDGET_MIB))

    def _number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._setting(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConodeError(f"{key} in {self.settings} is {value!r}; set it to a number from {low:g} to {high:g}")
        return float(value)

    def _setting(self, key: str, default: object) -> object:
        return read_known(self.settings, SETTINGS_KEYS).get(key, default) if self.settings.exists() else default


@dataclass(frozen=True)
class ClientConfig:
    endpoint: str
    server_public_key: str
    keys: KeyPair


def user_client_config_path() -> Path:
    """The platform's per-user configuration directory (on Linux ~/.config/conode, or under $XDG_CONFIG_HOME)."""
    return config_dir() / "client.toml"


def client_config_path(path: Path | None) -> Path:
    """The configuration asked for: --config, else $CONODE_CLIENT_CONFIG, else the user's. One that was named
    and is missing is an error, never silently replaced by the next."""
    env = os.environ.get("CONODE_CLIENT_CONFIG")
    named = path or (Path(env) if env else None)
    if named is not None:
        if not named.exists():
            origin = "--config" if path else "CONODE_CLIENT_CONFIG"
            raise ConodeError(f"client configuration {named} (from {origin}) does not exist; give the client.toml "
                              f"`coordinator init` wrote")
        return named
    if not user_client_config_path().exists():
        raise ConodeError(f"no client configuration: {user_client_config_path()} does not exist; run `coordinator "
                          f"init`, or point --config or CONODE_CLIENT_CONFIG at the client.toml it wrote")
    return user_client_config_path()


def load_client_config(path: Path | None = None, endpoint: str | None = None) -> ClientConfig:
    """Find and read the client CLI's configuration."""
    chosen = client_config_path(path)
    values = read_known(chosen, CLIENT_KEYS)
    try:
        if "secret_key" in values or "public_key" in values:
            keys = KeyPair(values["public_key"], values["secret_key"])
            if not is_valid_public_key(keys.public) or not is_valid_public_key(keys.secret):
                raise ConodeError(f"client configuration {chosen}: public_key and secret_key must be CURVE keys "
                                  f"(40 Z85 characters each); ask your admin for the file again")
        else:
            keys = load_key_pair(Path(values["key_directory"]), values.get("key_name", ADMIN_KEY_NAME))
        return ClientConfig(
            endpoint=endpoint or os.environ.get("CONODE_COORDINATOR") or values["endpoint"],
            server_public_key=values["server_public_key"],
            keys=keys,
        )
    except KeyError as exc:
        raise ConodeError(f"client configuration {chosen} lacks {exc}") from None


def write_user_client_config(path: Path, endpoint: str, server_public_key: str, keys: KeyPair) -> None:
    """Create the client configuration of a user: the coordinator's endpoint and key, and the user's own key pair,
    in a new file of mode 0600."""
    create_private_toml(path, {"endpoint": endpoint, "server_public_key": server_public_key,
                               "public_key": keys.public, "secret_key": keys.secret})
