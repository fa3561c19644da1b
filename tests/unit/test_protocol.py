# SPDX-License-Identifier: GPL-2.0-or-later
"""Property tests of the control-plane protocol (conode.cluster.protocol): decoding, schemas, limits."""

import math
import posixpath

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conode.cluster import protocol
from conode.cluster.protocol import (MAX_ARGV, MAX_FILES, MAX_FRAME_BYTES, MAX_SMALL_FIELD, PROTOCOL_VERSION,
                                     SCHEMAS, ProtocolError, decode, encode, is_safe_relative_path, validate)
from conode.errors import ConodeError

# --- strategies ---------------------------------------------------------------------------------------------
INT64 = st.integers(-(2**63), 2**63 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
# Text that msgpack can carry: no lone surrogates (they are not UTF-8).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)

path_part = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                    max_size=12).filter(lambda s: s not in (".", ".."))
safe_path = st.lists(path_part, min_size=1, max_size=5).map("/".join).filter(lambda p: len(p.encode()) <= 1024)

# Values that survive a msgpack round trip unchanged (lists, not tuples; str keys).
plain = st.recursive(
    st.none() | st.booleans() | INT64 | FINITE | TEXT | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

label = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=20)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))


@st.composite
def identities(draw):
    size = draw(st.integers(1, 4))
    hosts = draw(st.lists(st.tuples(label, ipv4).map(list), min_size=size, max_size=size))
    rank = draw(st.integers(0, size - 1))
    mac = bytes([draw(st.integers(0, 127)) * 2]) + draw(st.binary(min_size=5, max_size=5))
    return {"network": draw(TEXT), "mac": mac, "ip": hosts[rank][1], "prefix": draw(st.integers(8, 30)),
            "hostname": hosts[rank][0], "rank": rank, "size": size, "hosts": hosts}


peers = st.lists(st.fixed_dictionaries({"node": TEXT, "endpoint": TEXT, "key": TEXT},
                                       optional={"networks": st.lists(TEXT, max_size=3)}), max_size=4)
digest = st.binary(min_size=32, max_size=32)
sha256_hex = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def images(draw):
    size = draw(st.integers(1, 5 * protocol.IMAGE_CHUNK_BYTES))
    chunks = draw(st.lists(digest, min_size=protocol.image_chunk_count(size),
                           max_size=protocol.image_chunk_count(size)))
    return {"name": draw(label), "sha256": draw(sha256_hex), "size": size, "chunks": chunks}


def strategy_for(kind):
    """Valid values of a field kind, within its bounds."""
    tag = kind.tag
    if tag == "str":
        return st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)
    if tag == "int":
        low = -(2**63) if kind.low is None else int(kind.low)
        high = 2**63 - 1 if kind.high is None else int(kind.high)
        return st.integers(low, high)
    if tag == "float":
        floats = st.floats(min_value=kind.low, max_value=kind.high, allow_nan=False, allow_infinity=False)
        low = -(2**63) if kind.low is None else math.ceil(kind.low)
        return floats | st.integers(low, 2**63 - 1 if kind.high is None else int(kind.high))  # an int is a float
    return {
        "bool": st.booleans(),
        "bytes": st.binary(max_size=200),
        "str_list": st.lists(TEXT, max_size=8),
        "argv": st.lists(TEXT, max_size=8),
        "paths": st.lists(safe_path, max_size=5),
        "int_list": st.lists(st.integers(0, 2**63 - 1), max_size=8),
        "files": st.dictionaries(safe_path, st.binary(max_size=40), max_size=5),
        "list": st.lists(plain, max_size=5),
        "map": st.dictionaries(TEXT, plain, max_size=5),
        "identity": identities(),
        "peers": peers,
        "digest": digest,
        "digest_list": st.lists(digest, max_size=5),
        "sha256": sha256_hex,
        "image": images(),
        "env": st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True), TEXT.filter(
            lambda t: "\0" not in t), max_size=4),
        "modes": st.dictionaries(safe_path, st.integers(0, 0o777), max_size=4),
    }[tag]


