"""The per-job cap on stdout and stderr, applied the same way at every hop (worker, agent, coordinator).

A job's streams together may carry limits.MAX_STREAM_BYTES; the chunk that crosses the limit is cut there and
followed by one note saying so, and everything after it is dropped. The worker applies the cap first; the agent
and the coordinator apply it again with room for the note (they trust nobody upstream), so a stream capped
once passes the later hops unchanged and the note reaches the user.
"""

from __future__ import annotations

from conode.limits import MAX_STREAM_BYTES

TRUNCATION_NOTE = f"\n[conode: output truncated: a job's stdout and stderr may carry {MAX_STREAM_BYTES} bytes]\n".encode()
DOWNSTREAM_LIMIT = MAX_STREAM_BYTES + len(TRUNCATION_NOTE)  # what a hop after the worker lets through


def clip(used: int, data: bytes, limit: int = MAX_STREAM_BYTES) -> bytes:
    """What of *data* to pass on when *used* bytes of the job's streams came before it (count on past the
    limit: the caller adds ``len(data)`` to *used* whatever this returns)."""
    room = limit - used
    if len(data) <= room:
        return data
    if room < 0:
        return b""  # cut already, and said so
    return data[:room] + TRUNCATION_NOTE
