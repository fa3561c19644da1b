"""Which Unicorn runs the guest: conode's patched build (the fast engine) or the stock wheel.

The fast engine is the pinned Unicorn sdist from PyPI with the patches in ``patches/`` (see ``build.py``),
built once into the cache directory by ``conode engine build``. It is loaded by the stock Python binding
through ``LIBUNICORN_PATH``, so the choice must be made before anything imports ``unicorn``: this package is
imported by ``conode.vm`` for exactly that reason, and never imports ``unicorn`` itself.

``CONODE_ENGINE`` chooses: ``auto`` (the default: the fast engine when it is built, else stock), ``fast``
(fail clearly if it is not built) or ``stock``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from conode.cache import cache_dir
from conode.errors import EngineError

UNICORN_VERSION = "2.1.4"
LIBRARY = "libunicorn.so.2"


@dataclass(frozen=True)
class EngineChoice:
    name: str  # "fast" or "stock"
    reason: str
    library_dir: Path | None


def patch_files() -> list[tuple[str, bytes]]:
    folder = resources.files("conode.vm.cpu.engine").joinpath("patches")
    return sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.name.endswith(".patch"))


def engine_dir() -> Path:
    """Where the fast engine for this Unicorn version and this patch set lives."""
    digest = hashlib.sha256(UNICORN_VERSION.encode())
    for name, data in patch_files():
        digest.update(name.encode() + data)
    return cache_dir() / f"engine-{UNICORN_VERSION}-{digest.hexdigest()[:12]}"


def _installed_unicorn() -> str | None:
    try:
        return metadata.version("unicorn")
    except metadata.PackageNotFoundError:
        return None


def select_engine() -> EngineChoice:
    """Decide the engine and point the Unicorn binding at it (before `import unicorn`)."""
    wanted = os.environ.get("CONODE_ENGINE", "auto")
    if wanted not in ("auto", "fast", "stock"):
        raise EngineError(f"CONODE_ENGINE must be auto, fast or stock (got {wanted!r})")
    user_path = os.environ.get("LIBUNICORN_PATH")
    if user_path and not os.environ.get("CONODE_ENGINE_SELECTED"):
        return EngineChoice("custom", f"LIBUNICORN_PATH={user_path} set by the user", Path(user_path))
    if wanted == "stock":
        os.environ.pop("LIBUNICORN_PATH", None)
        return EngineChoice("stock", "CONODE_ENGINE=stock", None)
    directory = engine_dir()
    if _installed_unicorn() == UNICORN_VERSION and (directory / LIBRARY).exists():
        os.environ["LIBUNICORN_PATH"] = str(directory)
        os.environ["CONODE_ENGINE_SELECTED"] = "1"  # worker processes inherit the same choice
        return EngineChoice("fast", f"built in {directory}", directory)
    if wanted == "fast":
        raise EngineError("the fast engine is not built for this version; run `conode engine build`")
    return EngineChoice("stock", "the fast engine is not built (`conode engine build` builds it)", None)


SELECTED = select_engine()
