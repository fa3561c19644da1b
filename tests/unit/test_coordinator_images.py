# SPDX-License-Identifier: GPL-2.0-or-later
"""Images in the pool, the coordinator's side: chunks stored once and checked, images named, listed, removed
(never while a job uses them), jobs on images placed only where the image fits, and chunks served to agents.
A real Coordinator on a real store and chunk directory, driven in-process (test_coordinator_decisions.Pool)."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from conode.cluster.chunks import chunk_digest, manifest_of
from conode.cluster.protocol import PROTOCOL_VERSION
from conode.limits import IMAGE_CHUNK_BYTES
from coordinator.images import ChunkStore, check_image_name
from coordinator.store import SCHEMA_VERSION, Store
from tests.unit.test_coordinator_decisions import Pool, run_jobs

CHUNK = IMAGE_CHUNK_BYTES


@pytest.fixture
def pool(tmp_path):
    p = Pool(tmp_path)
    yield p
    p.close()


def image_bytes(size: int, seed: int = 0) -> bytes:
    """Distinct, incompressible-looking content (every chunk different), with one repeated chunk of zeros."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 64
        counter += 1
    data = bytes(out[:size])
    return data[:CHUNK] + bytes(CHUNK) + data[2 * CHUNK:] if size > 2 * CHUNK else data


def add(pool: Pool, name: str, data: bytes) -> dict:
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)]
    digests = [chunk_digest(c) for c in chunks]
    missing = pool.ask("image_missing", chunks=digests)["chunks"]
    for digest in set(missing):
        assert pool.ask("image_put", digest=digest, data=chunks[digests.index(digest)])["type"] == "ok"
    return pool.ask("image_commit", name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                    chunks=digests)


def test_the_manifest_names_chunks_and_the_whole_file(tmp_path):
    data = image_bytes(3 * CHUNK + 5)
    (tmp_path / "img").write_bytes(data)
    seen = []
    manifest = manifest_of(tmp_path / "img", lambda done, total: seen.append((done, total)))
    assert manifest.size == len(data) and manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.chunks == [hashlib.sha256(data[i:i + CHUNK]).digest() for i in range(0, len(data), CHUNK)]
    assert len(manifest.chunks) == 4 and seen[-1] == (len(data), len(data))


def test_an_image_is_stored_once_per_chunk_and_listed(pool):
    data = image_bytes(3 * CHUNK + 100)
    assert add(pool, "base", data) == {"v": PROTOCOL_VERSION, "type": "ok", "detail": "image base added"}
    stored = sorted(pool.coordinator.chunks.root.glob("*/*"))
    assert len(stored) == 4  # four distinct chunks
    # A second image sharing all but its last chunk sends only that one.
    other = data[:3 * CHUNK] + b"other tail"
    digests = [chunk_digest(other[i:i + CHUNK]) for i in range(0, len(other), CHUNK)]
    assert pool.ask("image_missing", chunks=digests)["chunks"] == [digests[-1]]
    assert add(pool, "derived", other)["type"] == "ok"
    assert len(list(pool.coordinator.chunks.root.glob("*/*"))) == 5
    images = pool.ask("image_list")["images"]
    assert [(i["name"], i["size"], i["chunks"], i["jobs"]) for i in images] == [
        ("base", len(data), 4, []), ("derived", len(other), 4, [])]
    assert images[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_chunk_that_does_not_match_its_digest_is_refused(pool):
    reply = pool.ask("image_put", digest=chunk_digest(b"what was meant"), data=b"what arrived")
    assert reply["type"] == "error" and "does not match its digest" in reply["message"]
    assert list(pool.coordinator.chunks.root.glob("*/*")) == []


@pytest.mark.parametrize("change,says", [
    ({"name": "../etc"}, "image name '../etc' is not valid"),
    ({"size": 2 * CHUNK + 1}, "has 3 chunks, not 2"),
    ({"size": CHUNK + 1}, "chunk 1 (" ),  # the last chunk is not 1 byte long
    ({"chunks": [chunk_digest(b"a"), chunk_digest(b"never sent")]}, "is not on the coordinator; send it first"),
])
def test_a_commit_that_does_not_add_up_is_refused(pool, change, says):
    data = image_bytes(CHUNK + 10)
    assert add(pool, "good", data)["type"] == "ok"
    digests = [chunk_digest(data[:CHUNK]), chunk_digest(data[CHUNK:])]
    fields = {"name": "bad", "size": len(data), "sha256": "0" * 64, "chunks": digests, **change}
    reply = pool.ask("image_commit", **fields)
    assert reply["type"] == "error" and says in reply["message"], reply
    assert [i["name"] for i in pool.ask("image_list")["images"]] == ["good"]


def test_a_name_is_taken_once_but_adding_the_same_image_again_is_fine(pool):
    data = image_bytes(CHUNK)
    assert add(pool, "x", data)["type"] == "ok"
    assert add(pool, "x", data)["detail"] == "image x is there already"
    reply = add(pool, "x", image_bytes(CHUNK, seed=1))
    assert reply["type"] == "error" and "remove it first" in reply["message"]


def test_submit_names_an_existing_image_and_run_job_carries_its_chunks(pool):
    data = image_bytes(2 * CHUNK + 1)
    add(pool, "deb", data)
    reply = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, image="nope")
    assert reply["type"] == "error" and "no image named 'nope'" in reply["message"]
    reply = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, disk_mib=64)
    assert reply["type"] == "error" and "give the image too" in reply["message"]
    pool.hello("n1")
    job = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, image="deb", disk_mib=64)["job"]
    (run,) = [m for m in pool.take("n1") if m["type"] == "run_job"]
    assert run["job"] == job and run["disk_mib"] == 64
    assert run["image"] == {"name": "deb", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                            "chunks": [chunk_digest(data[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]}
    assert pool.job(job)["image"] == "deb"


def test_an_image_in_use_is_not_removed_and_its_chunks_go_with_it_afterwards(pool):
    data, shared = image_bytes(2 * CHUNK), image_bytes(CHUNK, seed=7)
    add(pool, "a", data)
    add(pool, "b", data[:CHUNK] + shared)  # shares chunk 0 with a
    job = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, image="a")["job"]
    reply = pool.ask("image_rm", name="a")
    assert reply["type"] == "error" and reply["code"] == "in-use" and f"({job})" in reply["message"]
    assert pool.ask("image_list")["images"][0]["jobs"] == [job]
    pool.ask("cancel", job=job)
    assert pool.ask("image_rm", name="a")["detail"] == "image a removed"
    store: ChunkStore = pool.coordinator.chunks
    assert store.has(chunk_digest(data[:CHUNK])) and not store.has(chunk_digest(data[CHUNK:]))
    assert pool.ask("image_rm", name="a")["code"] == "not-found"


def test_a_job_goes_only_to_a_node_whose_image_cache_holds_its_image(pool):
    add(pool, "big", image_bytes(3 * CHUNK))
    pool.send("n1", "hello", node="n1", cores=1, mem_mib=256, speed=1.0, state="Unclaimed", idle_s=60.0,
              running=[], software="t", image_cache_mib=2)
    job = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128, image="big")["job"]
    small = pool.ask("submit", argv=["true"], inputs={}, outputs=[], mem_mib=128)["job"]
    assert run_jobs(pool.take("n1")) == [small]  # the image job waits for a node that can hold it
    pool.send("n2", "hello", node="n2", cores=1, mem_mib=256, speed=1.0, state="Unclaimed", idle_s=60.0,
              running=[], software="t", image_cache_mib=3)
    assert run_jobs(pool.take("n2")) == [job]


