# SPDX-License-Identifier: GPL-2.0-or-later
"""A real coordinator process against bad input: malformed frames, unenrolled keys, agents acting as admins.

Each test gets a coordinator (`coordinator init` + `coordinator serve` on a free localhost port, state and
HOME in a tmp dir), stopped whatever the outcome; the many small malformed-frame cases share one. Frames are
sent over the real CURVE transport (conode.cluster.transport.ClientSocket) with the keys `init` created or
ones enrolled with `coordinator keys add`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conode.cluster import protocol
from conode.cluster.keys import KeyPair, load_key_pair
from conode.cluster.protocol import (MAX_FILES, MAX_FRAME_BYTES, MAX_SMALL_FIELD, PROTOCOL_VERSION, SCHEMAS,
                                     ProtocolError)
from conode.cluster.transport import AuthRefused, ClientSocket
from conode.errors import ConodeError
from conode.limits import MIN_GUEST_MEM_MIB
from coordinator.client import AdminClient
from coordinator.config import ClientConfig, load_client_config
from pool import free_port
from tests.unit.test_protocol import strategy_for

REPLY_TIMEOUT_S = 5.0


class Coordinator:
    """`coordinator serve` in its own process group, in a scratch state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        home = root / "home"
        home.mkdir()
        self.env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                    "PYTHONUNBUFFERED": "1"}
        for name in ("CONODE_CLIENT_CONFIG", "CONODE_COORDINATOR"):
            self.env.pop(name, None)
        self.log_path = root / "coordinator.log"
        self.process: subprocess.Popen | None = None
        self.cli("init", "--state-dir", str(self.state), "--bind", self.endpoint)
        self.config = load_client_config(self.state / "client.toml")
        self.server_public = self.config.server_public_key

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"coordinator {' '.join(args)}: {done.stderr}"
        return done

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coordinator.cli", "serve", "--state-dir", str(self.state)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True)

    def stop(self) -> int | None:
        """SIGTERM (a clean stop), SIGKILL to the whole group if that takes more than 5 s; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def admin(self, timeout_s: float = REPLY_TIMEOUT_S) -> AdminClient:
        return AdminClient(self.config, timeout_s=timeout_s, context=zmq.Context.instance())

    def status(self) -> dict:
        assert self.process is not None and self.process.poll() is None, f"coordinator died:\n{self.log()}"
        with self.admin() as client:
            return client.request("status", "status_reply")

    def client_socket(self, keys: KeyPair) -> ClientSocket:
        return ClientSocket(zmq.Context.instance(), self.endpoint, self.server_public, keys)


@contextlib.contextmanager
def running_coordinator(root: Path):
    """A started coordinator that answers `status`; stopped (and checked to stop cleanly) on exit."""
    home = root / "test-home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # nothing here may touch the user's ~/.config
        mp.setenv("XDG_CONFIG_HOME", str(home / ".config"))
        mp.delenv("CONODE_CLIENT_CONFIG", raising=False)
        mp.delenv("CONODE_COORDINATOR", raising=False)
        c = Coordinator(root)
        c.start()
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    with c.admin(timeout_s=1.0) as client:
                        client.request("status", "status_reply")
                    break
                except ConodeError:
                    assert c.process.poll() is None, f"coordinator exited:\n{c.log()}"
                    assert time.monotonic() < deadline, f"coordinator did not answer within 20 s:\n{c.log()}"
            yield c
        finally:
            status = c.stop()
    assert status == 0, f"coordinator did not stop cleanly ({status}):\n{c.log()[-3000:]}"
    # `init` wrote its per-user client configuration into the scratch HOME, not the real one.
    assert (root / "home" / ".config" / "conode" / "client.toml").exists()
    assert not (home / ".config").exists()


@pytest.fixture
def coordinator(tmp_path):
    """A coordinator of the test's own."""
    with running_coordinator(tmp_path) as c:
        yield c


@pytest.fixture(scope="module")
def shared_coordinator(tmp_path_factory):
    """One coordinator for many small cases (tests using it compare counters before and after)."""
    with running_coordinator(tmp_path_factory.mktemp("shared")) as c:
        yield c


