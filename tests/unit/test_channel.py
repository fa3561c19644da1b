import pytest
from hypothesis import given
from hypothesis import strategies as st

from conode.vm import channel
from conode.vm.channel import ChannelError, FrameDecoder

frames = st.lists(st.tuples(st.sampled_from([b"O", b"E", b"S", b"R"]), st.integers(0, 2**32 - 1),
                            st.binary(max_size=300)), max_size=20)


@given(frames, st.lists(st.integers(1, 64), min_size=1))
def test_decoder_reassembles_any_chunking(items, cuts):
    stream = b"".join(channel.frame(k, i, p) for k, i, p in items)
    decoder, got, pos, n = FrameDecoder(), [], 0, 0
    while pos < len(stream):
        step = cuts[n % len(cuts)]
        got += decoder.feed(stream[pos:pos + step])
        pos, n = pos + step, n + 1
    assert [(f.kind, f.ident, f.payload) for f in got] == items


def test_oversized_frame_is_an_error():
    header = channel.HEADER.pack(ord("O"), 1, channel.MAX_PAYLOAD + 1)
    with pytest.raises(ChannelError, match="limit"):
        FrameDecoder().feed(header)


def test_exec_frame_layout_and_nul_rejection():
    data = channel.exec_frame(7, ["sh", "-c", "echo hi"], cwd="/tmp")
    kind, ident, length = channel.HEADER.unpack_from(data)
    assert (kind, ident) == (ord("X"), 7) and data[9:] == b"/tmp\0sh\0-c\0echo hi\0" and length == len(data) - 9
    with pytest.raises(Exception, match="NUL"):
        channel.exec_frame(1, ["a\0b"])


def test_put_frames_chunk_and_terminate():
    parts = list(channel.put_frames(3, "/x", b"a" * (channel.CHUNK + 1), 0o755))
    assert parts[0][9:] == b"/x\0" + (0o755).to_bytes(4, "little")
    assert [len(p) - 9 for p in parts[1:]] == [channel.CHUNK, 1, 0]
