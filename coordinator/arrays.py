"""Arrays: one submission of many tasks, each the description with ``$(item)`` and ``$(index)`` replaced by its
item and its index (from 0). The placeholders are replaced in the command's arguments, the environment's values
and the output paths; inputs and stdin are the array's, shared by every task (sent and stored once).

Any other ``$(...)`` is left as it is, so that a shell's command substitution in ``sh -c`` still works.
"""

from __future__ import annotations

import re

from coordinator.store import Task

PLACEHOLDER = re.compile(r"\$\((item|index)\)")


def substitute(text: str, item: str, index: int) -> str:
    """*text* with $(item) and $(index) replaced (in one pass: an item holding "$(index)" stays as it is)."""
    return PLACEHOLDER.sub(lambda m: item if m.group(1) == "item" else str(index), text)


def expand(task: Task, items: list[str]) -> list[Task]:
    """One task per item, in order."""
    return [Task([substitute(arg, item, index) for arg in task.argv],
                 {name: substitute(value, item, index) for name, value in task.env.items()},
                 [substitute(path, item, index) for path in task.wanted])
            for index, item in enumerate(items)]
