"""The agent's state directory and settings: flags override the config file, which overrides defaults.

Every key a settings file may hold is listed here with its type; a key that is not (a typo, a setting of another
version) is an error that names it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conode import shell
from conode.agent.conet import DEFAULT_LISTEN, OFF
from conode.agent.owner import AUTO, FIXED_SOURCES
from conode.cluster.keys import generate_key_pair, is_valid_public_key
from conode.errors import ConodeError
from conode.idle.policy import PolicyConfig, TimeWindow
from conode.limits import (DEFAULT_GUEST_MEM_MIB, DEFAULT_IMAGE_CACHE_MIB, MAX_GUEST_MEM_MIB, MAX_IMAGE_CACHE_MIB,
                           MIN_GUEST_MEM_MIB)
from conode.metrics import OFF as METRICS_OFF
from conode.metrics import Address, parse_address
from conode.tomlfile import read_known, write_toml

SETTINGS_NAME = "agent.toml"
AGENT_KEY_NAME = "agent"
IDLE_SOURCES = (AUTO, *FIXED_SOURCES)  # or file:PATH
PAUSE, SHUTDOWN = "pause", "shutdown"  # what idle guests do while the owner works
WHILE_OWNER = (PAUSE, SHUTDOWN)
POLICY_FIELDS = [f.name for f in dataclasses.fields(PolicyConfig) if f.name != "windows"]
# The agent's own keys and the Python type each takes (the policy's are all numbers but one).
AGENT_KEYS: dict[str, type] = {"name": str, "coordinator": str, "coordinator_key": str, "cores": int, "mem": int,
                               "idle_source": str, "while_owner": str, "cpu_cap": float, "conet_listen": str,
                               "image_cache_mib": int, "idle_reports": str, "metrics": str,
                               "migrate_max_mib_s": float, "owner_cgroup": str}
WINDOWS_KEY = "windows"  # [[windows]] tables: when guests may run (start, end, days)
KNOWN_KEYS = [*AGENT_KEYS, *POLICY_FIELDS, WINDOWS_KEY]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_SETS = {"weekdays": WEEKDAYS[:5], "weekends": WEEKDAYS[5:], "every day": WEEKDAYS}  # days = "weekdays"
MAX_WINDOWS = 64


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    name: str
    coordinator: str
    coordinator_key: str
    cores: int
    mem_mib: int
    idle_source: str = AUTO  # auto | away | present | file:PATH
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    while_owner: str = PAUSE  # keep guests paused while the owner works, or shut them down
    cpu_cap: float = 100.0  # percent of a core each guest may use
    conet_listen: str = DEFAULT_LISTEN  # the conet switch's endpoint for other agents, or "off"
    image_cache_mib: int = DEFAULT_IMAGE_CACHE_MIB  # what the pool's images may take on this disk
    idle_reports: Path | None = None  # where desktop sessions report their input (conode/idle/report.py)
    metrics: Address | None = None  # where the Prometheus endpoint listens; None: off
    migrate_max_mib_s: float = 0.0  # what a guest moving away may send per second (0: as fast as the link goes)
    owner_cgroup: Path | None = None  # the owner's session's cgroup: its CPU is the owner load (None: all but ours)

    @property
    def shutdown_while_owner(self) -> bool:
        return self.while_owner == SHUTDOWN


def default_node_name() -> str:
    return socket.gethostname().split(".")[0] or "node"


def init_agent_state(state_dir: Path, name: str | None) -> tuple[str, str]:
    """Create keys and settings; return (node name, public key)."""
    node = name or default_node_name()
    keys = generate_key_pair(state_dir / "keys", AGENT_KEY_NAME)
    write_toml(state_dir / SETTINGS_NAME, {"name": node})
    return node, keys.public


def _typed(values: dict[str, Any], key: str, default: Any) -> Any:
    """The value of *key* converted to its type, or a clear error saying which type it needs."""
    if key not in values:
        return default
    value, kind = values[key], AGENT_KEYS[key]
    if kind is str and isinstance(value, str):
        return value
    if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is int and value != int(value):
            raise ConodeError(f"setting {key} must be a whole number, not {value!r}")
        return kind(value)
    need = {str: "text", int: "a whole number", float: "a number"}[kind]
    raise ConodeError(f"setting {key} must be {need}, not {value!r}"[:300])


def _minute(text: Any, what: str) -> int:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text) if isinstance(text, str) else None
    if not match or int(match.group(1)) > 24 or int(match.group(2)) > 59 or \
            (int(match.group(1)) == 24 and int(match.group(2)) > 0):
        raise ConodeError(f"time window {what} must be a time of day as \"HH:MM\" (00:00 to 24:00), not {text!r}"[:300])
    return int(match.group(1)) * 60 + int(match.group(2))


def _windows(value: Any) -> tuple[TimeWindow, ...]:
    """``[[windows]]`` tables (start = "18:00", end = "07:30", days = ["mon", ...] or "weekdays", "weekends",
    "every day"): when guests may run. A window that ends at or before its start runs past midnight; the same
    start and end (say "00:00" both) is the whole day."""
    if not isinstance(value, list) or len(value) > MAX_WINDOWS or not all(isinstance(w, dict) for w in value):
        raise ConodeError(f"windows must be up to {MAX_WINDOWS} [[windows]] tables with start, end and days")
    windows = []
    for table in value:
        unknown = set(table) - {"start", "end", "days"}
        if unknown or "start" not in table or "end" not in table:
            raise ConodeError(f"a [[windows]] table takes start, end and days (got {', '.join(sorted(table))})"[:300])
        days = table.get("days", list(WEEKDAYS))
        if isinstance(days, str) and days in DAY_SETS:
            days = list(DAY_SETS[days])
        if not isinstance(days, list) or not days or any(day not in WEEKDAYS for day in days):
            raise ConodeError(f"time window days must be {', '.join(f'{name!r}' for name in DAY_SETS)} or a list "
                              f"of {', '.join(WEEKDAYS)}")
        windows.append(TimeWindow(_minute(table["start"], "start"), _minute(table["end"], "end"),
                                  frozenset(WEEKDAYS.index(day) for day in days)))
    return tuple(windows)


def _policy(values: dict[str, Any]) -> PolicyConfig:
    chosen: dict[str, Any] = {}
    if WINDOWS_KEY in values:
        chosen[WINDOWS_KEY] = _windows(values[WINDOWS_KEY])
    for name in POLICY_FIELDS:
        if name not in values:
            continue
        value = values[name]
        if name == "allow_on_battery":
            if not isinstance(value, bool):
                raise ConodeError("setting allow_on_battery must be true or false")
            chosen[name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            chosen[name] = float(value)
        else:
            raise ConodeError(f"setting {name} must be a non-negative number")
    try:
        return PolicyConfig(**chosen)
    except ValueError as exc:
        raise ConodeError(f"owner policy: {exc}") from None


def resolve_agent_config(state_dir: Path, config_file: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    settings_path = state_dir / SETTINGS_NAME
    if not settings_path.exists():
        init = shell.command("conode", "agent", "init", "--state-dir", state_dir)
        raise ConodeError(f"{state_dir} is not an agent state directory; run `{init}` first")
    values = read_known(settings_path, KNOWN_KEYS)
    if config_file is not None:
        values.update(read_known(config_file, KNOWN_KEYS))
    values.update({key: value for key, value in overrides.items() if value is not None})
    if not values.get("coordinator"):
        raise ConodeError("no coordinator endpoint: pass --coordinator tcp://HOST:PORT or set it in the config")
    if not is_valid_public_key(str(values.get("coordinator_key", ""))):
        raise ConodeError("no valid coordinator key: pass --coordinator-key (as `coordinator init` printed it)")
    cores = _typed(values, "cores", 1)
    mem_mib = _typed(values, "mem", DEFAULT_GUEST_MEM_MIB)
    cpu_cap = _typed(values, "cpu_cap", 100.0)
    idle_source = _typed(values, "idle_source", AUTO)
    while_owner = _typed(values, "while_owner", PAUSE)
    if cores < 1:
        raise ConodeError("--cores must be at least 1")
    if not MIN_GUEST_MEM_MIB <= mem_mib <= MAX_GUEST_MEM_MIB:
        raise ConodeError(f"--mem must be between {MIN_GUEST_MEM_MIB} and {MAX_GUEST_MEM_MIB} MiB")
    if not 1.0 <= cpu_cap <= 100.0:
        raise ConodeError("--cpu-cap must be between 1 and 100 (percent of a core)")
    if idle_source not in IDLE_SOURCES and not idle_source.startswith("file:"):
        raise ConodeError(f"--idle-source must be {', '.join(IDLE_SOURCES)} or file:PATH")
    conet_listen = _typed(values, "conet_listen", DEFAULT_LISTEN)
    if conet_listen != OFF and not re.fullmatch(r"tcp://[^:/\s]+:(\d{1,5}|\*)", conet_listen):
        raise ConodeError(f"--conet-listen must be tcp://ADDRESS:PORT or off, not {conet_listen!r}"[:300])
    image_cache_mib = _typed(values, "image_cache_mib", DEFAULT_IMAGE_CACHE_MIB)
    if not 0 <= image_cache_mib <= MAX_IMAGE_CACHE_MIB:
        raise ConodeError(f"--image-cache must be between 0 and {MAX_IMAGE_CACHE_MIB} MiB")
    if while_owner not in WHILE_OWNER:
        raise ConodeError(f"--while-owner must be {' or '.join(WHILE_OWNER)}")
    idle_reports = _typed(values, "idle_reports", "")
    metrics = parse_address(_typed(values, "metrics", METRICS_OFF))
    migrate_max_mib_s = _typed(values, "migrate_max_mib_s", 0.0)
    if not 0.0 <= migrate_max_mib_s <= 1e6:
        raise ConodeError("migrate_max_mib_s must be from 0 (no limit) to 1000000 MiB/s")
    owner_cgroup = _typed(values, "owner_cgroup", "")
    if owner_cgroup and not (Path(owner_cgroup) / "cpu.stat").is_file():
        raise ConodeError(f"owner_cgroup must be a cgroup v2 directory (with a cpu.stat), not {owner_cgroup!r}"[:300])
    return AgentConfig(state_dir=state_dir, name=_typed(values, "name", "") or default_node_name(),
                       coordinator=str(values["coordinator"]), coordinator_key=str(values["coordinator_key"]),
                       cores=cores, mem_mib=mem_mib, idle_source=idle_source, policy=_policy(values),
                       while_owner=while_owner, cpu_cap=cpu_cap, conet_listen=conet_listen,
                       image_cache_mib=image_cache_mib,
                       idle_reports=Path(idle_reports) if idle_reports else None, metrics=metrics,
                       migrate_max_mib_s=migrate_max_mib_s, owner_cgroup=Path(owner_cgroup) if owner_cgroup else None)