def minimal_value(kind):
    """The simplest valid value of a field kind."""
    if kind.tag in ("int", "float"):
        value = 1 if kind.low is None else kind.low
        return int(value) if kind.tag == "int" else float(value)
    return {"str": "s", "bool": False, "bytes": b"", "str_list": [], "argv": [], "paths": [], "int_list": [],
            "files": {}, "list": [], "map": {}, "peers": [], "digest": bytes(32), "digest_list": [],
            "sha256": "0" * 64, "env": {}, "modes": {}, "image": {"name": "i", "sha256": "0" * 64, "size": 1, "chunks": [bytes(32)]}}[kind.tag]


@st.composite
def fields_of(draw, kind):
    """Valid fields of message type *kind*: every required field, each optional one or not."""
    _, schema = SCHEMAS[kind]
    fields = {}
    for name, field in schema.items():
        if field.required or draw(st.booleans()):
            fields[name] = draw(strategy_for(field.kind))
    return fields


def packed(value):
    return msgpack.packb(value, use_bin_type=True)


def assert_valid(message):
    """What decode returns is a message that passes its schema."""
    assert isinstance(message, dict)
    assert message["v"] == PROTOCOL_VERSION
    assert message["type"] in SCHEMAS
    assert validate(dict(message)) == message


# --- decode never lets anything but ProtocolError out -------------------------------------------------------
@given(st.binary(max_size=512))
@example(b"")
@example(b"\xc1")  # the one byte msgpack never uses
@example(b"\x81\xa1v\x01")  # a map with only the version
@example(b"\xdd\xff\xff\xff\xff")  # an array claiming 4 G entries
@example(b"\xc6\xff\xff\xff\xff")  # a bin claiming 4 GiB
@example(b"\x91" * 5000)  # arrays nested 5000 deep
def test_any_bytes_decode_to_a_valid_message_or_protocol_error(frame):
    try:
        message = decode(frame)
    except ProtocolError:
        return
    assert_valid(message)


# Maps that look like messages: a real type and version most of the time, fields of any type.
field_names = st.sampled_from(sorted({name for _, s in SCHEMAS.values() for name in s} | {"v", "type"}))
field_names = field_names | TEXT
near_messages = st.builds(
    lambda v, t, extra: {**extra, "v": v, "type": t},
    st.sampled_from([PROTOCOL_VERSION]) | plain,
    st.sampled_from(sorted(SCHEMAS)) | plain,
    st.dictionaries(field_names, plain, max_size=8),
)


@given(near_messages)
def test_message_shaped_maps_are_valid_or_refused(message):
    try:
        frame = packed(message)
    except (ValueError, TypeError, OverflowError):
        assume(False)
    try:
        got = decode(frame)
    except ProtocolError:
        return
    assert_valid(got)


