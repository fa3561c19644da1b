"""Commands printed for people to paste: every word shell-quoted, so keys and paths with shell characters
(Z85 keys use $ & ! ( ) < > and more) reach the program exactly as printed."""

from __future__ import annotations

import shlex


def command(*words: object) -> str:
    """*words* as one line a POSIX shell splits back into exactly those words."""
    return shlex.join(str(word) for word in words)
