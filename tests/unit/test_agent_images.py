# SPDX-License-Identifier: GPL-2.0-or-later
"""The agent's image cache: fetched chunks are checked before they are written (a damaged one is asked for again,
never used), a cut fetch asks only for what is missing, a cached file that changed is checked and mended, the
budget evicts the least recently used images no guest uses, and an image larger than the budget is refused with
the sizes. The chunks come from a real coordinator chunk store through an in-memory stand-in for the socket."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from conode.agent.images import ImageCache, ImageFetcher, ImageRefused, ImageSpec
from conode.cluster.chunks import chunk_digest
from conode.limits import IMAGE_CHUNK_BYTES, IMAGE_FETCH_TRIES, IMAGE_FETCH_WINDOW
from coordinator.images import ChunkError, ChunkStore

CHUNK = IMAGE_CHUNK_BYTES
MIB = 1 << 20


def content(size: int, seed: int) -> bytes:
    block = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(CHUNK // 32))
    out = bytearray()
    i = 0
    while len(out) < size:
        out += bytes((b + i) % 256 for b in block[:64]) + block[64:]
        i += 1
    return bytes(out[:size])


class StoreChunks:
    """A ChunkSource answering from a coordinator's ChunkStore at once; *damage* corrupts answers on the way."""

    def __init__(self, store: ChunkStore, damage: dict[bytes, int] | None = None) -> None:
        self.store = store
        self.damage = damage or {}  # digest -> how many answers to damage
        self.asked: list[bytes] = []
        self.waiting: list[bytes] = []
        self.most_in_flight = 0

    def ask(self, digest):
        self.asked.append(digest)
        self.waiting.append(digest)
        self.most_in_flight = max(self.most_in_flight, len(self.waiting))
        return True

    def answers(self, timeout_s):
        found = []
        for digest in self.waiting:
            try:
                data = self.store.get(digest)
            except ChunkError as exc:
                found.append((digest, None, str(exc)))
                continue
            if self.damage.get(digest, 0) > 0:
                self.damage[digest] -= 1
                data = b"X" + data[1:]
            found.append((digest, data, None))
        self.waiting = []
        return found

    def restart(self):
        self.waiting = []

    def close(self):
        pass


def publish(store: ChunkStore, data: bytes, name: str = "img") -> ImageSpec:
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    for chunk in chunks:
        store.put(chunk_digest(chunk), chunk)
    return ImageSpec(name, hashlib.sha256(data).hexdigest(), len(data), tuple(chunk_digest(c) for c in chunks))


@pytest.fixture
def store(tmp_path):
    return ChunkStore(tmp_path / "coordinator-chunks")


@pytest.fixture
def cache(tmp_path):
    return ImageCache(tmp_path / "cache", 64 * MIB)


def test_a_fetched_image_is_the_file_and_is_ready(store, cache):
    data = content(5 * CHUNK + 123, seed=1)
    spec = publish(store, data)
    source = StoreChunks(store)
    assert not cache.ready(spec.sha256)
    assert cache.fetch(spec, source) == 6
    assert cache.path(spec.sha256).read_bytes() == data and cache.ready(spec.sha256)
    assert not os.access(cache.path(spec.sha256), os.W_OK) or os.geteuid() == 0
    assert cache.path(spec.sha256).stat().st_mode & 0o777 == 0o444
    assert cache.spec(spec.sha256) == spec  # known again after a restart, enough to fetch it anew


def test_a_repeated_chunk_is_fetched_once_and_the_window_is_bounded(store, cache):
    data = content(CHUNK, seed=2) + bytes(CHUNK) * 10 + content(CHUNK, seed=3) * 2
    spec = publish(store, data)
    source = StoreChunks(store)
    cache.fetch(spec, source)
    assert sorted(source.asked) == sorted(set(spec.chunks)) and len(source.asked) == 3
    assert cache.path(spec.sha256).read_bytes() == data
    big = publish(store, content(3 * IMAGE_FETCH_WINDOW * CHUNK, seed=4), "big")
    source = StoreChunks(store)
    cache.fetch(big, source)
    assert source.most_in_flight == IMAGE_FETCH_WINDOW


def test_a_damaged_chunk_is_asked_for_again_and_never_written(store, cache):
    data = content(3 * CHUNK, seed=5)
    spec = publish(store, data)
    source = StoreChunks(store, damage={spec.chunks[1]: IMAGE_FETCH_TRIES - 1})
    cache.fetch(spec, source)
    assert source.asked.count(spec.chunks[1]) == IMAGE_FETCH_TRIES and source.asked.count(spec.chunks[0]) == 1
    assert cache.path(spec.sha256).read_bytes() == data


def test_a_chunk_damaged_every_time_fails_the_fetch_and_nothing_is_ready(store, cache):
    spec = publish(store, content(2 * CHUNK, seed=6))
    with pytest.raises(ImageRefused, match=f"arrived damaged {IMAGE_FETCH_TRIES} times"):
        cache.fetch(spec, StoreChunks(store, damage={spec.chunks[0]: 99}))
    assert not cache.ready(spec.sha256) and not cache.path(spec.sha256).exists()


