"""status.json: what the running agent sees and does, for `conode status` (read by another process).

Written atomically at most once a second. JSON has no NaN or infinity: a non-finite number is written as null,
so any JSON reader can parse the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from conode.agent.disk import StateDisk

STATUS_NAME = "status.json"
STATUS_EVERY_S = 1.0


def json_safe(value: Any) -> Any:
    """*value* with every non-finite float, at any depth, replaced by None (and tuples made lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class StatusFile:
    def __init__(self, state_dir: Path, clock: Callable[[], float], disk: StateDisk) -> None:
        self.path = state_dir / STATUS_NAME
        self._clock = clock
        self._disk = disk
        self._written_at = -math.inf

    def due(self) -> bool:
        return self._clock() - self._written_at >= STATUS_EVERY_S

    def write(self, status: dict[str, Any]) -> None:
        self._written_at = self._clock()
        text = json.dumps(json_safe(status), allow_nan=False)
        self._disk.attempt("write status.json", lambda: self._replace(text))

    def _replace(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)
