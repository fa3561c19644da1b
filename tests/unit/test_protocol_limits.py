# SPDX-License-Identifier: GPL-2.0-or-later
"""The protocol enforces the pool-wide limits (conode.limits) on what a job may carry, both ways."""

import math

import msgpack
import pytest

from conode import limits
from conode.cluster import protocol
from conode.cluster.protocol import JOB_CWD_BYTES, PROTOCOL_VERSION, ProtocolError, argv_bytes, decode, encode
from conode.limits import (IMAGE_CHUNK_BYTES, MAX_DISK_BUDGET_MIB, MAX_FILES, MAX_FRAME_BYTES, MAX_IMAGE_BYTES,
                           MAX_IMAGE_CHUNKS, MAX_IMAGE_NAME, MAX_JOB_INPUT_BYTES)


def packed(kind, **fields):
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": kind, **fields}, use_bin_type=True)


def refused_both_ways(kind, match, **fields):
    """Neither side can build the message, nor accept it from the wire; the error names the problem."""
    with pytest.raises(ProtocolError, match=match):
        encode(kind, **fields)
    with pytest.raises(ProtocolError, match=match):
        decode(packed(kind, **fields))


def accepted_both_ways(kind, **fields):
    assert decode(encode(kind, **fields))["type"] == kind


def submit(**changes):
    fields = {"argv": ["true"], "inputs": {}, "outputs": [], "mem_mib": limits.DEFAULT_GUEST_MEM_MIB}
    fields.update(changes)
    return fields


def test_the_protocol_limits_are_the_pool_wide_ones():
    for name in ("MAX_FRAME_BYTES", "MAX_SMALL_FIELD", "MAX_ARGV", "MAX_FILES"):
        assert getattr(protocol, name) == getattr(limits, name)


