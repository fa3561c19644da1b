"""Public-key checks (conode/cluster/keys.py): any text gives an answer, never an exception."""

import zmq

from conode.cluster.keys import is_valid_public_key


def test_a_real_key_is_valid():
    public, _ = zmq.curve_keypair()
    assert is_valid_public_key(public.decode())


def test_text_that_is_not_a_key_is_refused():
    assert not is_valid_public_key("short")
    assert not is_valid_public_key("é" * 40)
    assert not is_valid_public_key(" " * 40)  # not in the Z85 alphabet
    assert not is_valid_public_key("%" * 40)  # Z85 characters, but groups beyond 32 bits
