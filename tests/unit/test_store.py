import sqlite3

from coordinator.store import SCHEMA_VERSION, Store


def test_a_database_from_the_previous_schema_is_migrated(tmp_path):
    path = tmp_path / "coordinator.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL, argv BLOB NOT NULL,
            inputs BLOB NOT NULL, wanted BLOB NOT NULL, mem_mib INTEGER NOT NULL, node TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, exit_status INTEGER, reason TEXT, submitted_by TEXT,
            submitted_at REAL NOT NULL, started_at REAL, finished_at REAL);
    """)
    old.commit()
    old.close()
    store = Store(path)
    job = store.add_job(["true"], {}, [], 128, "admin")
    store.mark_running(job, "n1")
    store.mark_vacated(job)
    assert store.vacated_jobs("n1") == [job]
    assert store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(SCHEMA_VERSION)


def test_job_lifecycle_survives_reopening(tmp_path):
    store = Store(tmp_path / "c.db")
    job = store.add_job(["echo", "hi"], {"in.txt": b"x"}, ["out.txt"], 64, "admin")
    store.mark_running(job, "n1")
    store.append_output(job, "stdout", b"hi\n")
    store.close()
    again = Store(tmp_path / "c.db")  # a coordinator restart
    assert again.job(job).state == "running" and again.job(job).node == "n1"
    assert again.job_inputs(job) == {"in.txt": b"x"}
    again.finish(job, "done", 0, None, {"out.txt": b"result"})
    assert again.files(job) == {"out.txt": b"result"} and again.output(job)["stdout"] == b"hi\n"


def test_output_is_stored_up_to_the_stream_limit_with_one_marker(tmp_path):
    from conode.output_cap import DOWNSTREAM_LIMIT as LIMIT
    from conode.output_cap import TRUNCATION_NOTE as TRUNCATION_MARKER

    store = Store(tmp_path / "c.db")
    job = store.add_job(["yes"], {}, [], 128, "admin")
    store.append_output(job, "stdout", b"a" * (LIMIT - 10))
    store.append_output(job, "stderr", b"b" * 10)  # exactly full: nothing dropped yet
    store.append_output(job, "stdout", b"c" * 5)  # over: the marker, once
    store.append_output(job, "stdout", b"d" * 1000)
    store.close()
    again = Store(tmp_path / "c.db")  # the count survives a restart (it is read back from the table)
    again.append_output(job, "stderr", b"e" * 1000)
    out = again.output(job)
    assert out["stdout"] == b"a" * (LIMIT - 10) + TRUNCATION_MARKER
    assert out["stderr"] == b"b" * 10
    (stored,) = again.db.execute("SELECT SUM(LENGTH(data)) FROM job_output WHERE job=?", (job,)).fetchone()
    assert stored == LIMIT + len(TRUNCATION_MARKER)
    again.clear_output(job)  # a new attempt starts with a clean slate
    again.append_output(job, "stdout", b"fresh")
    assert again.output(job) == {"stdout": b"fresh", "stderr": b""}


def test_output_read_back_is_capped_even_from_a_database_written_before_the_cap(tmp_path):
    from conode.limits import MAX_STREAM_BYTES
    from conode.output_cap import TRUNCATION_NOTE

    store = Store(tmp_path / "c.db")
    job = store.add_job(["yes"], {}, [], 128, "admin")
    chunk = b"z" * (1 << 20)
    for _ in range(MAX_STREAM_BYTES // len(chunk) + 3):  # what an older coordinator let through
        store.db.execute("INSERT INTO job_output (job, stream, data) VALUES (?, 'stdout', ?)", (job, chunk))
    out = store.output(job)
    assert out["stdout"] == b"z" * MAX_STREAM_BYTES + TRUNCATION_NOTE


def test_timestamps_come_from_the_given_clock(tmp_path):
    from conode.testing.clock import FakeClock

    clock = FakeClock(1_700_000_000.0)
    store = Store(tmp_path / "c.db", clock=clock)
    job = store.add_job(["true"], {}, [], 128, "admin")
    clock.advance(5)
    store.mark_running(job, "n1")
    clock.advance(7)
    store.mark_vacated(job)
    assert store.vacated_jobs(older_than=clock() + 1) == [job] and store.vacated_jobs(older_than=clock()) == []
    store.mark_resumed(job)
    clock.advance(1)
    store.finish(job, "done", 0, None)
    record = store.job(job)
    assert (record.submitted_at, record.started_at, record.finished_at) == (1_700_000_000.0, 1_700_000_005.0,
                                                                           1_700_000_013.0)


def test_queued_and_counts(tmp_path):
    store = Store(tmp_path / "c.db")
    jobs = [store.add_job(["true"], {}, [], mem, "admin") for mem in (64, 128, 256)]
    jobs.append(store.add_job(["true"], {}, [], 64, "alice", priority=5))
    store.mark_running(jobs[1], "n1")
    assert store.queued() == [(jobs[0], 64, 1, 0, "admin", 0), (jobs[2], 256, 1, 0, "admin", 0),
                              (jobs[3], 64, 1, 0, "alice", 5)]
    assert store.job_counts() == {"queued": 3, "running": 1}


def test_keys_are_enrolled_all_or_none(tmp_path):
    import pytest

    from conode.errors import ConodeError

    store = Store(tmp_path / "c.db")
    store.add_keys([("n1", "agent", "k1"), ("n2", "agent", "k2")])
    with pytest.raises(ConodeError, match="'n3' or with that public key is already enrolled"):
        store.add_keys([("n3", "agent", "k3"), ("n3", "agent", "k4")])
    with pytest.raises(ConodeError, match="role must be one of"):
        store.add_key("x", "root", "k5")
    assert [row[:3] for row in store.keys()] == [("n1", "agent", "k1"), ("n2", "agent", "k2")]
    assert store.key_owner("k3") is None and store.key_owner("k2") == ("n2", "agent")


def test_a_version_5_database_gains_priorities_and_keeps_owners(tmp_path):
    path = tmp_path / "coordinator.db"
    Store(path).close()
    old = sqlite3.connect(path)  # make it what a version 5 coordinator left: no priority column
    old.executescript("""
        DROP INDEX jobs_owner;
        ALTER TABLE jobs DROP COLUMN priority;
        UPDATE meta SET value='5' WHERE key='schema';
        INSERT INTO jobs (state, argv, inputs, wanted, mem_mib, submitted_by, submitted_at)
            VALUES ('queued', X'91a474727565', X'80', X'90', 128, 'admin', 1.0);
    """)
    old.commit()
    old.close()
    store = Store(path)
    (job,) = store.jobs()
    assert job.owner == "admin" and job.priority == 0
    assert store.queued() == [(job.id, 128, 1, 0, "admin", 0)]
    assert [j.id for j in store.jobs(owner="admin")] == [job.id] and store.jobs(owner="alice") == []
    assert store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == str(SCHEMA_VERSION) == "6"


def test_a_gangs_ranks_carry_its_owner_and_priority(tmp_path):
    store = Store(tmp_path / "c.db")
    gang = store.add_job(["true"], {}, [], 64, "alice", guests=2, priority=7)
    ranks = store.start_gang(gang, ["n1", "n2"])
    assert {(store.job(r).owner, store.job(r).priority) for r in ranks} == {("alice", 7)}
