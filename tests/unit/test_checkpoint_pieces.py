"""Checkpoint pieces and chains (conode/vm/checkpoint.py), the coordinator's store of them
(coordinator/checkpoints.py) and its decisions about them: real pieces of a real (unbooted) machine's state."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_coordinator_decisions import Pool as DecisionPool

from conode.cluster import protocol
from conode.limits import IMAGE_CHUNK_BYTES
from conode.vm.checkpoint import (
    FULL,
    CheckpointError,
    check_chain,
    check_pages,
    encode_pages,
    guest_state,
    materialize,
    merge,
    read_piece,
    write_piece,
)
from conode.vm.disk.config import DiskConfig
from conode.vm.disk.image import BaseImage
from conode.vm.disk.delta import Changes, merge_changes
from conode.vm.disk.overlay import CLUSTER, CowDisk, pack_clusters
from conode.vm.guest import GuestJob, GuestSnapshot, ImageDigests, JobSpec
from conode.vm.layout import PAGE_SIZE
from conode.vm.machine import CoMachine, MachineConfig
from conode.vm.snapshot import write_snapshot
from coordinator.checkpoints import MAX_CHAIN_PIECES, CheckpointStore
from coordinator.store import Store

MEM_MIB = 48
PAGES = (MEM_MIB << 20) // PAGE_SIZE


def envelope_of(state: dict) -> GuestSnapshot:
    job = GuestJob(None, JobSpec(7, ["sh", "-c", "true"], "/job/7", {}, []), None).get_state()  # type: ignore[arg-type]
    return GuestSnapshot("g1", ImageDigests("k" * 64, "i" * 64), state, {"ready": True}, job, 1.0)


def machine_envelope() -> GuestSnapshot:
    """The envelope of a real (unbooted) machine's state, for pieces of its RAM."""
    machine = CoMachine(MachineConfig(mem_mib=MEM_MIB), lambda data: None, lambda data: None)
    try:
        return envelope_of(machine.get_state(with_ram=False))
    finally:
        machine.close()


@pytest.fixture(scope="module")
def envelope() -> GuestSnapshot:
    return machine_envelope()


