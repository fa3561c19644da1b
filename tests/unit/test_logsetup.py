"""Logs under systemd: no second timestamp on the journal, the priority as journald's prefix instead."""

import os
import subprocess
import sys

PROGRAM = ("from conode.logsetup import configure_logging; import logging; configure_logging('INFO'); "
           "log = logging.getLogger('conode.agent'); log.info('hello'); log.warning('careful'); log.error('a\\nb')")


def run_with_stderr_to(path, journal_stream):
    env = {**os.environ}
    env.pop("JOURNAL_STREAM", None)
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    with open(path, "wb") as err:
        subprocess.run([sys.executable, "-c", PROGRAM], stderr=err, env=env, check=True, timeout=60)
    return path.read_text().splitlines()


def test_on_the_journal_lines_carry_priorities_not_timestamps(tmp_path):
    log = tmp_path / "journal"
    log.touch()
    stat = os.stat(log)
    lines = run_with_stderr_to(log, f"{stat.st_dev}:{stat.st_ino}")
    assert lines == ["<6>conode.agent INFO hello", "<4>conode.agent WARNING careful", "<3>conode.agent ERROR a",
                     "<3>b"]


def test_a_stderr_that_is_not_the_named_stream_keeps_timestamps(tmp_path):
    log = tmp_path / "file"
    for stream in (None, "1:2", "garbage"):  # unset, another stream (stderr redirected), nonsense
        lines = run_with_stderr_to(log, stream)
        assert lines[0].endswith(" conode.agent INFO hello") and lines[0][:4].isdigit(), lines
