"""The agent's state directory and settings: flags override the config file, which overrides defaults."""

from __future__ import annotations

from pathlib import Path

from conode.agent.daemon import AGENT_KEY_NAME, AgentConfig, default_node_name
from conode.cluster.keys import generate_key_pair, is_valid_public_key
from conode.errors import ConodeError
from conode.vm import layout
from conode.tomlfile import read_toml, write_toml

SETTINGS_NAME = "agent.toml"


def init_agent_state(state_dir: Path, name: str | None) -> tuple[str, str]:
    """Create keys and settings; return (node name, public key)."""
    node = name or default_node_name()
    keys = generate_key_pair(state_dir / "keys", AGENT_KEY_NAME)
    write_toml(state_dir / SETTINGS_NAME, {"name": node})
    return node, keys.public


def resolve_agent_config(state_dir: Path, config_file: Path | None, coordinator: str | None,
                         coordinator_key: str | None, cores: int | None, mem_mib: int | None,
                         owner_present: bool) -> AgentConfig:
    settings_path = state_dir / SETTINGS_NAME
    if not settings_path.exists():
        raise ConodeError(f"{state_dir} is not an agent state directory; run `conode agent init --state-dir "
                          f"{state_dir}` first")
    values = read_toml(settings_path)
    if config_file is not None:
        values.update(read_toml(config_file))
    coordinator = coordinator or values.get("coordinator")
    coordinator_key = coordinator_key or values.get("coordinator_key")
    if not coordinator:
        raise ConodeError("no coordinator endpoint: pass --coordinator tcp://HOST:PORT or set it in the config")
    if not coordinator_key or not is_valid_public_key(str(coordinator_key)):
        raise ConodeError("no valid coordinator key: pass --coordinator-key (as `coordinator init` printed it)")
    cores = int(cores if cores is not None else values.get("cores", 1))
    mem_mib = int(mem_mib if mem_mib is not None else values.get("mem", layout.DEFAULT_RAM_MIB))
    if cores < 1:
        raise ConodeError("--cores must be at least 1")
    if not layout.MIN_RAM_MIB <= mem_mib <= layout.MAX_RAM_MIB:
        raise ConodeError(f"--mem must be between {layout.MIN_RAM_MIB} and {layout.MAX_RAM_MIB} MiB")
    return AgentConfig(state_dir=state_dir, name=str(values.get("name") or default_node_name()),
                       coordinator=str(coordinator), coordinator_key=str(coordinator_key), cores=cores,
                       mem_mib=mem_mib, owner_present=owner_present)
