from conode.vm.clock import VirtualClock


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