def bitmap_of(pages: list[int]) -> bytes:
    bitmap = bytearray((PAGES + 7) // 8)
    for page in pages:
        bitmap[page >> 3] |= 1 << (page & 7)
    return bytes(bitmap)


def make_piece(path: Path, envelope: GuestSnapshot, ram: bytearray, pages: list[int] | None, seq: int, base: int,
               job: int = 7, outputs: dict[str, int] | None = None, disk: dict | None = None) -> Path:
    """A piece of *ram*'s *pages* (None: all: a full piece) and the disk delta *disk*."""
    listed = sorted(pages) if pages is not None else list(range(PAGES))
    record = encode_pages((bytes(ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) for p in listed), bitmap_of(listed),
                          len(ram))
    write_piece(path, job, seq, base, outputs or {"stdout": 10 * seq, "stderr": seq}, record, envelope, disk)
    return path


def random_ram(rng: random.Random) -> bytearray:
    ram = bytearray(MEM_MIB << 20)
    for page in rng.sample(range(PAGES), 200):
        ram[page * PAGE_SIZE:page * PAGE_SIZE + 64] = rng.randbytes(64)
    return ram


def scribble(ram: bytearray, rng: random.Random, count: int) -> list[int]:
    """Change *count* pages (one of them to zero); return which."""
    pages = rng.sample(range(PAGES), count)
    for page in pages:
        ram[page * PAGE_SIZE:page * PAGE_SIZE + 32] = rng.randbytes(32)
    ram[pages[0] * PAGE_SIZE:(pages[0] + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    return pages


@pytest.fixture(scope="module")
def chain_files(tmp_path_factory, envelope):
    """A full piece and three deltas, and the RAM they add up to."""
    rng = random.Random(5)
    root = tmp_path_factory.mktemp("chain")
    ram = random_ram(rng)
    paths = [make_piece(root / "0.ckpt", envelope, ram, None, 0, FULL)]
    for seq in (1, 2, 3):
        changed = scribble(ram, rng, 40)
        paths.append(make_piece(root / f"{seq}.ckpt", envelope, ram, changed, seq, seq - 1))
    return paths, bytes(ram)


def disk_delta(disk: CowDisk, whole: bool) -> dict:
    """The DiskDelta of the clusters written since the last one (all, if *whole*), as a checkpointer takes it."""
    listed = disk.take_changes(whole)
    return merge_changes([Changes(disk.base.sha256(), disk.size, bytes(disk.map), listed,
                                  pack_clusters(disk.read_clusters(listed)))])


@pytest.fixture(scope="module")
def disk_chain(tmp_path_factory):
    """A full piece and two deltas of a guest with a disk, each carrying the overlay clusters written since the
    piece before; the base image, and the disk's bytes at the end."""
    root = tmp_path_factory.mktemp("disk")
    base = root / "base.img"
    base.write_bytes(random.Random(3).randbytes(64 * CLUSTER))
    machine = CoMachine(MachineConfig(mem_mib=MEM_MIB, disk=DiskConfig(base)), lambda data: None, lambda data: None)
    try:
        disk = machine.disk
        snapshot = envelope_of(machine.get_state(with_ram=False, with_disk=False))
        ram = bytearray(MEM_MIB << 20)
        paths = []
        for seq, (writes, discard) in enumerate([([0, 1, 2, 40], None), ([1, 9], 40), ([9, 10], None)]):
            for cluster in writes:
                disk.write(cluster * CLUSTER + 100, [bytes([seq + 1]) * 200])
            if discard is not None:
                disk.discard(discard * CLUSTER, CLUSTER)
            path = root / f"{seq}.ckpt"
            make_piece(path, snapshot, ram, None if seq == 0 else [seq], seq, seq - 1 if seq else FULL,
                       disk=disk_delta(disk, whole=seq == 0))
            paths.append(path)
        final = bytearray(disk.size)
        disk.read(0, memoryview(final))
    finally:
        machine.close()
    return base, paths, bytes(final)


# --- pieces and chains ------------------------------------------------------------------------------------------
def test_a_chain_adds_up_to_the_ram_it_was_taken_from(chain_files):
    paths, ram = chain_files
    pieces = [read_piece(p) for p in paths]
    for piece in pieces:
        check_pages(piece)
    assert [p.seq for p in pieces] == [0, 1, 2, 3] and pieces[0].full and not pieces[1].full
    assert pieces[-1].outputs == {"stdout": 30, "stderr": 3} and pieces[1].pages == 40
    memory = bytearray(len(ram))
    materialize(pieces, memoryview(memory))
    assert memory == ram


def test_merged_deltas_equal_the_deltas_applied_in_turn(chain_files, tmp_path, envelope):
    paths, ram = chain_files
    pieces = [read_piece(p) for p in paths]
    record, _, last = merge(pieces[1:])
    write_piece(tmp_path / "m.ckpt", 7, last.seq, 0, last.outputs, record, envelope)
    merged = read_piece(tmp_path / "m.ckpt")
    assert merged.base == 0 and merged.seq == 3 and merged.pages <= 120
    memory = bytearray(len(ram))
    materialize([pieces[0], merged], memoryview(memory))
    assert memory == ram


def disk_after(base: Path, snapshot: GuestSnapshot) -> bytes:
    """The disk a guest restored from *snapshot* would see."""
    disk = CowDisk(BaseImage(base), None, 1 << 20)
    try:
        disk.set_state(snapshot.machine["devices"]["disk"])
        data = bytearray(disk.size)
        disk.read(0, memoryview(data))
        return bytes(data)
    finally:
        disk.close()


def test_disk_deltas_carry_only_the_clusters_written_and_add_up_to_the_disk(disk_chain, tmp_path):
    base, paths, final = disk_chain
    pieces = [read_piece(p) for p in paths]
    for piece in pieces:
        check_pages(piece)
    assert [p.disk.carried.count(1) for p in pieces] == [4, 2, 2]  # the discarded cluster 40 is carried no more
    assert disk_after(base, guest_state(pieces)) == final
    ram, disk, last = merge(pieces[1:])  # the coordinator's compaction of the deltas
    write_piece(tmp_path / "m.ckpt", 7, last.seq, 0, last.outputs, ram, guest_state(pieces), disk)
    merged = read_piece(tmp_path / "m.ckpt")
    assert merged.disk.carried.count(1) == 3 and disk_after(base, guest_state([pieces[0], merged])) == final
    with pytest.raises(CheckpointError, match="disk overlay is not whole"):
        guest_state(pieces[1:])


@pytest.mark.parametrize("change, why", [
    (lambda d: d.pop("disk"), "does not match its guest's disk configuration"),
    (lambda d: d["disk"].update(carried=__import__("zlib").compress(bytes(64))), "full piece that does not hold"),
    (lambda d: d["disk"].update(map=b"x"), "cluster map is damaged"),
])
def test_a_piece_with_a_bad_disk_is_refused(tmp_path, disk_chain, change, why):
    with pytest.raises(CheckpointError, match=why):
        read_piece(rewrite(tmp_path / "bad.ckpt", disk_chain[1][0], change))


@pytest.mark.parametrize("order, why", [
    ([1, 2], "must begin with a full piece"),
    ([0, 2], "does not follow piece 0"),
    ([0, 1, 0], "does not follow"),
])
def test_a_broken_chain_is_refused(chain_files, order, why):
    pieces = [read_piece(chain_files[0][i]) for i in order]
    with pytest.raises(CheckpointError, match=why):
        check_chain(pieces)


def rewrite(path: Path, source: Path, change) -> Path:
    """*source*'s payload changed by *change* (a function of the decoded map), signed again."""
    import msgpack

    from conode.vm.snapshot import HEADER
    data = msgpack.unpackb(source.read_bytes()[HEADER.size:], raw=False, strict_map_key=False)
    change(data)
    write_snapshot(path, data)
    return path


@pytest.mark.parametrize("change, why", [
    (lambda d: d["checkpoint"].update(base=3), "its base 3 is not an integer from -1 to 1"),
    (lambda d: d["checkpoint"].update(seq=-1), "sequence number"),
    (lambda d: d["checkpoint"].update(job="7"), "its job"),
    (lambda d: d["checkpoint"].pop("outputs"), "how much output"),
    (lambda d: d["checkpoint"]["outputs"].update(stdout=1 << 50), "stdout offset"),
    (lambda d: d["state"].update(job=None), "runs no job"),
    (lambda d: d["state"].update(kind="x"), "not a conode guest snapshot"),
    (lambda d: d.pop("ram"), "no 'ram' map"),
])
def test_a_piece_with_a_bad_field_is_refused_by_name(tmp_path, chain_files, change, why):
    path = rewrite(tmp_path / "bad.ckpt", chain_files[0][2], change)
    with pytest.raises(CheckpointError, match=why):
        read_piece(path)


def test_a_full_piece_must_hold_every_page(tmp_path, chain_files):
    path = rewrite(tmp_path / "bad.ckpt", chain_files[0][1], lambda d: d["checkpoint"].update(base=FULL))
    with pytest.raises(CheckpointError, match="full piece that does not hold every page"):
        read_piece(path)


def test_pages_that_do_not_match_their_bitmap_are_refused(tmp_path, chain_files):
    def drop_a_page(data):
        bitmap = bytearray(data["ram"]["bitmap"])
        first = next(i for i, b in enumerate(bitmap) if b)
        bitmap[first] &= bitmap[first] - 1
        data["ram"]["bitmap"] = bytes(bitmap)

    piece = read_piece(rewrite(tmp_path / "bad.ckpt", chain_files[0][1], drop_a_page))
    with pytest.raises(CheckpointError, match="more pages than its bitmap"):
        check_pages(piece)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_pieces_only_ever_raise_checkpoint_error(tmp_path, chain_files, disk_chain, data):
    """Whatever an agent sends, reading and checking it ends in CheckpointError or a valid piece."""
    source = data.draw(st.sampled_from([chain_files[0][1], disk_chain[1][1]])).read_bytes()
    how = data.draw(st.sampled_from(["flip", "cut", "payload"]))
    path = tmp_path / "fuzz.ckpt"
    if how == "flip":
        blob = bytearray(source)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(blob))
    elif how == "cut":
        path.write_bytes(source[:data.draw(st.integers(0, len(source) - 1))])
    else:  # a payload signed again: the parser itself must hold
        import msgpack

        from conode.vm.snapshot import HEADER
        payload = bytearray(source[HEADER.size:])
        for _ in range(data.draw(st.integers(1, 6))):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        try:
            decoded = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
        except (ValueError, TypeError, OverflowError, msgpack.UnpackException):
            decoded = {"garbage": True}
        write_snapshot(path, decoded if isinstance(decoded, dict) else {"x": decoded})
    try:
        check_pages(read_piece(path))
    except CheckpointError:
        pass


# --- the coordinator's store -----------------------------------------------------------------------------------
def upload(store: CheckpointStore, job: int, path: Path, seq: int, base: int) -> str | None:
    data = path.read_bytes()
    for index in range(-(-len(data) // IMAGE_CHUNK_BYTES)):
        problem = store.put(job, seq, index, data[index * IMAGE_CHUNK_BYTES:(index + 1) * IMAGE_CHUNK_BYTES])
        if problem:
            return problem
    return store.commit(job, seq, base, len(data), hashlib.sha256(data).hexdigest())


def test_the_store_keeps_a_verified_chain_and_forgets_it(tmp_path, chain_files):
    paths, _ = chain_files
    store = CheckpointStore(tmp_path / "ck", 1 << 30)
    for seq, path in enumerate(paths):
        assert upload(store, 7, path, seq, seq - 1 if seq else FULL) is None
    assert [l.seq for l in store.chain(7)] == [0, 1, 2, 3]
    assert store.outputs(7) == {"stdout": 30, "stderr": 3}
    sent = list(store.chunks(7))
    assert b"".join(d for s, _, d in sent if s == 0) == paths[0].read_bytes()
    assert store.used == sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
    assert "holds piece 0 (on -1) of job 7" in upload(store, 7, paths[0], 4, FULL)
    store.sweep(lambda job: job != 7)
    assert store.chain(7) == [] and store.used == 0


@pytest.mark.parametrize("seq, base, why", [
    (2, 0, "is a delta on piece 0, but the job's newest checkpoint is 1"),
    (1, FULL, "(on -1) of job 7 holds piece 2 (on 0) of job 7"),
])
def test_a_piece_that_does_not_follow_the_chain_is_refused(tmp_path, chain_files, seq, base, why):
    paths, _ = chain_files
    store = CheckpointStore(tmp_path / "ck", 1 << 30)
    assert upload(store, 7, paths[0], 0, FULL) is None and upload(store, 7, paths[1], 1, 0) is None
    wrong = rewrite(tmp_path / "wrong.ckpt", paths[2], lambda d: d["checkpoint"].update(base=0))
    assert why in upload(store, 7, wrong, seq, base)
    assert [l.seq for l in store.chain(7)] == [0, 1]


def test_a_damaged_or_disordered_upload_is_refused(tmp_path, chain_files):
    paths, _ = chain_files
    store = CheckpointStore(tmp_path / "ck", 1 << 30)
    data = paths[0].read_bytes()
    assert store.put(7, 0, 0, data[:IMAGE_CHUNK_BYTES]) is None
    assert "out of order" in store.put(7, 0, 2, data[:10])
    assert "never uploaded whole" in store.commit(7, 0, FULL, len(data), "0" * 64)
    assert store.put(7, 0, 0, data) is None
    assert "does not match its SHA-256" in store.commit(7, 0, FULL, len(data), "0" * 64)
    assert store.chain(7) == [] and store.used == 0


def test_the_budget_is_never_passed(tmp_path, chain_files):
    paths, _ = chain_files
    store = CheckpointStore(tmp_path / "ck", paths[0].stat().st_size + 4096 + 100)
    assert upload(store, 7, paths[0], 0, FULL) is None
    assert "past their budget" in upload(store, 8, paths[0], 0, FULL)
    assert store.used <= store.budget_bytes and store.chain(8) == []


def test_a_long_chain_is_merged_and_still_adds_up(tmp_path, envelope):
    rng = random.Random(9)
    ram = random_ram(rng)
    store = CheckpointStore(tmp_path / "ck", 1 << 30)
    assert upload(store, 7, make_piece(tmp_path / "p0", envelope, ram, None, 0, FULL), 0, FULL) is None
    for seq in range(1, MAX_CHAIN_PIECES + 1):
        piece = make_piece(tmp_path / f"p{seq}", envelope, ram, scribble(ram, rng, 20), seq, seq - 1)
        assert upload(store, 7, piece, seq, seq - 1) is None
    chain = store.chain(7)
    assert [(l.seq, l.base) for l in chain] == [(0, FULL), (MAX_CHAIN_PIECES, 0)]
    memory = bytearray(len(ram))
    materialize([read_piece(store.piece_path(7, l.seq)) for l in chain], memoryview(memory))
    assert memory == ram
    assert store.used == sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())


def test_truncate_output_keeps_each_streams_first_bytes(tmp_path):
    store = Store(tmp_path / "db")
    job = store.add_job(["true"], {}, [], 128, "admin", 1, None, None, None)
    for stream, data in [("stdout", b"abc"), ("stderr", b"E1"), ("stdout", b"defg"), ("stderr", b"E2")]:
        store.append_output(job, stream, data)
    store.truncate_output(job, {"stdout": 5, "stderr": 2})
    assert store.output(job) == {"stdout": b"abcde", "stderr": b"E1"}
    store.append_output(job, "stdout", b"fg")
    assert store.output(job)["stdout"] == b"abcdefg"
    store.close()


def test_a_follower_learns_where_output_cut_back_to_a_checkpoint_goes_on(tmp_path):
    store = Store(tmp_path / "db")
    job = store.add_job(["true"], {}, [], 128, "admin", 1, None, None, None)
    for data in (b"one\n", b"two\n"):
        store.append_output(job, "stdout", data)
    seen = store.output_since(job, 0, 1 << 20)
    assert (seen.streams["stdout"], seen.at["stdout"], seen.restarted) == (b"one\ntwo\n", 0, False)
    store.truncate_output(job, {"stdout": 0, "stderr": 0})  # the checkpoint came before any output
    store.append_output(job, "stdout", b"one\n")
    again = store.output_since(job, seen.cursor, 1 << 20)
    assert (again.streams["stdout"], again.at["stdout"], again.restarted) == (b"one\n", 0, False)
    store.clear_output(job)  # an attempt from the beginning: its output is all new
    store.append_output(job, "stdout", b"new\n")
    assert store.output_since(job, again.cursor, 1 << 20).restarted
    store.close()


# --- the coordinator's decisions ------------------------------------------------------------------------------
@pytest.fixture
def pool(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "coordinator.toml").write_text("checkpoint_interval_s = 5.0\n")
    p = DecisionPool(state)
    yield p
    p.close()


def put_piece(pool, node: str, job: int, path: Path, seq: int, base: int) -> list[dict]:
    data = path.read_bytes()
    answers = []
    for index in range(-(-len(data) // IMAGE_CHUNK_BYTES)):
        answers += pool.send(node, "checkpoint_put", job=job, seq=seq, index=index,
                             data=data[index * IMAGE_CHUNK_BYTES:(index + 1) * IMAGE_CHUNK_BYTES])
    answers += pool.send(node, "checkpoint_commit", job=job, seq=seq, base=base, size=len(data),
                         sha256=hashlib.sha256(data).hexdigest())
    pool.coordinator.checkpoints_checked(wait=True)
    return answers + pool.take(node)


def test_a_lost_nodes_job_goes_on_from_its_checkpoint_elsewhere(pool, tmp_path, envelope):
    pool.hello("n1")
    job = pool.submit()
    (placed,) = [m for m in pool.take("n1") if m["type"] == "run_job"]
    assert placed["checkpoint_s"] == 5.0 and "resume" not in placed
    pool.send("n1", "job_output", job=job, stream="stdout", data=b"one\ntwo\n")
    ram = random_ram(random.Random(1))
    piece = make_piece(tmp_path / "p0", envelope, ram, None, 0, FULL, job=job, outputs={"stdout": 4, "stderr": 0})
    # another node's data for a job it does not run is refused, and nothing is kept
    pool.hello("n2")
    refused = put_piece(pool, "n2", job, piece, 0, FULL)
    assert refused and refused[0]["type"] == "checkpoint_reply" and not refused[0]["ok"]
    assert "does not run on n2" in refused[0]["reason"] and pool.coordinator.checkpoints.chain(job) == []
    answers = put_piece(pool, "n1", job, piece, 0, FULL)
    assert answers == [{"v": protocol.PROTOCOL_VERSION, "type": "checkpoint_reply", "job": job, "seq": 0, "ok": True}]
    pool.send("n1", "job_output", job=job, stream="stdout", data=b"three\n")  # after the checkpoint: said again
    pool.clock.advance(60)
    pool.beat("n2")
    pool.housekeeping()
    messages = pool.take("n2")
    chunks = [m for m in messages if m["type"] == "checkpoint_data"]
    (run,) = [m for m in messages if m["type"] == "run_job"]
    assert messages.index(run) > messages.index(chunks[-1])  # the chain arrives before the job
    assert b"".join(m["data"] for m in chunks) == piece.read_bytes()
    assert run["resume"] == [{"seq": 0, "size": piece.stat().st_size,
                              "sha256": hashlib.sha256(piece.read_bytes()).hexdigest()}]
    assert pool.ask("logs", job=job)["stdout"] == b"one\n"
    # it cannot go on from it there: the checkpoint is dropped and the next attempt starts afresh
    pool.send("n2", "job_failed", job=job, reason="the job could not go on from its checkpoint: x", retry=True)
    assert pool.coordinator.checkpoints.chain(job) == []


def test_a_moved_jobs_checkpoints_go_on_from_its_destination_and_no_more_from_its_source(pool, tmp_path, envelope):
    for name in ("n1", "n2"):
        pool.hello(name)
    job = pool.submit()
    source = next(name for name in ("n1", "n2") if any(m["type"] == "run_job" for m in pool.take(name)))
    target = "n2" if source == "n1" else "n1"
    pool.send(source, "job_output", job=job, stream="stdout", data=b"one\ntwo\n")
    ram = random_ram(random.Random(2))
    kept = make_piece(tmp_path / "p0", envelope, ram, None, 0, FULL, job=job, outputs={"stdout": 4, "stderr": 0})
    assert put_piece(pool, source, job, kept, 0, FULL)[0]["ok"]
    late = make_piece(tmp_path / "p1", envelope, ram, [1, 2], 1, 0, job=job, outputs={"stdout": 8, "stderr": 0})
    data = late.read_bytes()
    pool.send(source, "checkpoint_put", job=job, seq=1, index=0, data=data)  # under way as the guest moves
    assert pool.ask("migrate", job=job, to=target)["type"] == "ok"
    (move_in,) = [m for m in pool.take(target) if m["type"] == "move_in"]
    pool.send(target, "move_listening", job=job, epoch=move_in["epoch"], endpoint="tcp://10.0.0.9:4000", key="k")
    pool.send(source, "job_output", job=job, stream="stderr", data=b"oops\n")  # before the guest stopped there
    assert [m["type"] for m in pool.send(source, "move_ready", job=job, epoch=move_in["epoch"])] == ["move_go"]
    # The source's piece is refused once the guest is the destination's; the chain it had stays the job's
    refused = pool.send(source, "checkpoint_commit", job=job, seq=1, base=0, size=len(data),
                        sha256=hashlib.sha256(data).hexdigest())
    assert not refused[0]["ok"] and f"does not run on {source}" in refused[0]["reason"]
    assert [link.seq for link in pool.coordinator.checkpoints.chain(job)] == [0]
    # Once the guest runs there, the destination takes its checkpoints: a full piece past the source's numbers,
    # its output offsets those the coordinator holds from the source
    assert pool.send(target, "move_arrived", job=job, epoch=move_in["epoch"]) == [
        {"v": protocol.PROTOCOL_VERSION, "type": "checkpoint_start", "job": job, "interval_s": 5.0, "seq": 2,
         "stdout": 8, "stderr": 5}]
    pool.send(target, "job_output", job=job, stream="stdout", data=b"three\n")
    first = make_piece(tmp_path / "p2", envelope, ram, None, 2, FULL, job=job, outputs={"stdout": 14, "stderr": 5})
    assert [m["ok"] for m in put_piece(pool, target, job, first, 2, FULL) if m["type"] == "checkpoint_reply"] == [True]
    assert [link.seq for link in pool.coordinator.checkpoints.chain(job)] == [2]
    assert pool.coordinator.checkpoints.outputs(job) == {"stdout": 14, "stderr": 5}


# --- the agent's side ------------------------------------------------------------------------------------------
class RecordingLink:
    """The coordinator link as the agent's checkpoints use it: sends go (or not) and are kept."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[tuple[str, dict]] = []

    def send_now(self, kind: str, **fields) -> bool:
        if self.up:
            protocol.encode(kind, **fields)  # what the protocol refuses would raise here
            self.sent.append((kind, fields))
        return self.up


def agent_checkpoints(tmp_path, link):
    from conode.agent.checkpoints import Checkpoints
    from conode.agent.disk import StateDisk

    return Checkpoints(tmp_path / "agent", link, StateDisk())


def announce(checkpoints, source: Path, job: int = 7, seq: int = 0, base: int = FULL) -> dict:
    path = checkpoints.out_dir / f"job-{job}-{seq}.ckpt"
    path.write_bytes(source.read_bytes())
    data = path.read_bytes()
    return {"type": "checkpoint", "job": job, "seq": seq, "base": base, "path": str(path), "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "pages": 1, "final_pages": 0, "stall_s": 0.0, "took_s": 0.0}


def test_the_agent_sends_a_piece_in_chunks_and_the_coordinator_gets_it_whole(tmp_path, chain_files):
    link = RecordingLink()
    checkpoints = agent_checkpoints(tmp_path, link)
    message = announce(checkpoints, chain_files[0][0])
    assert checkpoints.send(message) is None
    assert not Path(message["path"]).exists()  # sent: not kept on the workstation
    puts = [fields for kind, fields in link.sent if kind == "checkpoint_put"]
    assert [p["index"] for p in puts] == list(range(len(puts)))
    assert b"".join(p["data"] for p in puts) == chain_files[0][0].read_bytes()
    assert link.sent[-1] == ("checkpoint_commit", {"job": 7, "seq": 0, "base": FULL, "size": message["size"],
                                                   "sha256": message["sha256"]})


def test_the_agent_drops_a_piece_it_cannot_send_or_that_is_not_where_it_should_be(tmp_path, chain_files):
    down = agent_checkpoints(tmp_path, RecordingLink(up=False))
    message = announce(down, chain_files[0][1], seq=1, base=0)
    assert down.send(message) == "the coordinator link is busy or down" and not Path(message["path"]).exists()
    link = RecordingLink()
    checkpoints = agent_checkpoints(tmp_path, link)
    elsewhere = {**announce(checkpoints, chain_files[0][1], seq=1, base=0), "path": str(tmp_path / "x.ckpt")}
    assert "not in" in checkpoints.send(elsewhere) and link.sent == []


def test_the_agent_resumes_only_from_a_chain_that_arrived_whole(tmp_path, chain_files):
    from conode.agent.checkpoints import CheckpointRefused

    checkpoints = agent_checkpoints(tmp_path, RecordingLink())
    pieces = []
    for seq, path in enumerate(chain_files[0][:2]):
        data = path.read_bytes()
        pieces.append({"seq": seq, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        for index in range(-(-len(data) // IMAGE_CHUNK_BYTES)):
            checkpoints.receive({"job": 7, "seq": seq, "index": index,
                                 "data": data[index * IMAGE_CHUNK_BYTES:(index + 1) * IMAGE_CHUNK_BYTES]})
    files = checkpoints.chain(7, pieces)
    assert [Path(f).read_bytes() for f in files] == [p.read_bytes() for p in chain_files[0][:2]]
    with pytest.raises(CheckpointRefused, match="piece 1 arrived damaged"):
        checkpoints.chain(7, [pieces[0], {**pieces[1], "sha256": "0" * 64}])
    with pytest.raises(CheckpointRefused, match="piece 5 did not arrive"):
        checkpoints.chain(7, [{**pieces[0], "seq": 5}])
    with pytest.raises(CheckpointRefused, match="not valid"):
        checkpoints.chain(7, [{"seq": "0"}])
    checkpoints.forget(7)
    with pytest.raises(CheckpointRefused, match="did not arrive"):
        checkpoints.chain(7, pieces)


@pytest.mark.parametrize("text, why", [
    ("checkpoint_interval_s = -1\n", "checkpoint_interval_s .* is -1; set it to a number from 0 to"),
    ("checkpoint_interval_s = \"often\"\n", "is 'often'"),
    ("checkpoint_budget_mib = true\n", "checkpoint_budget_mib"),
])
def test_checkpoint_settings_out_of_range_are_refused_by_name(tmp_path, text, why):
    from conode.errors import ConodeError
    from coordinator.config import StateDir

    (tmp_path / "coordinator.toml").write_text(text)
    state = StateDir(tmp_path)
    with pytest.raises(ConodeError, match=why):
        state.checkpoint_interval_s()
        state.checkpoint_budget_mib()


def test_checkpoint_settings_default_and_read(tmp_path):
    from coordinator.config import StateDir

    assert StateDir(tmp_path).checkpoint_interval_s() == 600.0
    (tmp_path / "coordinator.toml").write_text("checkpoint_interval_s = 0\ncheckpoint_budget_mib = 64\n")
    assert StateDir(tmp_path).checkpoint_interval_s() == 0.0 and StateDir(tmp_path).checkpoint_budget_mib() == 64
