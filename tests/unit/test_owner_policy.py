from hypothesis import given
from hypothesis import strategies as st

from conode.idle.policy import (Observation, OwnerState, PolicyConfig, PolicyState, TimeWindow, guest_may_run,
                                next_state)
from conode.idle.sources import FileSource, IdleReading, X11Source, combine

CFG = PolicyConfig()


def obs(now=1000.0, idle=None, load=0.0, battery=None, weekday=0, minute=600):
    return Observation(now, idle, load, battery, weekday, minute)


def step(state, o, has_jobs=False, vacated=False, cfg=CFG):
    return next_state(state, o, has_jobs, vacated, cfg)


def test_desktop_cycle_with_htcondor_defaults():
    s = PolicyState(OwnerState.OWNER, 0)
    s = step(s, obs(now=100, idle=14 * 60))
    assert s.state is OwnerState.OWNER  # 14 minutes is not enough
    s = step(s, obs(now=200, idle=15 * 60, load=0.2))
    assert s.state is OwnerState.UNCLAIMED and s.since == 200
    s = step(s, obs(now=210, idle=15 * 60 + 10), has_jobs=True)
    assert s.state is OwnerState.CLAIMED
    s = step(s, obs(now=220, idle=0.3), has_jobs=True)  # a key press
    assert s.state is OwnerState.SUSPENDED and not guest_may_run(s.state)
    s = step(s, obs(now=400, idle=4 * 60), has_jobs=True)
    assert s.state is OwnerState.SUSPENDED  # not yet 5 minutes idle
    s = step(s, obs(now=500, idle=5 * 60), has_jobs=True)
    assert s.state is OwnerState.CLAIMED and guest_may_run(s.state)
    s = step(s, obs(now=510, idle=1), has_jobs=True)
    s = step(s, obs(now=510 + 10 * 60, idle=2), has_jobs=True)
    assert s.state is OwnerState.VACATING
    s = step(s, obs(now=2000, idle=3), has_jobs=True, vacated=True)
    assert s.state is OwnerState.OWNER


def test_owner_load_suspends_and_blocks_start():
    s = step(PolicyState(OwnerState.CLAIMED, 0), obs(idle=3600, load=0.6), has_jobs=True)
    assert s.state is OwnerState.SUSPENDED
    assert step(PolicyState(), obs(idle=3600, load=0.4)).state is OwnerState.OWNER


def test_unknown_is_never_idle():
    assert step(PolicyState(), obs(idle=None, load=0.0)).state is OwnerState.OWNER
    assert step(PolicyState(), obs(idle=3600, load=None)).state is OwnerState.OWNER
    assert step(PolicyState(OwnerState.CLAIMED), obs(idle=None), has_jobs=True).state is OwnerState.SUSPENDED


def test_battery_and_time_windows():
    assert step(PolicyState(), obs(idle=3600, battery=True)).state is OwnerState.OWNER
    assert step(PolicyState(), obs(idle=3600, battery=True), cfg=PolicyConfig(allow_on_battery=True)).state \
        is OwnerState.UNCLAIMED
    nights = PolicyConfig(windows=(TimeWindow(19 * 60, 7 * 60),))
    assert step(PolicyState(), obs(idle=3600, minute=12 * 60), cfg=nights).state is OwnerState.OWNER
    assert step(PolicyState(), obs(idle=3600, minute=23 * 60), cfg=nights).state is OwnerState.UNCLAIMED
    assert step(PolicyState(), obs(idle=3600, minute=3 * 60), cfg=nights).state is OwnerState.UNCLAIMED
    weekdays = TimeWindow(0, 24 * 60, frozenset(range(5)))
    assert not weekdays.contains(5, 600) and weekdays.contains(4, 600)


observations = st.builds(obs, now=st.floats(0, 1e6), idle=st.one_of(st.none(), st.floats(0, 1e5)),
                         load=st.one_of(st.none(), st.floats(0, 8)), battery=st.one_of(st.none(), st.booleans()),
                         weekday=st.integers(0, 6), minute=st.integers(0, 1439))
states = st.builds(PolicyState, st.sampled_from(list(OwnerState)), st.floats(0, 1e6))


@given(states, observations, st.booleans(), st.booleans())
def test_the_guest_never_runs_while_the_owner_is_active(state, o, has_jobs, vacated):
    new = step(state, o, has_jobs, vacated)
    owner_active = o.input_idle_s is None or o.input_idle_s < CFG.active_input_s
    if owner_active or (o.on_battery and not CFG.allow_on_battery):
        assert not guest_may_run(new.state)
    if new.state is not state.state:
        assert new.since == o.now


@given(states, observations, st.booleans())
def test_one_observation_moves_the_state_at_most_once(state, o, has_jobs):
    # Seeing the same observation again must not change the state again: no flapping between running and
    # stopped while nothing changes.
    once = step(state, o, has_jobs)
    assert step(once, o, has_jobs).state is once.state


def test_thresholds_without_hysteresis_are_refused():
    import pytest

    with pytest.raises(ValueError):
        PolicyConfig(continue_idle_s=0.1, active_input_s=1.0)
    with pytest.raises(ValueError):
        PolicyConfig(start_max_load=0.6, suspend_load=0.5)


@given(observations, st.booleans())
def test_start_needs_fifteen_quiet_minutes(o, has_jobs):
    new = step(PolicyState(), o, has_jobs)
    if new.state is not OwnerState.OWNER:
        assert o.input_idle_s >= CFG.start_idle_s and o.owner_load < CFG.start_max_load


def test_sources_report_unknown_rather_than_idle(tmp_path):
    assert FileSource(tmp_path / "missing").read().idle_s is None
    assert X11Source(display=":999").read().idle_s is None
    stamp = tmp_path / "activity"
    stamp.write_text("0")
    assert FileSource(stamp).read().idle_s > 1e9
    assert combine([IdleReading("a", None), IdleReading("b", 30.0), IdleReading("c", 12.0)]) == 12.0
    assert combine([IdleReading("a", None)]) is None
