from conode.vm.clock import NS_PER_S, TSC_HZ, VirtualClock


class HostClock:
    def __init__(self) -> None:
        self.ns = 1_000

    def __call__(self) -> int:
        return self.ns


def test_clock_stops_while_paused_and_survives_state_roundtrip():
    host = HostClock()
    clock = VirtualClock(host)
    assert clock.now() == 0
    clock.resume()
    host.ns += 500
    assert clock.now() == 500
    clock.pause()
    host.ns += 10_000
    assert clock.now() == 500
    other = VirtualClock(host)
    other.set_state(clock.get_state())
    other.resume()
    host.ns += 1
    assert other.now() == 501
    assert other.host_deadline(600) == host.ns + 99


def test_the_tsc_counts_guest_time_at_its_stated_rate_and_stops_while_paused():
    host = HostClock()
    clock = VirtualClock(host)
    clock.resume()
    host.ns += 3 * NS_PER_S
    assert clock.tsc() == 3 * TSC_HZ
    clock.pause()
    host.ns += NS_PER_S
    assert clock.tsc() == 3 * TSC_HZ
    restored = VirtualClock(host)
    restored.set_state(clock.get_state())
    assert restored.tsc() == 3 * TSC_HZ  # a snapshot resumes the counter where it stopped
