"""The agent's writes to its state directory, which may be read-only or full: said once, never fatal.

An agent whose disk fails keeps running its guests and reporting to the coordinator; only what it keeps for a
restart of its own (unacknowledged results, vacated guests' job lists, status.json) is then lost. Each kind of
write warns once when it starts failing and once when it works again, not at every tick.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

log = logging.getLogger("conode.agent")

T = TypeVar("T")


class StateDisk:
    def __init__(self) -> None:
        self._failing: dict[str, str] = {}  # what -> the error, while it fails

    def attempt(self, what: str, action: Callable[[], T]) -> T | None:
        """Run *action*; on OSError warn (once) that *what* failed and return None."""
        try:
            result = action()
        except OSError as exc:
            if what not in self._failing:
                log.warning("cannot %s: %s; the agent keeps running, but this is not kept for its restart "
                            "(check the state directory's permissions and free space)", what, exc)
            self._failing[what] = str(exc)
            return None
        if self._failing.pop(what, None) is not None:
            log.info("%s works again", what)
        return result

    @property
    def problems(self) -> dict[str, str]:
        """What is failing now, and why."""
        return dict(self._failing)
