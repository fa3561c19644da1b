"""cobd's virtio-blk device under a driver: well-formed requests against a model of the disk, and hostile ones.

Every test runs with the device's Python request path and with its C path (block_native), copying into RAM
and reading straight into it: all must behave exactly alike (the last test compares them on the same hostile
traffic). Whatever the guest posts, the device raises nothing, answers every request it can with a status (IOERR or
UNSUPP for what it cannot carry out), never lets a request reach outside the disk or the budget, and only a
broken ring stops the queue.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parts import RINGS, HostRam, Ram, bring_up

from conode.vm.devices.irq import IrqLine
from conode.vm.devices.legacy.pic import PicPair
from conode.vm.devices.virtio.block import (
    F_DISCARD,
    F_FLUSH,
    F_RO,
    MAX_REQUEST_BYTES,
    READ_CHUNK,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SEG_MAX,
    SIZE_MAX,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VirtioBlock,
)
from conode.vm.devices.virtio.mmio import (
    REG_CONFIG,
    REG_DEVICE_FEATURES,
    REG_DEVICE_ID,
    REG_QUEUE_NOTIFY,
    REG_QUEUE_NUM_MAX,
    REG_STATUS,
    STATUS_NEEDS_RESET,
    VirtioMmio,
)
from conode.vm.disk.image import BaseImage
from conode.vm.disk.overlay import CLUSTER, CowDisk

RAM_SIZE = 1 << 18
DATA_AREA = 0x10000  # data buffers live above the rings
DISK_BYTES = 64 << 10
QSIZE = 256


PATHS = ("python", "native", "native-direct")  # direct: straight from the files into RAM
_path = {"now": "python"}  # the request path the Rigs of the running test use


@pytest.fixture(autouse=True, params=PATHS)
def request_path(request: pytest.FixtureRequest) -> str:
    _path["now"] = request.param
    return request.param


class Rig:
    """A virtio-blk device on a copy-on-write disk over a random base image, and a driver posting chains."""

    def __init__(self, base: Path, budget: int = 1 << 20, read_only: bool = False, qsize: int = QSIZE,
                 ram_size: int = RAM_SIZE, path: str | None = None) -> None:
        self.base = base.read_bytes()
        self.disk = CowDisk(BaseImage(base), None, budget, read_only)
        chosen = path or _path["now"]
        native = chosen != "python"
        self.ram = HostRam(ram_size, chosen == "native-direct") if native else Ram(ram_size)
        self.pic = PicPair()
        self.device = VirtioBlock(self.disk)
        self.transport = VirtioMmio(self.device, IrqLine(self.pic, 5), self.ram)
        self.qsize = qsize
        bring_up(self.transport, (qsize,), RINGS[:1])
        assert (self.device._native is not None) == native, "the C request path did not load (a C compiler?)"
        self.avail = 0
        self.model = bytearray(self.base)

    def post(self, chain: list[tuple[int, int, int]]) -> tuple[int, int] | None:
        """Post one chain of (address, length, flags) and notify; return (written, status byte) if used."""
        desc, avail, used = RINGS[0]
        data = self.ram.data
        for i, (address, length, flags) in enumerate(chain):
            link = 1 if i < len(chain) - 1 else 0
            struct.pack_into("<QIHH", data, desc + 16 * i, address, length, flags | link, i + 1)
        struct.pack_into("<H", data, avail + 4 + 2 * (self.avail % self.qsize), 0)
        self.avail = (self.avail + 1) & 0xFFFF
        struct.pack_into("<H", data, avail + 2, self.avail)
        before = struct.unpack_from("<H", data, used + 2)[0]
        self.transport.write(REG_QUEUE_NOTIFY, 4, 0)
        after = struct.unpack_from("<H", data, used + 2)[0]
        if after == before:
            return None
        head, written = struct.unpack_from("<II", data, used + 4 + 8 * (before % self.qsize))
        assert head == 0
        return written, None if not chain or not chain[-1][2] & 2 else data[chain[-1][0] + chain[-1][1] - 1]

    def request(self, kind: int, sector: int, data: bytes = b"", read: int = 0, pieces: int = 1,
                status_len: int = 1) -> tuple[int, bytes]:
        """A request as Linux lays it out: header, data in *pieces* buffers, status; return (status, data in)."""
        ram = self.ram.data
        struct.pack_into("<IIQ", ram, DATA_AREA, kind, 0, sector)
        chain = [(DATA_AREA, 16, 0)]
        at = DATA_AREA + 16
        length, flags = (len(data), 0) if data else (read, 2)
        ram[at:at + len(data)] = data
        cuts = sorted({0, length, *random.Random(length).sample(range(length + 1), min(pieces - 1, length))})
        for lo, hi in zip(cuts, cuts[1:]):
            chain.append((at + lo, hi - lo, flags))
        status_at = at + length
        ram[status_at:status_at + status_len] = b"\xEE" * status_len
        chain.append((status_at, status_len, 2))
        _, status = self.post(chain)
        return status, bytes(ram[at:at + read])


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.img"
    path.write_bytes(random.Random(5).randbytes(DISK_BYTES))
    return path


def config(rig: Rig, offset: int, size: int) -> int:
    return rig.transport.read(REG_CONFIG + offset, size)


def test_identity_features_and_configuration(base: Path) -> None:
    rig = Rig(base)
    t = rig.transport
    assert t.read(REG_DEVICE_ID, 4) == 2
    features = t.read(REG_DEVICE_FEATURES, 4)
    assert features & F_FLUSH and features & F_DISCARD and not features & F_RO
    assert config(rig, 0, 8) == DISK_BYTES // 512
    assert (config(rig, 8, 4), config(rig, 12, 4), config(rig, 20, 4)) == (SIZE_MAX, SEG_MAX, 512)
    assert config(rig, 24, 1) == 3  # 4 KiB physical blocks
    assert t.read(REG_QUEUE_NUM_MAX, 4) == SEG_MAX + 2  # a request of seg_max buffers fits in the ring
    assert config(rig, 200, 4) == 0
    read_only = Rig(base, read_only=True)
    assert read_only.transport.read(REG_DEVICE_FEATURES, 4) & F_RO
    assert not read_only.transport.read(REG_DEVICE_FEATURES, 4) & F_DISCARD


def test_reads_writes_flush_and_id(base: Path) -> None:
    rig = Rig(base)
    assert rig.request(T_IN, 3, read=1024, pieces=3) == (S_OK, rig.base[1536:2560])
    payload = bytes(range(256)) * 6
    assert rig.request(T_OUT, 1, payload, pieces=4)[0] == S_OK
    assert rig.request(T_IN, 0, read=2048) == (S_OK, rig.base[:512] + payload + rig.base[2048:2048])
    assert rig.request(T_FLUSH, 0)[0] == S_OK
    status, ident = rig.request(T_GET_ID, 0, read=20)
    assert status == S_OK and ident.rstrip(b"\0") == b"cobd"
    assert Path(base).read_bytes() == rig.base  # the base image never changes


def test_bad_requests_get_an_error_status_and_the_queue_goes_on(base: Path) -> None:
    rig = Rig(base, budget=2 * CLUSTER)
    last = DISK_BYTES // 512
    assert rig.request(T_IN, last, read=512)[0] == S_IOERR  # past the end
    assert rig.request(T_IN, last - 1, read=1024)[0] == S_IOERR  # straddles the end
    assert rig.request(T_IN, 2 ** 63, read=512)[0] == S_IOERR
    assert rig.request(T_IN, 0, read=100)[0] == S_IOERR  # not whole sectors
    assert rig.request(T_OUT, 0, b"x" * 700)[0] == S_IOERR
    assert rig.request(99, 0)[0] == S_UNSUPP
    assert rig.request(T_OUT, 0, bytes(3 * CLUSTER))[0] == S_IOERR  # past the budget
    assert rig.request(T_DISCARD, 0, struct.pack("<QII", 0, 8, 1))[0] == S_UNSUPP  # unmap flag on a discard
    assert rig.request(T_DISCARD, 0, b"short")[0] == S_IOERR
    assert rig.request(T_IN, 0, read=512, status_len=4)[0] == S_IOERR  # 3 bytes before the status: no sector
    # a header shorter than 16 bytes
    assert rig.post([(DATA_AREA, 8, 0), (DATA_AREA + 100, 1, 2)]) == (1, S_IOERR)
    # device-writable buffers before device-readable ones
    assert rig.post([(DATA_AREA, 16, 2), (DATA_AREA + 100, 512, 0), (DATA_AREA + 700, 1, 2)])[1] == S_IOERR
    assert rig.post([(DATA_AREA, 16, 0)]) == (0, None)  # nowhere to put a status: returned untouched
    assert not rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET
    assert rig.request(T_IN, 0, read=512) == (S_OK, rig.base[:512])


def test_an_oversized_request_is_refused_without_reading_it(base: Path) -> None:
    rig = Rig(base)
    # 200 buffers of 192 KiB over the same RAM: 37.5 MiB, more than the device ever advertised
    chain = [(DATA_AREA, 16, 0)] + [(DATA_AREA, 3 * SIZE_MAX, 2)] * 200 + [(DATA_AREA + 32, 1, 2)]
    assert rig.post(chain)[1] == S_IOERR
    assert 200 * 3 * SIZE_MAX > MAX_REQUEST_BYTES


def test_a_read_larger_than_the_scratch_buffer_arrives_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(random.Random(7).randbytes(3 * READ_CHUNK))
    rig = Rig(path, ram_size=4 * READ_CHUNK)
    length = 2 * READ_CHUNK + 5 * 512  # three chunks, the last one short, over buffers that straddle them
    assert rig.request(T_IN, 3, read=length, pieces=200) == (S_OK, rig.base[3 * 512:3 * 512 + length])
    if isinstance(rig.ram, HostRam):  # the C path told the memory of every byte it wrote, one way or the other
        assert rig.ram.dma_done if rig.ram.native.dma_done else rig.ram.dma_writes


def test_a_read_only_disk_refuses_writes(base: Path) -> None:
    rig = Rig(base, read_only=True)
    assert rig.request(T_OUT, 0, b"x" * 512)[0] == S_IOERR
    assert rig.request(T_DISCARD, 0, struct.pack("<QII", 0, 8, 0))[0] == S_UNSUPP
    assert rig.request(T_FLUSH, 0)[0] == S_OK
    assert rig.request(T_IN, 0, read=512) == (S_OK, rig.base[:512])


# --- the fuzz ------------------------------------------------------------------------------------------------
SECTORS = DISK_BYTES // 512
sector = st.one_of(st.integers(0, SECTORS), st.integers(0, SECTORS + 8), st.integers(0, 2 ** 64 - 1))
sectors = st.one_of(st.integers(1, 24), st.integers(0, 2 ** 32 - 1))
well_formed = st.tuples(st.sampled_from(["in", "out", "flush", "id", "discard", "zeroes"]), st.integers(0, SECTORS),
                        st.integers(1, 24), st.integers(1, 6), st.binary(min_size=1, max_size=1))
ranges = st.lists(st.tuples(sector, sectors, st.sampled_from([0, 0, 1, 2])), min_size=0, max_size=3)
garbage_chain = st.lists(st.tuples(st.integers(0, RAM_SIZE + 64), st.one_of(st.integers(0, 40000),
                                                                             st.integers(0, 2 ** 32 - 1)),
                                   st.sampled_from([0, 2, 4, 6])), min_size=1, max_size=8)
header = st.tuples(st.one_of(st.sampled_from([0, 1, 4, 8, 11, 13]), st.integers(0, 2 ** 32 - 1)), sector)
operation = st.one_of(
    well_formed, well_formed, well_formed,
    st.tuples(st.just("ranges"), st.sampled_from([T_DISCARD, T_WRITE_ZEROES]), ranges),
    st.tuples(st.just("header"), header, garbage_chain),
    st.tuples(st.just("garbage"), garbage_chain),
)


def run_well_formed(rig: Rig, op: tuple) -> None:
    kind, first, count, pieces, fill = op
    in_range = first + count <= SECTORS
    offset, length = first * 512, count * 512
    if kind == "in":
        status, data = rig.request(T_IN, first, read=length, pieces=pieces)
        assert status == (S_OK if in_range else S_IOERR)
        if in_range:
            assert data == rig.model[offset:offset + length]
    elif kind == "out":
        data = fill * length
        status, _ = rig.request(T_OUT, first, data, pieces=pieces)
        fits = rig.disk.allocated * CLUSTER + length + 2 * CLUSTER <= rig.disk.budget_bytes
        assert status == S_OK if in_range and fits else status in (S_OK, S_IOERR)
        if status == S_OK:
            rig.model[offset:offset + length] = data
    elif kind == "flush":
        assert rig.request(T_FLUSH, 0)[0] == S_OK
    elif kind == "id":
        status, ident = rig.request(T_GET_ID, 0, read=20, pieces=pieces)
        assert status == S_OK and ident.startswith(b"cobd")
    else:
        table = struct.pack("<QII", first, count, 0)
        status, _ = rig.request(T_DISCARD if kind == "discard" else T_WRITE_ZEROES, 0, table)
        if kind == "discard":
            assert status == (S_OK if in_range else S_IOERR)
        if status == S_OK:
            apply_ranges(rig, T_DISCARD if kind == "discard" else T_WRITE_ZEROES, [(first, count)])


def apply_ranges(rig: Rig, kind: int, spans: list[tuple[int, int]]) -> None:
    for first, count in spans:
        lo, hi = first * 512, (first + count) * 512
        if kind == T_WRITE_ZEROES:
            rig.model[lo:hi] = bytes(hi - lo)
        else:  # whole clusters read from the base again; the ends keep what they held
            a, b = -(-lo // CLUSTER) * CLUSTER, hi // CLUSTER * CLUSTER
            if a < b:
                rig.model[a:b] = rig.base[a:b]


def run_op(rig: Rig, op: tuple) -> None:
    if op[0] == "ranges":
        _, kind, spans = op
        status, _ = rig.request(kind, 0, b"".join(struct.pack("<QII", *s) for s in spans))
        assert status in (S_OK, S_IOERR, S_UNSUPP)
        if status == S_OK:
            apply_ranges(rig, kind, [(s[0], s[1]) for s in spans])
        else:  # a failed request may have done part of its work (the ranges before the one that failed)
            resync(rig)
    elif op[0] == "header":
        _, (kind, first), chain = op
        struct.pack_into("<IIQ", rig.ram.data, DATA_AREA, kind, 0, first)
        if rig.post([(DATA_AREA, 16, 0)] + chain) is not None and kind in (T_OUT, T_DISCARD, T_WRITE_ZEROES):
            resync(rig)
    elif op[0] == "garbage":
        if rig.post(op[1]) is not None:
            resync(rig)
    else:
        run_well_formed(rig, op)


def resync(rig: Rig) -> None:
    """A hostile request may have changed the disk in a way the model cannot predict: read it back whole."""
    buffer = bytearray(DISK_BYTES)
    rig.disk.read(0, memoryview(buffer))
    rig.model[:] = buffer


@settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40), budget_clusters=st.sampled_from([2, 8, 64]))
def test_random_requests_against_a_model_of_the_disk(tmp_path_factory, ops, budget_clusters) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "base.img"
    path.write_bytes(random.Random(9).randbytes(DISK_BYTES))
    rig = Rig(path, budget=budget_clusters * CLUSTER, qsize=256)
    for op in ops:
        if rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET:
            break  # a broken ring: the driver must reset the device
        run_op(rig, op)
    assert rig.disk.allocated <= budget_clusters
    if not rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET:
        assert rig.request(T_IN, 0, read=32768)[1] == rig.model[:32768]
    assert path.read_bytes() == rig.base  # the base image never changes


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=30), budget_clusters=st.sampled_from([2, 64]))
def test_the_c_path_does_exactly_what_the_python_path_does(tmp_path_factory, request_path, ops,
                                                            budget_clusters) -> None:
    if request_path != "python":
        return  # one run compares the paths
    path = tmp_path_factory.mktemp("same") / "base.img"
    path.write_bytes(random.Random(11).randbytes(DISK_BYTES))
    rigs = [Rig(path, budget=budget_clusters * CLUSTER, path=p) for p in PATHS]
    for op in ops:
        for rig in rigs:
            random.seed(1)  # request() cuts buffers at random places: the same ones in both
            if not rig.transport.read(REG_STATUS, 4) & STATUS_NEEDS_RESET:
                run_op_blind(rig, op)
        python = rigs[0]
        for native in rigs[1:]:
            assert native.ram.data == python.ram.data  # data, status bytes and the used ring alike
            assert native.transport.read(REG_STATUS, 4) == python.transport.read(REG_STATUS, 4)
            assert native.disk.map == python.disk.map and native.disk.allocated == python.disk.allocated
    contents = []
    for rig in rigs:
        buffer = bytearray(DISK_BYTES)
        rig.disk.read(0, memoryview(buffer))
        contents.append(buffer)
    assert contents[0] == contents[1] == contents[2]


def run_op_blind(rig: Rig, op: tuple) -> None:
    """Post *op* without judging the outcome (the comparison judges)."""
    if op[0] == "ranges":
        rig.request(op[1], 0, b"".join(struct.pack("<QII", *s) for s in op[2]))
    elif op[0] == "header":
        _, (kind, first), chain = op
        struct.pack_into("<IIQ", rig.ram.data, DATA_AREA, kind, 0, first)
        rig.post([(DATA_AREA, 16, 0)] + chain)
    elif op[0] == "garbage":
        rig.post(op[1])
    else:
        kind, first, count, pieces, fill = op
        number = {"in": T_IN, "out": T_OUT, "flush": T_FLUSH, "id": T_GET_ID, "discard": T_DISCARD,
                  "zeroes": T_WRITE_ZEROES}[kind]
        if kind == "in":
            rig.request(number, first, read=count * 512, pieces=pieces)
        elif kind == "out":
            rig.request(number, first, fill * count * 512, pieces=pieces)
        elif kind in ("flush", "id"):
            rig.request(number, 0, read=20 if kind == "id" else 0, pieces=pieces)
        else:
            rig.request(number, 0, struct.pack("<QII", first, count, 0))