class Link:
    """A raw DEALER (ClientSocket) that sends arbitrary frames and reads decoded replies."""

    def __init__(self, coordinator: Coordinator, keys: KeyPair) -> None:
        self.sock = coordinator.client_socket(keys)

    def close(self) -> None:
        self.sock.close()

    def send(self, frame: bytes, timeout: float = REPLY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not self.sock.send(frame):  # False until the connection is up (IMMEDIATE)
            self.sock.check_refused()
            assert time.monotonic() < deadline, "could not send: not connected"
            time.sleep(0.01)

    def reply(self, timeout: float = REPLY_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no reply from the coordinator"
            if self.sock.socket.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                return protocol.decode(self.sock.socket.recv())  # a malformed reply would raise here

    def ask(self, frame: bytes) -> dict:
        self.send(frame)
        return self.reply()


def packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def admin_keys(coordinator: Coordinator) -> KeyPair:
    return load_key_pair(coordinator.state / "keys", "admin")


@pytest.fixture
def admin_link(coordinator):
    link = Link(coordinator, admin_keys(coordinator))
    yield link
    link.close()


# --- (a) ----------------------------------------------------------------------------------------------------
def test_admin_gets_status(coordinator):
    reply = coordinator.status()
    assert reply["type"] == "status_reply"
    assert reply["nodes"] == []
    totals = reply["totals"]
    assert totals["nodes"] == 0 and totals["cores"] == 0
    assert all(count == 0 for count in totals["jobs"].values())
    assert totals["malformed_messages"] == 0 and totals["refused_messages"] == 0


# --- (b) ----------------------------------------------------------------------------------------------------
MALFORMED = {
    "random bytes": bytes(range(256))[::-7] * 3,
    "invalid msgpack": b"\xc1\xc1\xc1",
    "empty frame": b"",
    "truncated map": packed({"v": 1, "type": "status"})[:-3],
    "msgpack non-map": packed(["status", 1]),
    "msgpack scalar": packed(42),
    "map with int keys": packed({1: "status"}),
    "wrong version": packed({"v": PROTOCOL_VERSION + 1, "type": "status"}),
    "no version": packed({"type": "status"}),
    "unknown type": packed({"v": PROTOCOL_VERSION, "type": "launch_missiles"}),
    "type not a string": packed({"v": PROTOCOL_VERSION, "type": 7}),
    "field of the wrong type": packed({"v": PROTOCOL_VERSION, "type": "job", "job": "one"}),
    "missing field": packed({"v": PROTOCOL_VERSION, "type": "job"}),
    "oversized field": packed({"v": PROTOCOL_VERSION, "type": "drain", "node": "n" * (MAX_SMALL_FIELD + 1)}),
    "too many arguments": packed({"v": PROTOCOL_VERSION, "type": "submit", "argv": ["x"] * 1000, "inputs": {},
                                  "outputs": [], "mem_mib": 128}),
    "unsafe input path": packed({"v": PROTOCOL_VERSION, "type": "submit", "argv": ["cat"],
                                 "inputs": {"../../etc/passwd": b""}, "outputs": [], "mem_mib": 128}),
    "unsafe output path": packed({"v": PROTOCOL_VERSION, "type": "submit", "argv": ["cat"], "inputs": {},
                                  "outputs": ["../x"], "mem_mib": 128}),
    "too many outputs": packed({"v": PROTOCOL_VERSION, "type": "submit", "argv": ["cat"], "inputs": {},
                                "outputs": [f"o{i}" for i in range(MAX_FILES + 1)], "mem_mib": 128}),
    "guest memory below the minimum": packed({"v": PROTOCOL_VERSION, "type": "submit", "argv": ["cat"],
                                              "inputs": {}, "outputs": [], "mem_mib": MIN_GUEST_MEM_MIB - 1}),
    "hello with no cores": packed({"v": PROTOCOL_VERSION, "type": "hello", "node": "n", "cores": 0, "mem_mib": 128,
                                   "speed": 1.0, "state": "Unclaimed", "idle_s": 0.0, "running": [],
                                   "software": "x"}),
    "trailing bytes": packed({"v": PROTOCOL_VERSION, "type": "status"}) + b"\x00",
}


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frame_gets_an_error_and_the_coordinator_keeps_serving(shared_coordinator, frame):
    before = shared_coordinator.status()["totals"]
    link = Link(shared_coordinator, admin_keys(shared_coordinator))
    try:
        reply = link.ask(frame)
        assert reply["type"] == "error" and reply["code"] == "malformed", reply
        # The same connection still works, and so does a new one.
        assert link.ask(protocol.encode("status"))["type"] == "status_reply"
    finally:
        link.close()
    after = shared_coordinator.status()["totals"]
    assert after["malformed_messages"] == before["malformed_messages"] + 1
    assert all(count == 0 for count in after["jobs"].values())


def test_oversized_frame_gets_an_error(coordinator, admin_link):
    frame = packed({"v": PROTOCOL_VERSION, "type": "status", "pad": b"\0" * MAX_FRAME_BYTES})
    assert len(frame) > MAX_FRAME_BYTES
    admin_link.send(frame)
    reply = admin_link.reply(timeout=30)
    assert reply["type"] == "error" and reply["code"] == "malformed" and "exceeds" in reply["message"]
    assert coordinator.status()["totals"]["malformed_messages"] == 1


def test_multipart_message_is_ignored_and_the_coordinator_keeps_serving(coordinator, admin_link):
    admin_link.send(b"")  # connect first
    admin_link.reply()
    admin_link.sock.socket.send_multipart([protocol.encode("status"), protocol.encode("status")])
    assert admin_link.ask(protocol.encode("jobs"))["type"] == "jobs_reply"
    coordinator.status()


# Frames a broken or hostile client might send: raw bytes, msgpack of anything, message-shaped maps with
# fields of any type. Message-shaped maps can be valid (a `drain`, a `submit`...): those get a real answer.
_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                       | st.text(max_size=20) | st.binary(max_size=20),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=3), max_leaves=8)
_field_names = (st.sampled_from(sorted({n for _, fields in SCHEMAS.values() for n in fields}))
                | st.text(max_size=6))
