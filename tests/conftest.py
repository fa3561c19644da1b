import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)


@pytest.fixture
def conode():
    """Run the real `conode` CLI in a separate process."""

    def run(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "conode.cli", *args],
            capture_output=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
        )

    return run
