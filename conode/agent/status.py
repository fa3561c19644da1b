"""status.json: what the running agent sees and does, for `conode status` (read by another process).

Written atomically at most once a second. JSON has no NaN or infinity: a non-finite number is written as null,
so any JSON reader can parse the file.

An agent run as a service keeps its state directory to itself, so it also writes a copy, readable by everyone, as
``.status.json`` in its idle-reports directory, where the workstation's owner finds it without admin rights. That
directory is writable by every local user, so a reader trusts the copy only when the directory's owner (the
agent's account) owns it too (:func:`shared_status`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from conode.agent.disk import StateDisk

STATUS_NAME = "status.json"
SHARED_STATUS_NAME = ".status.json"  # in the idle-reports directory
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


def shared_status(directory: Path) -> Path | None:
    """The agent's readable status copy in *directory*, if there is one the agent (not another user) wrote."""
    path = directory / SHARED_STATUS_NAME
    try:
        return path if os.stat(path).st_uid == os.stat(directory).st_uid else None
    except OSError:
        return None


class StatusFile:
    def __init__(self, state_dir: Path, clock: Callable[[], float], disk: StateDisk,
                 shared_dir: Path | None = None) -> None:
        """*shared_dir*: where the readable copy goes too (the idle-reports directory), if anywhere."""
        self.path = state_dir / STATUS_NAME
        self.shared = shared_dir / SHARED_STATUS_NAME if shared_dir is not None else None
        self._clock = clock
        self._disk = disk
        self._written_at = -math.inf

    def due(self) -> bool:
        return self._clock() - self._written_at >= STATUS_EVERY_S

    def write(self, status: dict[str, Any]) -> None:
        self._written_at = self._clock()
        text = json.dumps(json_safe(status), allow_nan=False)
        self._disk.attempt("write status.json", lambda: self._replace(self.path, text))
        if self.shared is not None and self.shared.parent.is_dir():  # none: no owner's session to read it
            shared = self.shared
            self._disk.attempt(f"write {shared}", lambda: self._replace(shared, text, 0o644))

    @staticmethod
    def _replace(path: Path, text: str, mode: int | None = None) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        if mode is not None:
            tmp.chmod(mode)
        tmp.replace(path)