_message_like = st.builds(lambda v, t, fields: packed({**fields, "v": v, "type": t}),
                          st.sampled_from([PROTOCOL_VERSION]) | _values,
                          st.sampled_from(sorted(SCHEMAS)) | _values,
                          st.dictionaries(_field_names, _values, max_size=6))
# Valid messages of every type (admin types get real answers, the others are forbidden to an admin key).
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_path = st.lists(st.text("abc.-_", min_size=1, max_size=5).filter(lambda p: p not in (".", "..")), min_size=1,
                 max_size=3).map("/".join)
_kind_values = {
    "str": _text, "bool": st.booleans(), "bytes": st.binary(max_size=20), "str_list": st.lists(_text, max_size=3),
    "argv": st.lists(_text, max_size=3), "paths": st.lists(_path, max_size=3),
    "int_list": st.lists(st.integers(0, 99), max_size=3),
    "files": st.dictionaries(_path, st.binary(max_size=10), max_size=2),
    "list": st.lists(st.integers(0, 9), max_size=3), "map": st.dictionaries(_text, st.integers(-(2**63), 2**64 - 1), max_size=2),
    "peers": st.lists(st.fixed_dictionaries({"node": _text, "endpoint": _text, "key": _text}), max_size=2),
    "identity": st.just({"network": "job:1", "mac": b"\x02\xc0\xde\x00\x00\x01", "ip": "10.213.0.2", "prefix": 16,
                         "hostname": "job1", "rank": 0, "size": 1, "hosts": [["job1", "10.213.0.2"]]}),
    "digest": st.binary(min_size=32, max_size=32),
    "digest_list": st.lists(st.binary(min_size=32, max_size=32), max_size=3),
    "sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
    "image": st.just({"name": "img", "sha256": "0" * 64, "size": 1, "chunks": [bytes(32)]}),
}


def _value_of(kind: protocol.Kind) -> st.SearchStrategy:
    if kind.tag == "int":
        if kind.low is not None:
            return st.integers(int(kind.low), int(kind.high))
        return st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5)
    if kind.tag == "float":
        return st.floats(min_value=kind.low, max_value=kind.high, allow_nan=False, allow_infinity=False)
    if kind.tag in _kind_values:
        return _kind_values[kind.tag]
    return strategy_for(kind)  # every other kind, as the protocol's own tests make them


