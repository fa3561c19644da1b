"""The rollout in ansible/ is ansible-lint clean at its strictest profile, the Windows role included (its modules
come from the ansible.windows and community.windows collections that the `ansible` package ships)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"


@pytest.mark.skipif(shutil.which("ansible-lint") is None, reason="ansible-lint is in the test extras: "
                    "pip install -e '.[test]'")
def test_the_playbooks_and_roles_are_ansible_lint_clean():
    result = subprocess.run(["ansible-lint", "--offline", "--profile", "production", "--nocolor"], cwd=ANSIBLE,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