# --- outputs asked for --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["submit", "run_job"])
def test_outputs_must_be_safe_relative_paths(kind):
    extra = {"job": 1} if kind == "run_job" else {}
    for bad in ["../x", "/etc/passwd", "a/../../b", "", "a//b", "x\0y", "é" * (limits.MAX_PATH_BYTES // 2 + 1)]:
        refused_both_ways(kind, "'outputs'.*not a relative path", **extra, **submit(outputs=[bad]))
    accepted_both_ways(kind, **extra, **submit(outputs=["out/result.txt", "é" * (limits.MAX_PATH_BYTES // 2)]))


@pytest.mark.parametrize("kind", ["submit", "run_job"])
def test_at_most_max_files_outputs(kind):
    extra = {"job": 1} if kind == "run_job" else {}
    names = [f"out{i}" for i in range(limits.MAX_FILES + 1)]
    refused_both_ways(kind, f"'outputs' has {limits.MAX_FILES + 1} entries", **extra, **submit(outputs=names))
    accepted_both_ways(kind, **extra, **submit(outputs=names[:-1]))


def test_outputs_must_be_text():
    with pytest.raises(ProtocolError, match="'outputs'"):
        decode(packed("submit", **submit(outputs=[b"bytes"])))


# --- the command --------------------------------------------------------------------------------------------
def test_argv_byte_budget_counts_utf8_a_nul_each_and_the_working_directory():
    assert argv_bytes(["ab", "é"]) == 3 + 3
    budget = limits.MAX_ARGV_BYTES - JOB_CWD_BYTES
    # Arguments of 4,000 characters, 3 bytes each in UTF-8: the byte budget binds before the count does.
    arg = "€" * 4000
    per_arg = argv_bytes([arg])
    fitting = budget // per_arg
    assert fitting < limits.MAX_ARGV
    accepted_both_ways("submit", **submit(argv=[arg] * fitting))
    refused_both_ways("submit", "'argv' takes .* bytes", **submit(argv=[arg] * (fitting + 1)))
    # Exactly at the budget is fine; one byte more is not.
    exact = ["y" * 4000] * (budget // 4001)
    exact.append("z" * (budget - argv_bytes(exact) - 1))
    assert argv_bytes(exact) == budget
    accepted_both_ways("submit", **submit(argv=exact))
    refused_both_ways("submit", "'argv'", **submit(argv=exact[:-1] + [exact[-1] + "z"]))


def test_argv_at_most_max_argv_entries():
    refused_both_ways("submit", "'argv' has", **submit(argv=["x"] * (limits.MAX_ARGV + 1)))
    accepted_both_ways("run_job", job=3, **submit(argv=["x"] * limits.MAX_ARGV))


def test_an_accepted_command_fits_the_guest_exec_frame():
    """The worst accepted argv plus the job's working directory stays within MAX_ARGV_BYTES."""
    largest_cwd = f"/job/{2**63 - 1}".encode() + b"\0"
    assert len(largest_cwd) <= JOB_CWD_BYTES


# --- inputs -------------------------------------------------------------------------------------------------
def test_inputs_at_most_max_files():
    files = {f"in{i}": b"" for i in range(limits.MAX_FILES + 1)}
    refused_both_ways("submit", f"'inputs' has {limits.MAX_FILES + 1} files", **submit(inputs=files))


def test_inputs_total_at_most_the_job_input_budget():
    half = limits.MAX_JOB_INPUT_BYTES // 2
    accepted_both_ways("submit", **submit(inputs={"a": b"\0" * half, "b": b"\0" * half}))
    refused_both_ways("submit", "'inputs' files take", **submit(inputs={"a": b"\0" * half, "b": b"\0" * (half + 1)}))


# --- guest memory -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["submit", "run_job"])
def test_guest_memory_within_the_guest_range(kind):
    extra = {"job": 1} if kind == "run_job" else {}
    for bad in [limits.MIN_GUEST_MEM_MIB - 1, limits.MAX_GUEST_MEM_MIB + 1, 0, -1, 2**40]:
        refused_both_ways(kind, f"'mem_mib' must be an integer from {limits.MIN_GUEST_MEM_MIB} to "
                                f"{limits.MAX_GUEST_MEM_MIB}", **extra, **submit(mem_mib=bad))
    for good in [limits.MIN_GUEST_MEM_MIB, limits.MAX_GUEST_MEM_MIB]:
        accepted_both_ways(kind, **extra, **submit(mem_mib=good))


# --- results ------------------------------------------------------------------------------------------------
def finished(**changes):
    fields = {"job": 1, "status": 0, "outputs": {}, "missing": [], "runtime_s": 1.0}
    fields.update(changes)
    return fields


def test_output_files_are_bounded_per_file_and_together():
    big = limits.MAX_OUTPUT_FILE_BYTES
    accepted_both_ways("job_finished", **finished(outputs={"a": b"\0" * big}))
    refused_both_ways("job_finished", "file 'a' has", **finished(outputs={"a": b"\0" * (big + 1)}))
    rest = limits.MAX_JOB_OUTPUT_BYTES - big
    accepted_both_ways("job_finished", **finished(outputs={"a": b"\0" * big, "b": b"\0" * rest}))
    refused_both_ways("job_finished", "files take", **finished(outputs={"a": b"\0" * big, "b": b"\0" * (rest + 1)}))
    refused_both_ways("fetch_reply", "'outputs'", job=1, outputs={"a": b"\0" * (big + 1)})


def test_missing_entries_may_carry_reasons():
    reason = "big.bin: 40000000 bytes, over the 33554432-byte limit for one output file"
    accepted_both_ways("job_finished", **finished(missing=["gone.txt", reason, "x" * limits.MAX_SMALL_FIELD]))
    refused_both_ways("job_finished", "'missing'", **finished(missing=["x" * (limits.MAX_SMALL_FIELD + 1)]))
    refused_both_ways("job_finished", "'missing'", **finished(missing=["m"] * (limits.MAX_FILES + 1)))


# --- what nodes report --------------------------------------------------------------------------------------
def hello(**changes):
    fields = {"node": "n1", "cores": 2, "mem_mib": 128, "speed": 1e6, "state": "Unclaimed", "idle_s": 5.0,
              "running": [], "software": "conode"}
    fields.update(changes)
    return fields


@pytest.mark.parametrize("field,bad", [
    ("cores", 0), ("cores", -3), ("cores", protocol.MAX_NODE_CORES + 1),
    ("mem_mib", limits.MIN_GUEST_MEM_MIB - 1), ("mem_mib", limits.MAX_GUEST_MEM_MIB + 1),
    ("speed", math.nan), ("speed", math.inf), ("speed", -1.0),
    ("idle_s", math.nan), ("idle_s", -math.inf), ("idle_s", -0.5),
])
def test_hello_values_must_be_sane(field, bad):
    refused_both_ways("hello", f"'{field}'", **hello(**{field: bad}))


@pytest.mark.parametrize("field,bad", [("idle_s", math.nan), ("speed", math.inf), ("cpu_percent", math.nan),
                                       ("cpu_percent", -1.0), ("idle_s", -1)])
def test_heartbeat_values_must_be_sane(field, bad):
    beat = {"node": "n1", "state": "Claimed", "idle_s": 1.0, "running": [], field: bad}
    refused_both_ways("heartbeat", f"'{field}'", **beat)


def test_sane_reports_pass():
    accepted_both_ways("hello", **hello(cores=1, mem_mib=limits.MIN_GUEST_MEM_MIB, speed=0, idle_s=0.0))
    accepted_both_ways("hello", **hello(cores=protocol.MAX_NODE_CORES, mem_mib=limits.MAX_GUEST_MEM_MIB))
    accepted_both_ways("heartbeat", node="n1", state="Owner", idle_s=0, running=[1, 2], speed=3.5e6,
                       cpu_percent=250.0)


# --- disk images ---------------------------------------------------------------------------------------------
def _image(size=IMAGE_CHUNK_BYTES + 1, chunks=2):
    return {"name": "deb", "sha256": "a" * 64, "size": size, "chunks": [bytes(32)] * chunks}


def test_image_chunks_are_bounded_and_named_by_32_byte_digests():
    encode("image_put", digest=bytes(32), data=b"\0" * IMAGE_CHUNK_BYTES)
    with pytest.raises(ProtocolError, match="data"):
        encode("image_put", digest=bytes(32), data=b"\0" * (IMAGE_CHUNK_BYTES + 1))
    for bad in (bytes(31), bytes(33), "0" * 32):
        with pytest.raises(ProtocolError, match="digest"):
            encode("image_chunk_get", digest=bad)
    with pytest.raises(ProtocolError, match="chunks"):
        encode("image_missing", chunks=[bytes(32)] * (MAX_IMAGE_CHUNKS + 1))


def test_an_image_commit_names_its_whole_file_digest_in_hex():
    fields = {"name": "deb", "size": 5, "chunks": [bytes(32)]}
    encode("image_commit", sha256="0123456789abcdef" * 4, **fields)
    for bad in ("A" * 64, "0" * 63, "g" * 64):
        with pytest.raises(ProtocolError, match="sha256"):
            encode("image_commit", sha256=bad, **fields)
    with pytest.raises(ProtocolError, match="size"):
        encode("image_commit", sha256="0" * 64, name="deb", size=MAX_IMAGE_BYTES + 1, chunks=[])


def test_a_run_job_image_lists_exactly_its_chunks():
    base = {"job": 1, "argv": ["true"], "inputs": {}, "outputs": [], "mem_mib": 128}
    assert decode(encode("run_job", image=_image(), disk_mib=64, **base))["image"] == _image()
    for image in (_image(chunks=1), _image(chunks=3), _image(size=0, chunks=0), {**_image(), "extra": 1},
                  {k: v for k, v in _image().items() if k != "name"}):
        with pytest.raises(ProtocolError, match="image"):
            encode("run_job", image=image, **base)
    with pytest.raises(ProtocolError, match="disk_mib"):
        encode("run_job", disk_mib=MAX_DISK_BUDGET_MIB + 1, **base)


def test_the_largest_image_fits_a_run_job_beside_the_largest_inputs():
    chunks = protocol.image_chunk_count(MAX_IMAGE_BYTES)
    assert chunks == MAX_IMAGE_CHUNKS
    image = {"name": "x" * MAX_IMAGE_NAME, "sha256": "0" * 64, "size": MAX_IMAGE_BYTES, "chunks": [bytes(32)] * chunks}
    inputs = {f"f{i}": b"\0" * (MAX_JOB_INPUT_BYTES // MAX_FILES) for i in range(MAX_FILES)}
    frame = encode("run_job", job=1, argv=["a" * 1000] * 200, inputs=inputs, outputs=[], mem_mib=128, image=image)
    assert len(frame) <= MAX_FRAME_BYTES