def test_a_chunk_damaged_on_the_coordinator_is_reported_by_it(store, cache):
    spec = publish(store, content(2 * CHUNK, seed=7))
    store.path(spec.chunks[1]).write_bytes(b"rotten")
    with pytest.raises(ImageRefused, match="damaged on the coordinator's disk"):
        cache.fetch(spec, StoreChunks(store))


def test_chunks_that_do_not_make_the_named_file_are_refused(store, cache):
    data = content(2 * CHUNK, seed=8)
    spec = publish(store, data)
    lying = ImageSpec(spec.name, hashlib.sha256(b"something else").hexdigest(), spec.size, spec.chunks)
    with pytest.raises(ImageRefused, match="do not make the file its SHA-256 names"):
        cache.fetch(lying, StoreChunks(store))
    assert not cache.ready(lying.sha256)


def test_a_cut_fetch_continues_where_it_stopped(store, cache):
    data = content(8 * CHUNK, seed=9)
    spec = publish(store, data)

    class Cut(StoreChunks):
        """Answers one chunk at a time, and the agent stops after three."""

        delivered = 0

        def answers(self, timeout_s):
            if self.delivered == 3:
                raise RuntimeError("cut")
            self.delivered += 1
            held, self.waiting = self.waiting[1:], self.waiting[:1]
            found = super().answers(timeout_s)
            self.waiting = held
            return found

    with pytest.raises(RuntimeError):
        cache.fetch(spec, Cut(store))
    assert cache.part(spec.sha256).exists() and not cache.ready(spec.sha256)
    source = StoreChunks(store)
    cache.fetch(spec, source)
    assert source.asked == list(spec.chunks[3:]) and cache.path(spec.sha256).read_bytes() == data


def test_a_cached_file_that_changed_is_checked_and_only_its_damaged_chunk_fetched(store, cache):
    data = content(6 * CHUNK, seed=10)
    spec = publish(store, data)
    cache.fetch(spec, StoreChunks(store))
    path = cache.path(spec.sha256)
    os.chmod(path, 0o644)
    with open(path, "r+b") as image:
        image.seek(4 * CHUNK + 77)
        image.write(b"bit rot")
    assert not cache.ready(spec.sha256)
    source = StoreChunks(store)
    assert cache.fetch(spec, source) == 1
    assert source.asked == [spec.chunks[4]] and path.read_bytes() == data and cache.ready(spec.sha256)


def test_an_image_larger_than_the_budget_is_refused_with_the_sizes(store, tmp_path):
    cache = ImageCache(tmp_path / "small", 3 * MIB)
    spec = publish(store, content(4 * CHUNK, seed=11), "huge")
    with pytest.raises(ImageRefused, match=r"image huge \(sha256 \w+, 4.0 MiB\) is larger than this agent's image "
                                           r"cache of 3 MiB"):
        cache.make_room(spec, set())


def test_the_budget_evicts_the_least_recently_used_images_no_guest_uses(store, tmp_path):
    clock = iter(range(1000)).__next__
    cache = ImageCache(tmp_path / "cache", 7 * MIB, clock=lambda: float(clock()))
    a, b, c, d = (publish(store, content(3 * CHUNK, seed=20 + i), name) for i, name in enumerate("abcd"))
    for spec in (a, b):
        cache.make_room(spec, set())
        cache.fetch(spec, StoreChunks(store))
    cache.touch(a)  # a used after b: b is the least recently used
    cache.make_room(c, set())
    assert cache.ready(a.sha256) and not cache.path(b.sha256).exists() and cache.spec(b.sha256) is None
    cache.fetch(c, StoreChunks(store))
    # a and c are both in use: d cannot fit beside them, and nothing in use is removed.
    with pytest.raises(ImageRefused, match=r"does not fit this agent's image cache of 7 MiB beside the 6 MiB"):
        cache.make_room(d, {a.sha256, c.sha256})
    assert cache.ready(a.sha256) and cache.ready(c.sha256)
    cache.make_room(d, {c.sha256})
    assert not cache.path(a.sha256).exists() and cache.ready(c.sha256)


def test_the_fetcher_thread_reports_each_image_once(store, cache):
    good = publish(store, content(2 * CHUNK, seed=30), "good")
    bad = publish(store, content(CHUNK, seed=31), "bad")
    store.path(bad.chunks[0]).unlink()
    woken = threading.Event()
    fetcher = ImageFetcher(cache, lambda: StoreChunks(store), lambda: woken.set)
    try:
        fetcher.want(good)
        fetcher.want(good)  # asked twice: fetched once
        fetcher.want(bad)
        assert fetcher.pending == {good.sha256, bad.sha256}
        results = []
        deadline = time.monotonic() + 20
        while len(results) < 2 and time.monotonic() < deadline:
            woken.wait(0.05)
            woken.clear()
            results += fetcher.results()
        assert results[0] == (good.sha256, None)
        assert results[1][0] == bad.sha256 and "not on the coordinator" in results[1][1]
        assert fetcher.pending == set() and cache.ready(good.sha256)
    finally:
        fetcher.close()


