"""The owner in control: pauses (conode/agent/pause.py), the days shorthands of time windows, the metrics
setting, and the pool's rule in words (conode/idle/explain.py)."""

import json
import os
from pathlib import Path

import pytest

from conode.agent.disk import StateDisk
from conode.agent.pause import PauseWatch, read_pauses, remove_pause, write_pause
from conode.agent.settings import resolve_agent_config
from conode.agent.status import StatusFile, shared_status
from conode.errors import ConodeError
from conode.idle.explain import duration, explain, window_words
from conode.idle.policy import OwnerState, PolicyConfig, TimeWindow
from conode.idle.report import ReportsSource
from conode.limits import MAX_PAUSE_S
from conode.metrics import Address
from conode.testing.clock import FakeClock
from tests.unit.test_agent_daemon import Agent
from tests.unit.test_agent_settings import KEY, resolve, state  # noqa: F401  (the fixture)

NOW = 1.7e9


def test_a_pause_is_in_force_until_it_ends_or_is_removed(tmp_path):
    wall = FakeClock(NOW)
    pause = write_pause(tmp_path, 7200, wall)
    assert (pause.at, pause.until) == (NOW, NOW + 7200)
    assert read_pauses([tmp_path], NOW + 7199) == pause
    assert read_pauses([tmp_path], NOW + 7200) is None
    assert remove_pause(tmp_path) and not remove_pause(tmp_path)
    assert read_pauses([tmp_path], NOW) is None


@pytest.mark.parametrize("seconds", [0, -5, MAX_PAUSE_S + 1])
def test_a_pause_outside_its_limits_is_refused(tmp_path, seconds):
    with pytest.raises(ConodeError, match="a pause lasts between"):
        write_pause(tmp_path, seconds)


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"at": 1}', b'{"at": "x", "until": 2}',
                                     b'{"at": NaN, "until": 2e9}', b"\xff" * 4096])
def test_damaged_pause_files_are_no_pause(tmp_path, content):
    (tmp_path / "pause-1000").write_bytes(content)
    assert read_pauses([tmp_path], NOW) is None


def test_a_pause_never_lasts_beyond_its_limit_nor_starts_in_the_future(tmp_path):
    (tmp_path / "pause-1").write_text(json.dumps({"at": NOW, "until": NOW + 10 * MAX_PAUSE_S, "by": "x"}))
    assert read_pauses([tmp_path], NOW).until == NOW + MAX_PAUSE_S
    (tmp_path / "pause-1").write_text(json.dumps({"at": NOW + 3600, "until": NOW + 7200, "by": "x"}))
    assert read_pauses([tmp_path], NOW) is None


def test_the_latest_ending_pause_of_all_directories_counts(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "pause-1").write_text(json.dumps({"at": NOW, "until": NOW + 60, "by": "a"}))
    (two / "pause-2").write_text(json.dumps({"at": NOW, "until": NOW + 600, "by": "b"}))
    assert read_pauses([one, two, tmp_path / "missing"], NOW).by == "b"


def test_pause_files_are_not_idle_reports(tmp_path):
    (tmp_path / "1000").write_text(f"{NOW - 30}\n")
    write_pause(tmp_path, 60)
    reading = ReportsSource(tmp_path, lambda: NOW).read()
    assert reading.idle_s == pytest.approx(30) and reading.detail == "1 session report(s)"


def test_the_watch_sees_a_new_pause_at_once_and_its_end(tmp_path):
    wall, clock = FakeClock(NOW), FakeClock(10.0)
    watch = PauseWatch([tmp_path], wall, clock)
    assert watch.check() is None
    write_pause(tmp_path, 60, wall)
    assert watch.check() is not None  # the directory changed: read again without waiting
    wall.advance(60)
    assert watch.check() is None  # ended: read again at once too
    pause = tmp_path / "pause-1"
    pause.write_text(json.dumps({"at": wall(), "until": wall() + 60}))
    assert watch.check().until == wall() + 60
    with open(pause, "r+") as file:  # changed in place: the directory's time stands still
        file.write(json.dumps({"at": wall(), "until": wall() + 600}))
    assert watch.check().until == wall() + 60  # not read again on every tick
    clock.advance(1.0)
    assert watch.check().until == wall() + 600  # but once a second


def test_a_pause_stops_running_guests_as_the_owner_would_and_its_end_lets_them_go_on(tmp_path):
    agent = Agent(tmp_path)
    w0, _ = agent.join()
    agent.run_job(1)
    agent.step(advance=1.0)
    assert agent.daemon.owner.policy.state is OwnerState.CLAIMED
    write_pause(tmp_path, 60, agent.wall)
    agent.step()
    assert agent.daemon.owner.policy.state is OwnerState.SUSPENDED
    assert w0.of_type("pause")
    w0.emit("paused", at=agent.wall() + 0.01)
    agent.step()
    assert list(agent.daemon.guests.yield_latencies) == [pytest.approx(0.01, abs=1e-6)]  # from the pause
    status = agent.daemon.status()
    assert status["paused_until"] == agent.wall() + 60 and status["pool_rule"].startswith("paused until")
    remove_pause(tmp_path)
    agent.step(advance=0.1)
    assert agent.daemon.owner.policy.state is OwnerState.CLAIMED  # the owner is still away
    assert w0.of_type("resume")


