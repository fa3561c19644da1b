"""conode's per-user directories, by the platform's conventions (platformdirs).

- cache (built native helpers, the fast engine): ``~/.cache/conode`` (XDG), ``~/Library/Caches/conode``,
  ``%LOCALAPPDATA%\\conode\\Cache``; ``$CONODE_CACHE_DIR`` overrides;
- configuration (the admin CLI's client.toml): ``~/.config/conode`` (XDG), ``~/Library/Application Support/conode``,
  ``%LOCALAPPDATA%\\conode``.

The platform is looked up at each call, not at import, so each platform's rules can be tested anywhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from platformdirs.api import PlatformDirsABC

APP_NAME = "conode"


def platform_dirs() -> PlatformDirsABC:
    if sys.platform == "win32":
        from platformdirs.windows import Windows as Dirs
    elif sys.platform == "darwin":
        from platformdirs.macos import MacOS as Dirs  # type: ignore[assignment]
    else:
        from platformdirs.unix import Unix as Dirs  # type: ignore[assignment]
    return Dirs(APP_NAME, appauthor=False)


def cache_dir() -> Path:
    explicit = os.environ.get("CONODE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(platform_dirs().user_cache_dir)


def config_dir() -> Path:
    return Path(platform_dirs().user_config_dir)
