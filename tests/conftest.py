import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

import conode.vm  # noqa: F401  (chooses the Unicorn engine before any test module imports unicorn)

REPO = Path(__file__).resolve().parent.parent

# The property tests judge answers, not speed: on a loaded two-core CI machine one example of a fuzz test may take
# longer than hypothesis's default deadline of 200 ms, which would fail a correct test.
settings.register_profile("conode", deadline=None)
settings.load_profile("conode")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)


def fast_engine_built() -> bool:
    from conode.vm.cpu.engine import LIBRARY, engine_dir

    return (engine_dir() / LIBRARY).exists()


@pytest.fixture(params=["fast", "stock"])
def conode(request):
    """Run the real `conode` CLI in a separate process, on each engine."""
    if request.param == "fast" and not fast_engine_built():
        pytest.skip("the fast engine is not built on this host (`conode engine build`)")

    def run(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "conode.cli", *args],
            capture_output=True, timeout=timeout, cwd=REPO,
            env={**os.environ, "CONODE_ENGINE": request.param, **(env or {})},
        )

    run.engine = request.param
    return run
