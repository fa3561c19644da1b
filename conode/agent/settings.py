"""The agent's state directory and settings: flags override the config file, which overrides defaults."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from conode.agent.daemon import AGENT_KEY_NAME, AgentConfig, default_node_name
from conode.cluster.keys import generate_key_pair, is_valid_public_key
from conode.errors import ConodeError
from conode.idle.policy import PolicyConfig
from conode.tomlfile import read_toml, write_toml
from conode.vm import layout

SETTINGS_NAME = "agent.toml"
POLICY_FIELDS = [f.name for f in dataclasses.fields(PolicyConfig) if f.name != "windows"]


def init_agent_state(state_dir: Path, name: str | None) -> tuple[str, str]:
    """Create keys and settings; return (node name, public key)."""
    node = name or default_node_name()
    keys = generate_key_pair(state_dir / "keys", AGENT_KEY_NAME)
    write_toml(state_dir / SETTINGS_NAME, {"name": node})
    return node, keys.public


def _policy(values: dict[str, Any]) -> PolicyConfig:
    chosen: dict[str, Any] = {}
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
        raise ConodeError(f"{state_dir} is not an agent state directory; run `conode agent init --state-dir "
                          f"{state_dir}` first")
    values = read_toml(settings_path)
    if config_file is not None:
        values.update(read_toml(config_file))
    values.update({key: value for key, value in overrides.items() if value is not None})
    if not values.get("coordinator"):
        raise ConodeError("no coordinator endpoint: pass --coordinator tcp://HOST:PORT or set it in the config")
    if not is_valid_public_key(str(values.get("coordinator_key", ""))):
        raise ConodeError("no valid coordinator key: pass --coordinator-key (as `coordinator init` printed it)")
    cores = int(values.get("cores", 1))
    mem_mib = int(values.get("mem", layout.DEFAULT_RAM_MIB))
    cpu_cap = float(values.get("cpu_cap", 100.0))
    idle_source = str(values.get("idle_source", "auto"))
    while_owner = str(values.get("while_owner", "pause"))
    if cores < 1:
        raise ConodeError("--cores must be at least 1")
    if not layout.MIN_RAM_MIB <= mem_mib <= layout.MAX_RAM_MIB:
        raise ConodeError(f"--mem must be between {layout.MIN_RAM_MIB} and {layout.MAX_RAM_MIB} MiB")
    if not 1.0 <= cpu_cap <= 100.0:
        raise ConodeError("--cpu-cap must be between 1 and 100 (percent of a core)")
    if idle_source not in ("auto", "away", "present") and not idle_source.startswith("file:"):
        raise ConodeError("--idle-source must be auto, away, present or file:PATH")
    if while_owner not in ("pause", "shutdown"):
        raise ConodeError("--while-owner must be pause or shutdown")
    return AgentConfig(state_dir=state_dir, name=str(values.get("name") or default_node_name()),
                       coordinator=str(values["coordinator"]), coordinator_key=str(values["coordinator_key"]),
                       cores=cores, mem_mib=mem_mib, idle_source=idle_source, policy=_policy(values),
                       while_owner=while_owner, cpu_cap=cpu_cap)
