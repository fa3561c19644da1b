"""Desktop sessions' idle reports (conode/idle/report.py): the newest input wins, bad files are bounded and
ignored, the helper writes only what it knows."""

import os

from conode.idle.report import MAX_REPORT_BYTES, ReportsSource, report_forever, write_report
from conode.idle.sources import IdleReading


def test_the_most_recent_input_of_any_session_wins(tmp_path):
    (tmp_path / "1000").write_text("1000.0\n")
    (tmp_path / "1001").write_text("1900.5\n")
    reading = ReportsSource(tmp_path, wall=lambda: 2000.0).read()
    assert reading.idle_s == 99.5 and reading.source == "sessions"


def test_no_reports_or_no_directory_is_unknown_never_idle(tmp_path):
    assert ReportsSource(tmp_path).read().idle_s is None
    assert ReportsSource(tmp_path / "missing").read().idle_s is None


def test_garbage_and_oversized_reports_are_ignored_and_the_rest_count(tmp_path):
    (tmp_path / "a").write_text("not a time")
    (tmp_path / "b").write_bytes(b"9" * (MAX_REPORT_BYTES * 1000))  # read only as far as the bound: a huge time
    (tmp_path / "c").write_text("nan")
    (tmp_path / "d").write_bytes(b"\xff\xfe")
    (tmp_path / "e").write_text("1990")
    (tmp_path / ".e.tmp").write_text("1999")  # a report being written is not read
    reading = ReportsSource(tmp_path, wall=lambda: 2000.0).read()
    assert reading.idle_s == 0.0  # b's time lies in the future: input now, never negative


def test_a_report_in_the_future_means_input_now(tmp_path):
    (tmp_path / "1000").write_text("5000")
    assert ReportsSource(tmp_path, wall=lambda: 2000.0).read().idle_s == 0.0


def test_write_report_replaces_the_users_own_file_readable_by_the_agent(tmp_path):
    write_report(tmp_path, 1234.5)
    write_report(tmp_path, 1300.25)
    target = tmp_path / str(os.getuid())
    assert target.read_text() == "1300.250\n" and target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(os.getuid())]


def test_the_helper_writes_known_readings_and_skips_unknown_ones(tmp_path):
    readings = iter([IdleReading("x11", 10.0), IdleReading("x11", None, "display gone")])
    written = []

    class Source:
        name = "x11"

        def read(self):
            return next(readings)

    def sleep(_):
        written.append((tmp_path / str(os.getuid())).read_text())
        if len(written) == 2:
            raise KeyboardInterrupt

    try:
        report_forever(tmp_path, Source(), 1.0, wall=lambda: 100.0, sleep=sleep)
    except KeyboardInterrupt:
        pass
    assert written == ["90.000\n", "90.000\n"]  # the unknown reading left the last known input standing