@st.composite
def _valid_message(draw):
    kind = draw(st.sampled_from(sorted(protocol.ADMIN_TYPES)) | st.sampled_from(sorted(SCHEMAS)))
    fields = {name: draw(_value_of(f.kind)) for name, f in SCHEMAS[kind][1].items()
              if f.required or draw(st.booleans())}
    return protocol.encode(kind, **fields)


random_frames = st.one_of(st.binary(max_size=300), _values.map(packed), _message_like, _valid_message())


def test_random_frames_never_stop_the_coordinator(coordinator, admin_link):
    counts = {"sent": 0, "malformed": 0}

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(random_frames)
    def one_frame(frame):
        try:
            protocol.decode(frame)
            valid = True
        except ProtocolError:
            valid = False
        reply = admin_link.ask(frame)  # every frame gets exactly one reply
        counts["sent"] += 1
        if not valid:
            counts["malformed"] += 1
            assert reply["type"] == "error" and reply["code"] == "malformed", reply
        else:
            assert reply["type"] in SCHEMAS and SCHEMAS[reply["type"]][0] in ("coordinator", "any"), reply
        # A frame may be refused, but never make a handler fail.
        assert not (reply["type"] == "error" and reply["code"] == "internal"), (frame, reply)

    one_frame()
    assert counts["sent"] >= 150
    status = coordinator.status()
    assert status["totals"]["malformed_messages"] == counts["malformed"]
    assert coordinator.process.poll() is None
    with coordinator.admin() as client:
        assert client.request("jobs", "jobs_reply", limit=10)["type"] == "jobs_reply"


# --- (c) ----------------------------------------------------------------------------------------------------
def test_unenrolled_key_is_refused_at_the_handshake(coordinator):
    public, secret = zmq.curve_keypair()
    stranger = KeyPair(public.decode(), secret.decode())
    sock = coordinator.client_socket(stranger)
    try:
        deadline = time.monotonic() + 5
        with pytest.raises(AuthRefused):
            while time.monotonic() < deadline:
                sock.check_refused()
                assert not sock.send(protocol.encode("status")), "an unenrolled key got a connection"
                time.sleep(0.02)
    finally:
        sock.close()

    config = ClientConfig(coordinator.endpoint, coordinator.server_public, stranger)
    started = time.monotonic()
    with AdminClient(config, timeout_s=5.0, context=zmq.Context.instance()) as client:
        with pytest.raises(ConodeError, match="refused this client's key"):
            client.request("status", "status_reply")
    assert time.monotonic() - started < 5.0
    assert "refused connection from unenrolled key" in coordinator.log()
    assert coordinator.status()["totals"]["refused_messages"] == 0  # refused before any message got through


# --- (d) ----------------------------------------------------------------------------------------------------
def test_agent_key_may_not_submit(coordinator):
    public, secret = zmq.curve_keypair()
    # "--": a Z85 key can begin with "-" (1 in 85), which would otherwise parse as an option.
    coordinator.cli("keys", "add", "--state-dir", str(coordinator.state), "--role", "agent", "--", "node-x",
                    public.decode())
    link = Link(coordinator, KeyPair(public.decode(), secret.decode()))
    try:
        submit = {"argv": ["rm", "-rf", "/"], "inputs": {}, "outputs": [], "mem_mib": 128}
        for kind, fields in [("submit", submit),
                             ("cancel", {"job": 1}), ("drain", {"node": "node-y"}), ("status", {})]:
            reply = link.ask(protocol.encode(kind, **fields))
            assert reply["type"] == "error" and reply["code"] == "forbidden", reply
            assert reply["in_reply_to"] == kind
    finally:
        link.close()
    with coordinator.admin() as client:
        assert client.request("jobs", "jobs_reply")["jobs"] == []
        status = client.request("status", "status_reply")
    assert status["totals"]["refused_messages"] == 4
    assert status["totals"]["jobs"]["queued"] == 0
    assert status["nodes"] == []  # it never said hello, so it is no node either
