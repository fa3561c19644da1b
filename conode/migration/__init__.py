"""Migration: a running guest moves to another host (pre-copy), over any byte stream.

- :func:`migrate_out` (source.py) streams a :class:`RunningGuest`'s RAM while it runs, then pauses it and sends
  the rest with its device state; :func:`migrate_in` (destination.py) receives, checks and builds it.
- stream.py is the wire format; conode/vm/cpu/dirty.py tells which pages changed between rounds.
"""

from conode.migration.destination import Arrival, migrate_in
from conode.migration.running import RunningGuest
from conode.migration.source import Policy, Report, migrate_out
from conode.migration.stream import ByteStream, MigrationError, SocketStream

__all__ = ["Arrival", "ByteStream", "MigrationError", "Policy", "Report", "RunningGuest", "SocketStream",
           "migrate_in", "migrate_out"]