@given(st.sampled_from(sorted(SCHEMAS)).flatmap(lambda k: st.tuples(st.just(k), fields_of(k))),
       st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mangled_valid_frames_decode_or_raise_protocol_error(kind_fields, data):
    kind, fields = kind_fields
    frame = bytearray(encode(kind, **fields))
    # Truncate it, or flip some bytes: the kind of damage a broken peer does.
    if data.draw(st.booleans(), label="truncate"):
        frame = frame[:data.draw(st.integers(0, len(frame) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            i = data.draw(st.integers(0, len(frame) - 1), label="at")
            frame[i] = data.draw(st.integers(0, 255), label="byte")
    try:
        message = decode(bytes(frame))
    except ProtocolError:
        return
    assert_valid(message)


def test_protocol_error_is_a_conode_error():
    assert issubclass(ProtocolError, ConodeError)


# --- round trips --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(SCHEMAS))
@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_type_round_trips(kind, data):
    fields = data.draw(fields_of(kind))
    frame = encode(kind, **fields)
    assert isinstance(frame, bytes)
    assert decode(frame) == {"v": PROTOCOL_VERSION, "type": kind, **fields}


def test_error_helper_builds_a_valid_error_and_truncates():
    message = decode(protocol.error("malformed", "x" * (MAX_SMALL_FIELD * 3), "y" * (MAX_SMALL_FIELD + 9)))
    assert message["type"] == "error" and message["code"] == "malformed"
    assert len(message["message"]) == MAX_SMALL_FIELD
    assert len(message["in_reply_to"]) == MAX_SMALL_FIELD
    assert "in_reply_to" not in decode(protocol.error("internal", "boom"))


def test_sender_sets_follow_the_schemas():
    assert protocol.CLIENT_TYPES == {t for t, (sender, _) in SCHEMAS.items() if sender == "client"}
    assert protocol.ADMIN_TYPES == protocol.CLIENT_TYPES | {t for t, (s, _) in SCHEMAS.items() if s == "admin"}
    assert protocol.AGENT_TYPES == {t for t, (sender, _) in SCHEMAS.items() if sender == "agent"}
    assert {"status", "submit", "jobs", "job", "logs", "fetch", "cancel", "drain"} <= protocol.ADMIN_TYPES
    assert {"hello", "heartbeat", "job_output", "job_finished", "job_failed", "bye"} <= protocol.AGENT_TYPES
    assert not protocol.ADMIN_TYPES & protocol.AGENT_TYPES
    assert {"status", "submit", "jobs", "job", "logs", "fetch", "cancel", "image_list"} <= protocol.CLIENT_TYPES
    assert not {"drain", "forget", "image_commit", "image_rm", "user_add", "users", "user_rm"} & protocol.CLIENT_TYPES
    assert {sender for sender, _ in SCHEMAS.values()} <= {"agent", "client", "admin", "coordinator", "any"}


# --- sizes --------------------------------------------------------------------------------------------------
def test_oversized_frame_is_refused_before_unpacking():
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_FRAME_BYTES + 1))


def test_message_bigger_than_a_frame_is_not_encoded():
    # Each field within its own bound, the whole over the frame limit.
    with pytest.raises(ProtocolError, match="exceeds"):
        encode("job_output", job=1, stream="stdout", data=b"\0" * MAX_FRAME_BYTES)


def _small_field_cases():
    big = "x" * (MAX_SMALL_FIELD + 1)
    return [
        ("drain", {"node": big}),  # STR
        ("submit", {"argv": ["a"] * (MAX_ARGV + 1), "inputs": {}, "outputs": [], "mem_mib": 128}),  # too many
        ("submit", {"argv": [big], "inputs": {}, "outputs": [], "mem_mib": 128}),  # one argument too long
        ("submit", {"argv": ["a"], "inputs": {f"f{i}": b"" for i in range(MAX_FILES + 1)}, "outputs": [],
                    "mem_mib": 128}),
        # a path too long
        ("submit", {"argv": ["a"], "inputs": {"a" * 1025: b""}, "outputs": [], "mem_mib": 128}),
        ("heartbeat", {"node": "n", "state": "Unclaimed", "idle_s": 0.0, "running": [0] * 100_001}),
        ("status_reply", {"nodes": [], "totals": {f"k{i}": 0 for i in range(100_001)}}),
    ]


@pytest.mark.parametrize("kind,fields", _small_field_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_oversized_fields_are_refused_both_ways(kind, fields):
    with pytest.raises(ProtocolError):
        encode(kind, **fields)
    with pytest.raises(ProtocolError):
        decode(packed({"v": PROTOCOL_VERSION, "type": kind, **fields}))


def test_string_over_the_unpacker_limit_is_refused():
    # TEXT fields may be up to 1 MiB; the unpacker refuses any longer string outright.
    frame = packed({"v": PROTOCOL_VERSION, "type": "error", "code": "x", "message": "m" * ((1 << 20) + 1)})
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode(frame)


@given(st.integers(2**63, 2**64 - 1) | st.integers(-(2**64), -(2**63) - 1))
def test_integers_outside_64_bit_signed_are_refused(value):
    with pytest.raises(ProtocolError):
        encode("job", job=value)
    if value >= 0:  # msgpack can carry it as uint64: the schema still refuses it
        with pytest.raises(ProtocolError):
            decode(packed({"v": PROTOCOL_VERSION, "type": "job", "job": value}))


# --- types, versions, field types ---------------------------------------------------------------------------
@given(TEXT.filter(lambda t: t not in SCHEMAS))
@example("")
@example("STATUS")
def test_unknown_types_are_refused(kind):
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(packed({"v": PROTOCOL_VERSION, "type": kind}))
    with pytest.raises(ProtocolError):
        encode(kind)


@pytest.mark.parametrize("kind", [None, 1, b"status", ["status"], {"status": 1}])
def test_non_string_types_are_refused(kind):
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(packed({"v": PROTOCOL_VERSION, "type": kind}))


def test_missing_type_is_refused():
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(packed({"v": PROTOCOL_VERSION}))


@given(INT64.filter(lambda v: v != PROTOCOL_VERSION) | TEXT | st.none() | st.binary(max_size=4))
@example(0)
@example(PROTOCOL_VERSION - 1)  # the version before: an agent or coordinator not yet upgraded
@example(PROTOCOL_VERSION + 1)
@example(str(PROTOCOL_VERSION))
def test_wrong_versions_are_refused(version):
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(packed({"v": version, "type": "status"}))


def test_missing_version_is_refused():
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(packed({"type": "status"}))


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_one(version):
    # true == 1 and 1.0 == 1 in Python: the check must be on the type too.
    with pytest.raises(ProtocolError, match="protocol version"):
        decode(packed({"v": version, "type": "status"}))


@pytest.mark.parametrize("value", [None, [], {}, b"x", "x", 1.5, True, 2**63])
def test_an_int_field_of_another_type_is_refused(value):
    with pytest.raises(ProtocolError, match="'job'"):
        decode(packed({"v": PROTOCOL_VERSION, "type": "job", "job": value}))


@pytest.mark.parametrize("kind,field,value", [
    ("drain", "node", 5),
    ("drain", "node", b"bytes are not str"),
    ("drain", "undrain", 1),  # bool: 1 is not True here
    ("hello", "speed", True),  # float: bool is not a number here
    ("hello", "speed", "fast"),
    ("hello", "running", ["not-a-job"]),  # job ids are integers: a node must not half-register on this
    ("heartbeat", "running", [True]),
    ("job_output", "data", "str is not bytes"),
    ("submit", "argv", "echo"),
    ("submit", "argv", ["echo", 1]),
    ("submit", "inputs", [["a", b""]]),
    ("submit", "inputs", {"a": "str, not bytes"}),
    ("submit", "inputs", {b"a": b"key is bytes"}),
    ("jobs_reply", "jobs", {"not": "a list"}),
    ("status_reply", "totals", []),
])
def test_a_field_of_the_wrong_type_is_refused(kind, field, value):
    _, schema = SCHEMAS[kind]
    message = {"v": PROTOCOL_VERSION, "type": kind}
    for name, f in schema.items():
        if f.required:
            message[name] = minimal_value(f.kind)
    decode(packed(message))  # the baseline is valid
    message[field] = value
    with pytest.raises(ProtocolError, match=repr(field)):
        decode(packed(message))


@pytest.mark.parametrize("kind", sorted(k for k, (_, s) in SCHEMAS.items()
                                         if any(f.required for f in s.values())))
def test_a_missing_required_field_is_refused(kind):
    _, schema = SCHEMAS[kind]
    name = next(n for n, f in schema.items() if f.required)
    with pytest.raises(ProtocolError, match=f"lacks field {name!r}"):
        decode(packed({"v": PROTOCOL_VERSION, "type": kind}))


@pytest.mark.parametrize("frame", [packed([1, 2]), packed("status"), packed(None), packed(7), packed(b"x"),
                                   packed({1: "int key"}), packed({"v": PROTOCOL_VERSION, "type": "status"}) + b"\x00"])
def test_non_maps_bad_keys_and_trailing_bytes_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode(frame)


@given(st.sampled_from(["\udcff", "a\ud800b", "\udfff"]), st.sampled_from(["argv", "outputs", "inputs"]))
def test_encode_refuses_text_that_is_not_utf8(bad, field):
    # Lone surrogates: what Python makes of non-UTF-8 bytes in a command line or a file name.
    fields = {"argv": ["cat"], "inputs": {}, "outputs": [], "mem_mib": 128}
    fields[field] = {bad: b""} if field == "inputs" else [bad]
    with pytest.raises(ProtocolError):
        encode("submit", **fields)


def test_invalid_utf8_is_refused():
    frame = b"\x82\xa1v\x01\xa4type\xa6stat\xff\xfe"  # "type": 6 bytes that are not UTF-8
    with pytest.raises(ProtocolError):
        decode(frame)


# --- file names ---------------------------------------------------------------------------------------------
@given(safe_path.filter(lambda p: len(p) <= 1024))
@example("a")
@example("out/result.txt")
@example("..a/b..")  # dots inside a name are fine
def test_relative_paths_are_safe(path):
    assert is_safe_relative_path(path)


@pytest.mark.parametrize("path", [
    "", "/", "/etc/passwd", "/a/b", "..", "../a", "a/..", "a/../b", ".", "./a", "a/./b", "a//b", "a/", "//a",
    "a\0b", "\0", "a/\0/b", "x" * 1025,
])
def test_unsafe_paths_are_refused(path):
    assert not is_safe_relative_path(path)


@given(st.lists(path_part, min_size=1, max_size=4),
       st.sampled_from(["", ".", ".."]), st.integers(0, 4))
def test_a_bad_part_anywhere_makes_a_path_unsafe(parts, bad, at):
    parts.insert(min(at, len(parts)), bad)
    assert not is_safe_relative_path("/".join(parts))


@given(safe_path, st.integers(0, 60))
def test_absolute_or_nul_paths_are_unsafe(path, at):
    assert not is_safe_relative_path("/" + path)
    at = min(at, len(path))
    assert not is_safe_relative_path(path[:at] + "\0" + path[at:])


@given(st.text(max_size=80))
def test_safe_paths_never_escape(path):
    """Whatever is accepted stays below the directory it is joined to."""
    if is_safe_relative_path(path):
        assert not path.startswith("/") and "\0" not in path
        assert posixpath.normpath(posixpath.join("/job", path)).startswith("/job/")


def test_files_fields_use_the_path_check():
    with pytest.raises(ProtocolError, match="'inputs'"):
        encode("submit", argv=["cat"], inputs={"../escape": b""}, outputs=[], mem_mib=128)
    with pytest.raises(ProtocolError, match="'outputs'"):
        decode(packed({"v": PROTOCOL_VERSION, "type": "fetch_reply", "job": 1, "outputs": {"/abs": b""}}))


def test_an_integer_msgpack_cannot_carry_is_a_protocol_error_when_encoding():
    with pytest.raises(ProtocolError, match="beyond 64 bits"):
        encode("status_reply", nodes=[], totals={"x": 2**70})


@pytest.mark.parametrize("peer", [
    {"node": "a", "endpoint": "tcp://a:1", "key": "k", "networks": "red"},
    {"node": "a", "endpoint": "tcp://a:1", "key": "k", "networks": [1]},
    {"node": "a", "endpoint": "tcp://a:1", "key": "k", "networks": ["n"] * (protocol.MAX_SHARED_NETWORKS + 1)},
    {"node": "a", "endpoint": "tcp://a:1", "key": "k", "colour": "red"},
    {"node": "a", "endpoint": "tcp://a:1"},
])
def test_a_peer_entry_is_node_endpoint_key_and_optionally_networks(peer):
    good = {"node": "a", "endpoint": "tcp://a:1", "key": "k", "networks": ["red", "blue"]}
    assert protocol.decode(protocol.encode("conet_peers", peers=[good], relay="tcp://c:7701"))["peers"] == [good]
    with pytest.raises(ProtocolError, match="peers"):
        protocol.encode("conet_peers", peers=[peer])


# Values near every edge the quick checks draw: types msgpack yields, bounds, 64-bit limits, NaN and infinities.
_EDGE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 0, -1, 1 << 40, (1 << 40) + 1, 1024, 1025]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308]),
    st.text(max_size=5), st.text(min_size=MAX_SMALL_FIELD - 1, max_size=MAX_SMALL_FIELD + 1),
    st.binary(max_size=40), st.lists(st.integers(min_value=-2, max_value=2), max_size=3), st.dictionaries(
        st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=500)
@given(value=_EDGE_VALUES)
def test_a_quick_check_never_accepts_what_the_full_check_refuses(value):
    """validate trusts each field's quick check when it says yes: it must be sound for every kind of every field."""
    for fields in protocol._FIELD_CHECKS.values():
        for name, quick, kind, _ in fields:
            if quick(value):
                assert protocol._problem(value, kind) is None, (name, kind, value)
