"""Test doubles shipped beside the code: time and I/O are injected, not patched."""
