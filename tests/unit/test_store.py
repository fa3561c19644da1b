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