def test_agents_fetch_chunks_on_their_own_socket_and_damage_is_reported_not_sent(pool):
    data = image_bytes(CHUNK + 3)
    add(pool, "img", data)
    digest = chunk_digest(data[:CHUNK])
    # The fetch socket is not the node's control connection: it needs no hello. Requests are answered between
    # the other messages, by serve_chunks.
    assert pool.send("n1", "image_chunk_get", digest=digest) == []
    pool.coordinator.serve_chunks()
    (reply,) = pool.take("n1")
    assert reply["type"] == "image_chunk" and reply["data"] == data[:CHUNK] and reply["digest"] == digest
    path = pool.coordinator.chunks.path(digest)
    path.write_bytes(b"rot" + data[3:CHUNK])
    pool.send("n1", "image_chunk_get", digest=digest)
    pool.send("n1", "image_chunk_get", digest=bytes(32))
    pool.coordinator.serve_chunks()
    damaged, absent = pool.take("n1")
    assert "data" not in damaged and "damaged on the coordinator's disk" in damaged["problem"]
    assert "not on the coordinator" in absent["problem"]


def test_chunk_requests_wait_in_a_bounded_queue_and_a_turn_serves_them_for_a_bounded_time(pool, monkeypatch):
    data = image_bytes(CHUNK)
    add(pool, "img", data)
    digest = chunk_digest(data)
    monkeypatch.setattr("coordinator.server.MAX_CHUNK_REQUESTS", 5)
    for _ in range(7):
        pool.send("n1", "image_chunk_get", digest=digest)
    assert len(pool.coordinator._chunk_requests) == 5  # the rest dropped: a well-behaved agent asks again
    monkeypatch.setattr("coordinator.server.CHUNK_TURN_S", 0.0)
    pool.coordinator.serve_chunks()  # no time to serve: everything still waits
    assert pool.take("n1") == [] and len(pool.coordinator._chunk_requests) == 5
    monkeypatch.setattr("coordinator.server.CHUNK_TURN_S", 10.0)
    pool.coordinator.serve_chunks()
    assert [m["data"] for m in pool.take("n1")] == [data] * 5


def test_image_names(pool):
    for good in ("debian-12", "a", "x.y_z", "A" * 64):
        assert check_image_name(good) is None
    for bad in ("", "-x", ".x", "a/b", "a b", "é", "A" * 65):
        assert "is not valid" in check_image_name(bad)


def test_a_version_3_database_gains_images(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                     "INSERT INTO meta VALUES ('schema', '3');"
                     "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL, argv BLOB NOT NULL,"
                     " inputs BLOB NOT NULL, wanted BLOB NOT NULL, mem_mib INTEGER NOT NULL, node TEXT,"
                     " attempts INTEGER NOT NULL DEFAULT 0, exit_status INTEGER, reason TEXT, submitted_by TEXT,"
                     " submitted_at REAL NOT NULL, started_at REAL, vacated_at REAL, finished_at REAL,"
                     " guests INTEGER NOT NULL DEFAULT 1, network TEXT, gang INTEGER, rank INTEGER);"
                     "INSERT INTO jobs (state, argv, inputs, wanted, mem_mib, submitted_at) "
                     "VALUES ('queued', X'91a474727565', X'80', X'90', 128, 1.0);")
    db.commit()
    db.close()
    store = Store(path)
    (job,) = store.jobs()
    assert job.argv == ["true"] and job.image is None and job.disk_mib is None and job.timeout_s is None
    assert store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(SCHEMA_VERSION)
    store.add_image("x", "0" * 64, 1, [bytes(32)], "admin")
    assert store.image("x").chunks == [bytes(32)]
    store.close()