def test_the_status_is_shared_where_the_owner_can_read_it_and_trusted_only_from_the_agent(tmp_path):
    state_dir, shared = tmp_path / "state", tmp_path / "reports"
    state_dir.mkdir(), shared.mkdir()
    StatusFile(state_dir, FakeClock(), StateDisk(), shared).write({"node": "desk", "owner_state": "Owner"})
    path = shared_status(shared)
    assert path == shared / ".status.json" and path.stat().st_mode & 0o777 == 0o644
    assert json.loads(path.read_text()) == json.loads((state_dir / "status.json").read_text())
    assert shared_status(state_dir) is None
    if os.getuid() == 0:  # another user's file of that name is not the agent's status
        os.chown(path, 4242, 4242)
        assert shared_status(shared) is None


def test_time_window_days_shorthands(state, tmp_path):  # noqa: F811
    config = tmp_path / "site.toml"
    config.write_text('[[windows]]\nstart = "19:00"\nend = "07:00"\ndays = "weekdays"\n\n'
                      '[[windows]]\nstart = "00:00"\nend = "24:00"\ndays = "weekends"\n')
    windows = resolve(state, config).policy.windows
    assert windows == (TimeWindow(19 * 60, 7 * 60, frozenset(range(5))), TimeWindow(0, 1440, frozenset({5, 6})))
    allowed = [(day, minute) for day in range(7) for minute in range(0, 1440, 60)
               if any(w.contains(day, minute) for w in windows)]
    assert (0, 20 * 60) in allowed and (4, 23 * 60) in allowed and (5, 3 * 60) in allowed and (6, 12 * 60) in allowed
    assert (1, 12 * 60) not in allowed and (2, 6 * 60) in allowed and (2, 8 * 60) not in allowed
    assert [window_words(w) for w in windows] == ["weekdays 19:00–07:00", "weekends all day"]
    config.write_text('[[windows]]\nstart = "19:00"\nend = "07:00"\ndays = "weekend"\n')
    with pytest.raises(ConodeError, match="days must be 'weekdays', 'weekends', 'every day' or a list"):
        resolve(state, config)


def test_the_metrics_setting(state, tmp_path):  # noqa: F811
    assert resolve(state).metrics is None
    assert resolve(state, metrics="9464").metrics == Address("127.0.0.1", 9464)
    config = tmp_path / "site.toml"
    config.write_text('metrics = "0.0.0.0:9100"\n')
    assert resolve(state, config).metrics == Address("0.0.0.0", 9100)
    with pytest.raises(ConodeError, match="metrics address 'yes'"):
        resolve(state, metrics="yes")


@pytest.mark.parametrize("seconds, words", [(0, "0 s"), (40, "40 s"), (300, "5 min"), (7200, "2 h"),
                                             (9000, "2 h 30 min")])
def test_durations_in_words(seconds, words):
    assert duration(seconds) == words


def test_the_pool_rule_in_words():
    cfg = PolicyConfig(start_idle_s=300, windows=(TimeWindow(19 * 60, 7 * 60, frozenset(range(5))),))
    assert explain(OwnerState.OWNER, cfg, 60, None) == (
        "starts when you have been idle 5 min (now 60 s) and your programs use under 0.3 cores, within weekdays "
        "19:00–07:00, on mains power")
    assert explain(OwnerState.CLAIMED, PolicyConfig(), 1e9, None) == (
        "uses this machine now; it stops as soon as you use the keyboard or mouse, or your programs use over 0.5 "
        "cores")
    assert "outside weekdays 19:00–07:00" in explain(OwnerState.UNCLAIMED, cfg, 1e9, None)
    assert explain(OwnerState.SUSPENDED, cfg, 2, None).startswith("stopped for you (its jobs wait, paused); it "
                                                                   "continues when you have been idle 5 min")
    paused = explain(OwnerState.SUSPENDED, cfg, 2, NOW)
    assert paused.startswith("paused until ") and "`conode resume` ends it" in paused


@pytest.mark.parametrize("windows", [
    [{"start": "19:00", "end": "07:00", "days": "weekdays"}, {"start": "00:00", "end": "24:00", "days": "weekends"}],
    [{"start": "18:30", "end": "07:30", "days": ["mon", "fri"]}, {"start": "12:00", "end": "13:00"}],
])
def test_the_agent_toml_ansible_writes_is_one_the_agent_accepts(state, tmp_path, windows):  # noqa: F811
    jinja2 = pytest.importorskip("jinja2")
    role = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "conode_agent" / "templates"
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(role), keep_trailing_newline=True)
    environment.filters["to_json"] = json.dumps
    text = environment.get_template("agent.toml.j2").render(
        ansible_managed="managed", conode_agent_coordinator="tcp://coordinator:7700", conode_agent_coordinator_key=KEY,
        conode_agent_cores=2, conode_agent_mem=128, conode_agent_idle_source="auto", conode_agent_while_owner="pause",
        conode_agent_cpu_cap=100, conode_agent_conet_listen="tcp://0.0.0.0:7704",
        conode_agent_idle_reports="/run/conode-idle", conode_agent_metrics="9464", conode_agent_policy={},
        conode_agent_windows=windows)
    config = tmp_path / "agent.toml"
    config.write_text(text)
    chosen = resolve_agent_config(state, config, {})
    assert chosen.metrics == Address("127.0.0.1", 9464)
    assert [window_words(w) for w in chosen.policy.windows] == [
        ["weekdays 19:00–07:00", "weekends all day"], ["Mon, Fri 18:30–07:30", "every day 12:00–13:00"]][
        windows[0]["start"] != "19:00"]