# --- the agent: jobs wait for their image ----------------------------------------------------------------------
def agent_with_images(tmp_path, store, cache_mib=16):
    from tests.unit.test_agent_daemon import Agent

    return Agent(tmp_path / "agent", cores=1, chunks=lambda: StoreChunks(store), image_cache_mib=cache_mib)


def run_on_image(agent, job, spec, **extra):
    wire = {"name": spec.name, "sha256": spec.sha256, "size": spec.size, "chunks": list(spec.chunks)}
    agent.coordinator.deliver("run_job", job=job, argv=["cat", "/x"], inputs={}, outputs=[], mem_mib=128,
                              image=wire, **extra)
    agent.step()


def step_until(agent, condition, seconds=10.0):
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        threading.Event().wait(0.01)
        agent.step()
    return condition()


def test_a_job_waits_for_its_image_then_boots_from_it_with_an_overlay_of_its_own(tmp_path, store):
    agent = agent_with_images(tmp_path, store)
    (w0,) = agent.join()
    assert agent.sent("hello")[0]["image_cache_mib"] == 16
    spec = publish(store, content(3 * CHUNK, seed=40))
    run_on_image(agent, 7, spec, disk_mib=64)
    assert 7 in agent.daemon.held_jobs() and not w0.of_type("run")  # waiting for the image
    assert step_until(agent, lambda: w0.of_type("run"))
    (run,) = w0.of_type("run")
    cache = agent.daemon.images.cache
    assert run["disk"] == {"base": str(cache.path(spec.sha256)),
                           "overlay": str(tmp_path / "agent" / "overlays" / "job-7.cow"), "budget_mib": 64}
    assert cache.ready(spec.sha256)
    run_on_image(agent, 8, spec)  # the image is here now: no wait
    w0.finish(7)
    agent.step()
    assert [m["job"] for m in w0.of_type("run")] == [7, 8]
    agent.daemon.images.close()


def test_an_image_larger_than_the_agents_budget_fails_the_job_with_the_sizes(tmp_path, store):
    agent = agent_with_images(tmp_path, store, cache_mib=2)
    (w0,) = agent.join()
    spec = publish(store, content(3 * CHUNK, seed=41), "wide")
    run_on_image(agent, 9, spec)
    (failed,) = agent.sent("job_failed", 9)
    assert failed["retry"] and "image wide (sha256" in failed["reason"]
    assert "3.0 MiB) is larger than this agent's image cache of 2 MiB" in failed["reason"]
    assert not w0.of_type("run") and agent.daemon.images.pending == set()


def test_a_vacated_guest_whose_image_the_agent_no_longer_knows_fails_naming_it(tmp_path, store):
    agent = agent_with_images(tmp_path, store)
    (w0,) = agent.join()
    spec = publish(store, content(CHUNK, seed=42))
    run_on_image(agent, 11, spec)
    assert step_until(agent, lambda: w0.of_type("run"))
    w0.emit("vacated", path=str(tmp_path / "agent" / "vacated" / "worker-0.snap"), jobs=[11])
    (tmp_path / "agent" / "vacated" / "worker-0.snap").write_bytes(b"saved guest")
    agent.step()
    assert agent.daemon.guests.vacated == {11: 0}
    agent.daemon.images.cache.remove(spec.sha256)  # file and record gone
    agent.daemon.images.close()
    again = agent_with_images(tmp_path, store)  # the agent restarts: the vacated record names the image
    assert again.daemon.guests.job_images == {11: spec.sha256}
    again.join()
    (failed,) = again.sent("job_failed", 11)
    assert failed["retry"] and f"its disk image (sha256 {spec.sha256}) is missing" in failed["reason"]
    again.daemon.images.close()


def test_a_silent_coordinator_is_asked_again_on_a_new_connection_then_given_up(store, cache, monkeypatch):
    monkeypatch.setattr("conode.agent.images.REPLY_TIMEOUT_S", 0.01)
    monkeypatch.setattr("conode.agent.images.GIVE_UP_S", 0.3)
    spec = publish(store, content(2 * CHUNK, seed=50))

    class Silent(StoreChunks):
        restarts = 0

        def answers(self, timeout_s):
            threading.Event().wait(timeout_s)
            return []

        def restart(self):
            self.restarts += 1
            super().restart()

    source = Silent(store)
    with pytest.raises(ImageRefused, match=r"the coordinator sent no chunk of image img .* for 0 s"):
        cache.fetch(spec, source)
    assert source.restarts >= 2 and source.asked.count(spec.chunks[0]) == source.restarts + 1


def test_a_fetch_waits_for_the_connection_before_asking(store, cache):
    spec = publish(store, content(CHUNK, seed=51))

    class Connecting(StoreChunks):
        refusals = 5  # IMMEDIATE: nothing can be sent until the handshake is done

        def ask(self, digest):
            if self.refusals:
                self.refusals -= 1
                return False
            return super().ask(digest)

    source = Connecting(store)
    assert cache.fetch(spec, source) == 1 and source.asked == [spec.chunks[0]]
