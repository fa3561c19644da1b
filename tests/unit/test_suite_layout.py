# SPDX-License-Identifier: GPL-2.0-or-later
"""The suite's own layout: what would stop pytest from collecting it at all."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_test_modules_have_unique_names():
    # The test folders are not packages, so pytest imports each module by its base name: two files of one name
    # in different folders make the whole run stop at collection.
    names = Counter(path.name for path in TESTS.rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
