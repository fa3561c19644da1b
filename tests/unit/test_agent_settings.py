"""The agent's settings files and the TOML writer behind them."""

import pytest

from conode.agent.settings import SETTINGS_NAME, init_agent_state, resolve_agent_config
from conode.agent.status import json_safe
from conode.errors import ConodeError
from conode.limits import DEFAULT_GUEST_MEM_MIB, MAX_GUEST_MEM_MIB, MIN_GUEST_MEM_MIB
from conode.tomlfile import read_toml, write_toml

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 key: 40 characters


@pytest.fixture
def state(tmp_path):
    init_agent_state(tmp_path, "desk1")
    return tmp_path


def resolve(state, config=None, **overrides):
    base = {"coordinator": "tcp://127.0.0.1:7700", "coordinator_key": KEY}
    return resolve_agent_config(state, config, {**base, **overrides})


def test_defaults_and_overrides(state):
    config = resolve(state)
    assert (config.name, config.cores, config.mem_mib, config.cpu_cap) == ("desk1", 1, DEFAULT_GUEST_MEM_MIB, 100.0)
    assert resolve(state, cores=3, mem=MIN_GUEST_MEM_MIB).cores == 3


def test_a_config_file_with_a_typo_names_the_key(state, tmp_path):
    config = tmp_path / "site.toml"
    config.write_text('cores = 2\nstart_idel_s = 60\n')
    with pytest.raises(ConodeError, match="unknown setting 'start_idel_s'.*did you mean 'start_idle_s'"):
        resolve(state, config)
    (state / SETTINGS_NAME).write_text('name = "desk1"\n[policy]\nstart_idle_s = 60\n')
    with pytest.raises(ConodeError, match="unknown setting 'policy'"):
        resolve(state)


@pytest.mark.parametrize("line,message", [
    ('cores = "two"', "cores must be a whole number"), ("cores = 1.5", "whole number"),
    (f"mem = {MAX_GUEST_MEM_MIB + 1}", f"between {MIN_GUEST_MEM_MIB} and {MAX_GUEST_MEM_MIB}"),
    ("cpu_cap = true", "cpu_cap must be a number"), ('while_owner = "sleep"', "pause or shutdown"),
    ("allow_on_battery = 1", "true or false"), ("suspend_load = -1", "non-negative"),
    ("name = 7", "name must be text"),
])
def test_bad_values_are_clear_errors(state, tmp_path, line, message):
    config = tmp_path / "site.toml"
    config.write_text(line + "\n")
    with pytest.raises(ConodeError, match=message):
        resolve(state, config)


def test_a_config_that_is_not_toml_is_a_clear_error(state, tmp_path):
    config = tmp_path / "site.toml"
    config.write_bytes(b"cores = \xff\n")
    with pytest.raises(ConodeError, match="site.toml"):
        resolve(state, config)


def test_toml_round_trips_any_text_and_nested_tables(tmp_path):
    values = {"name": "bür\U0001F5A5 \"quoted\" \\ \u2028 tab\t", "jobs": [1, 2, 3], "nested": {"a": {"b": 1.5}}}
    path = tmp_path / "x.toml"
    write_toml(path, values)
    assert read_toml(path) == values
    assert not list(tmp_path.glob("*.tmp"))


def test_json_safe_replaces_every_non_finite_number():
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": (float("-inf"), 2)}], "d": "inf"}
    assert json_safe(value) == {"a": None, "b": [1.0, None, {"c": [None, 2]}], "d": "inf"}


def test_idle_reports_adds_the_sessions_source_to_auto(state, tmp_path):
    from conode.agent.owner import make_sources

    config = tmp_path / "site.toml"
    config.write_text(f'idle_reports = "{tmp_path}/idle"\n')
    chosen = resolve(state, config)
    assert chosen.idle_reports == tmp_path / "idle" and resolve(state).idle_reports is None
    assert "sessions" in [s.name for s in make_sources("auto", reports=chosen.idle_reports)]
    assert "sessions" not in [s.name for s in make_sources("auto")]


def test_time_windows_from_the_settings_file(state, tmp_path):
    from conode.idle.policy import TimeWindow

    config = tmp_path / "site.toml"
    config.write_text('[[windows]]\nstart = "18:30"\nend = "07:30"\ndays = ["mon", "fri"]\n\n'
                      '[[windows]]\nstart = "00:00"\nend = "24:00"\ndays = ["sat", "sun"]\n')
    windows = resolve(state, config).policy.windows
    assert windows == (TimeWindow(18 * 60 + 30, 7 * 60 + 30, frozenset({0, 4})), TimeWindow(0, 1440, frozenset({5, 6})))
    assert windows[0].contains(4, 23 * 60) and windows[0].contains(5, 60) and not windows[0].contains(5, 23 * 60)
    assert resolve(state).policy.windows == ()


@pytest.mark.parametrize("table, message", [
    ('start = "25:00"\nend = "07:00"', "time of day"),
    ('start = "18:00"\nend = "7"', "time of day"),
    ('start = "18:00"', "takes start, end and days"),
    ('start = "18:00"\nend = "07:00"\nday = ["mon"]', "takes start, end and days"),
    ('start = "18:00"\nend = "07:00"\ndays = ["monday"]', "days must be .* or a list of mon"),
    ('start = "18:00"\nend = "07:00"\ndays = []', "days must be .* or a list of mon"),
])
def test_bad_time_windows_are_clear_errors(state, tmp_path, table, message):
    config = tmp_path / "site.toml"
    config.write_text(f"[[windows]]\n{table}\n")
    with pytest.raises(ConodeError, match=message):
        resolve(state, config)
    config.write_text('windows = "evenings"\n')
    with pytest.raises(ConodeError, match=r"\[\[windows\]\] tables"):
        resolve(state, config)
