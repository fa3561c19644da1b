"""The coordinator's durable state in SQLite (WAL): jobs, their output, enrolled keys, drained nodes.

Every job transition is committed before the coordinator acts on it, so a coordinator killed with SIGKILL
and restarted finds every job where it left it. The coordinator groups the writes of one loop turn into one
transaction (:meth:`Store.grouped`: one commit, one fsync, for all the transitions of the turn) and holds back
what it sends meanwhile until that commit (coordinator/outgoing.py). All of the coordinator's SQL lives here.
Timestamps come from the clock the store is given (the coordinator's), so that tests can move time.

A job's stdout and stderr together are stored within the stream cap (conode/output_cap.py); beyond it one note
is stored and the rest dropped, so that one chatty job can neither fill the disk nor make its `logs` reply too big.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from conode.errors import ConodeError
from conode import output_cap
from conode.limits import MAX_STREAM_BYTES

SCHEMA_VERSION = 6
TERMINAL_STATES = ("done", "failed", "cancelled")
# vacated: saved on its node's disk; held: queued but not placed until released
JOB_STATES = ("queued", "held", "running", "vacated") + TERMINAL_STATES
ROLES = ("agent", "admin", "user")  # see coordinator/users.py
_STORED_OUTPUT_MAX = output_cap.DOWNSTREAM_LIMIT + len(output_cap.TRUNCATION_NOTE)  # one job's streams, at most

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    argv BLOB NOT NULL,
    inputs BLOB NOT NULL,
    wanted BLOB NOT NULL,
    mem_mib INTEGER NOT NULL,
    node TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    exit_status INTEGER,
    reason TEXT,
    submitted_by TEXT,
    submitted_at REAL NOT NULL,
    started_at REAL,
    vacated_at REAL,
    finished_at REAL,
    guests INTEGER NOT NULL DEFAULT 1,
    network TEXT,
    gang INTEGER,
    rank INTEGER,
    image TEXT,
    disk_mib INTEGER,
    env BLOB,
    modes BLOB,
    timeout_s REAL,
    vacated_s REAL NOT NULL DEFAULT 0,
    array_id INTEGER,
    task INTEGER,
    cpu_s REAL,
    priority INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(submitted_by, id);
CREATE TABLE IF NOT EXISTS job_output (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job INTEGER NOT NULL,
    stream TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS job_output_job ON job_output(job, seq);
CREATE TABLE IF NOT EXISTS job_files (
    job INTEGER NOT NULL,
    path TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job, path)
);
CREATE TABLE IF NOT EXISTS keys (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    public_key TEXT NOT NULL UNIQUE,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS drained (node TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS moves (
    job INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    downtime_s REAL,
    total_s REAL,
    bytes INTEGER,
    PRIMARY KEY (job, epoch)
);
-- a gang's newest complete set of coordinated checkpoints (coordinator/gang_cuts.py): its cut's number and each
-- rank's piece, [[rank job id, piece number], ...] in rank order, as JSON
CREATE TABLE IF NOT EXISTS gang_cuts (
    gang INTEGER PRIMARY KEY,
    number INTEGER NOT NULL,
    pieces TEXT NOT NULL,
    took_s REAL NOT NULL
);
-- Where a handed-over guest's checkpoints go on from on its destination (msgpack: interval, piece number, output
-- offsets), fixed at the hand-over; kept while the move is active, so that a coordinator restarted before the
-- destination says it arrived can still tell it.
CREATE TABLE IF NOT EXISTS move_checkpoints (
    job INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    start BLOB NOT NULL,
    PRIMARY KEY (job, epoch)
);
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    added_by TEXT,
    added_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Job:
    id: int
    state: str
    argv: list[str]
    wanted: list[str]
    mem_mib: int
    node: str | None
    attempts: int
    exit_status: int | None
    reason: str | None
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    guests: int = 1  # a job of several guests is a gang: one rank per guest, placed all or none
    network: str | None = None  # a shared conet network an admin named; None: the job's own
    gang: int | None = None  # set on a rank: the job it is a guest of
    rank: int | None = None
    image: str | None = None  # the pool image the job's guest boots from; None: the built-in initramfs
    disk_mib: int | None = None  # what the guest may write to its disk (None: the default)
    env: dict[str, str] | None = None  # variables the command gets
    timeout_s: float | None = None  # its time limit: running longer fails it
    array_id: int | None = None  # the first job of the array submission it belongs to
    task: int | None = None  # its index in that array
    cpu_s: float | None = None  # how long its guest ran it (a gang: its ranks together)
    owner: str = ""  # the name of the key that submitted it (a gang's ranks carry their gang's)
    priority: int = 0  # among its owner's queued jobs, higher first

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "state": self.state, "argv": self.argv, "node": self.node, "attempts": self.attempts,
            "exit_status": self.exit_status, "reason": self.reason, "mem_mib": self.mem_mib,
            "submitted_at": self.submitted_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "guests": self.guests, "network": self.network, "image": self.image, "env": self.env or {},
            "timeout_s": self.timeout_s, "array": self.array_id, "task": self.task, "cpu_s": self.cpu_s,
            "owner": self.owner, "priority": self.priority,
        }


_JOB_COLUMNS = ("id, state, argv, wanted, mem_mib, node, attempts, exit_status, reason, submitted_at, started_at, "
                "finished_at, guests, network, gang, rank, image, disk_mib, env, timeout_s, array_id, task, cpu_s, "
                "COALESCE(submitted_by, ''), priority")


MOVE_STATES = ("prepare", "go", "done", "aborted")  # go: the destination owns the guest (coordinator/moves.py)
ACTIVE_MOVE_STATES = ("prepare", "go")


@dataclass(frozen=True)
class OutputSince:
    """A followed job's output since a cursor."""

    streams: dict[str, bytes]  # stdout, stderr
    at: dict[str, int]  # where each stream's bytes here begin in its stored whole
    cursor: int
    more: bool  # more is there already
    restarted: bool  # the output the cursor stood in was cleared: a new attempt started afresh


@dataclass(frozen=True)
class Move:
    """One move of a job's guest between nodes; *epoch* counts the job's moves (its ownership epoch)."""

    job: int
    epoch: int
    source: str
    destination: str
    state: str
    reason: str | None
    started_at: float
    ended_at: float | None
    downtime_s: float | None
    total_s: float | None
    bytes: int | None


_MOVE_COLUMNS = "job, epoch, source, destination, state, reason, started_at, ended_at, downtime_s, total_s, bytes"


def _job(row: tuple) -> Job:
    (ident, state, argv, wanted, mem_mib, node, attempts, exit_status, reason, submitted_at, started_at,
     finished_at, guests, network, gang, rank, image, disk_mib, env, timeout_s, array_id, task, cpu_s, owner,
     priority) = row
    return Job(ident, state, msgpack.unpackb(argv), msgpack.unpackb(wanted), mem_mib, node, attempts, exit_status,
               reason, submitted_at, started_at, finished_at, guests, network, gang, rank, image, disk_mib,
               msgpack.unpackb(env) if env is not None else None, timeout_s, array_id, task, cpu_s, owner, priority)


@dataclass(frozen=True)
class Submission:
    """What one submission shares between its jobs (an array's tasks differ only in their command, environment
    and outputs): stored once, on its first job."""

    inputs: dict[str, bytes]
    modes: dict[str, int]
    mem_mib: int
    submitted_by: str
    guests: int = 1
    network: str | None = None
    image: str | None = None
    disk_mib: int | None = None
    timeout_s: float | None = None
    priority: int = 0  # among its owner's (submitted_by's) queued jobs, higher first


@dataclass(frozen=True)
class Task:
    """One job of a submission: its command, environment and outputs."""

    argv: list[str]
    env: dict[str, str]
    wanted: list[str]


@dataclass(frozen=True)
class Image:
    """A disk image in the pool: its chunks (SHA-256 each, in order) and the whole file's SHA-256."""

    name: str
    sha256: str
    size: int
    chunks: list[bytes]
    added_by: str | None
    added_at: float

    def wire(self) -> dict[str, Any]:
        """The image as a run_job message describes it to the agent that fetches it."""
        return {"name": self.name, "sha256": self.sha256, "size": self.size, "chunks": self.chunks}


def _image(row: tuple) -> Image:
    name, sha256, size, chunks, added_by, added_at = row
    return Image(name, sha256, size, [chunks[i:i + 32] for i in range(0, len(chunks), 32)], added_by, added_at)


class Store:
    """One SQLite database under the coordinator's state directory."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._output_bytes: dict[int, int] = {}  # stored stdout+stderr per job, for the jobs written to lately
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConodeError(f"coordinator database {path} is unusable: {exc}") from None
        (version,) = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if int(version) != SCHEMA_VERSION:
            raise ConodeError(f"coordinator database {path} has schema {version}; this coordinator uses "
                              f"{SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Bring a database written by an older coordinator up to this schema."""
        (version,) = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if int(version) == 1:  # version 2 added the time a job was vacated
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            if "vacated_at" not in columns:
                self.db.execute("ALTER TABLE jobs ADD COLUMN vacated_at REAL")
            self.db.execute("UPDATE meta SET value='2' WHERE key='schema'")
            version = 2
        if int(version) == 2:  # version 3 added gangs: jobs of several guests, and their ranks
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            for column, kind in (("guests", "INTEGER NOT NULL DEFAULT 1"), ("network", "TEXT"),
                                 ("gang", "INTEGER"), ("rank", "INTEGER")):
                if column not in columns:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            self.db.execute("UPDATE meta SET value='3' WHERE key='schema'")
            version = 3
        if int(version) == 3:  # version 4 added disk images (the table is created by _SCHEMA) and jobs on them
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            for column, kind in (("image", "TEXT"), ("disk_mib", "INTEGER")):
                if column not in columns:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            self.db.execute("UPDATE meta SET value='4' WHERE key='schema'")
            version = 4
        if int(version) == 4:  # version 5 added job launches (environment, modes, time limit), arrays, CPU time
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            for column, kind in (("env", "BLOB"), ("modes", "BLOB"), ("timeout_s", "REAL"),
                                 ("vacated_s", "REAL NOT NULL DEFAULT 0"), ("array_id", "INTEGER"),
                                 ("task", "INTEGER"), ("cpu_s", "REAL")):
                if column not in columns:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
            self.db.execute("UPDATE meta SET value='5' WHERE key='schema'")
            version = 5
        if int(version) == 5:  # version 6 added users: a job's priority among its owner's (submitted_by) jobs
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            if "priority" not in columns:
                self.db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
            self.db.execute("UPDATE meta SET value='6' WHERE key='schema'")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_gang ON jobs(gang, attempts, rank)")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def grouped(self) -> Iterator[None]:
        """Writes within the block go into one transaction, committed when it ends (however it ends: what was
        written stays written, as it would have statement by statement). A block without writes commits nothing."""
        self.db.isolation_level = "IMMEDIATE"  # sqlite3 begins a transaction before the first write
        try:
            yield
        finally:
            self.db.commit()
            self.db.isolation_level = None

    @contextmanager
    def _atomic(self) -> Iterator[None]:
        """All of the block's writes or none: a transaction of its own, or a savepoint inside a group's."""
        if self.db.isolation_level is not None and not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")  # grouped: this block opens the group's transaction
        if self.db.in_transaction:
            self.db.execute("SAVEPOINT atomic")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK TO atomic")
                self.db.execute("RELEASE atomic")
                raise
            self.db.execute("RELEASE atomic")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- jobs ------------------------------------------------------------------------------------------
    def add_job(self, argv: list[str], inputs: dict[str, bytes], wanted: list[str], mem_mib: int,
                submitted_by: str, guests: int = 1, network: str | None = None, image: str | None = None,
                disk_mib: int | None = None, priority: int = 0) -> int:
        (job,) = self.add_jobs(Submission(inputs, {}, mem_mib, submitted_by, guests, network, image, disk_mib,
                                          priority=priority), [Task(argv, {}, wanted)])
        return job

    def add_jobs(self, submission: Submission, tasks: list[Task], array: bool = False) -> list[int]:
        """Queue one job per task, all or none; the submission's inputs are stored once, on the first. An array's
        jobs carry the first one's id as their array's and their index in it."""
        now, shared = self._clock(), submission
        empty = msgpack.packb({})
        ids: list[int] = []
        with self._atomic():
            for index, task in enumerate(tasks):
                first = not ids
                inputs = msgpack.packb(shared.inputs, use_bin_type=True) if first else empty
                modes = msgpack.packb(shared.modes) if first else None
                cur = self.db.execute(
                    "INSERT INTO jobs (state, argv, inputs, wanted, mem_mib, submitted_by, submitted_at, guests, "
                    "network, image, disk_mib, env, modes, timeout_s, array_id, task, priority) "
                    "VALUES ('queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (msgpack.packb(task.argv), inputs, msgpack.packb(task.wanted), shared.mem_mib,
                     shared.submitted_by, now, shared.guests, shared.network, shared.image, shared.disk_mib,
                     msgpack.packb(task.env) if task.env else None, modes, shared.timeout_s,
                     ids[0] if ids else None, index if array else None, shared.priority))
                ids.append(int(cur.lastrowid))  # type: ignore[arg-type]
            if array:
                self.db.execute("UPDATE jobs SET array_id=? WHERE id=?", (ids[0], ids[0]))
        return ids

    def _gang_attempt(self, gang: int, now: float) -> None:
        """The gang's own row: running, as a new attempt (its ranks' rows say where)."""
        self.db.execute("UPDATE jobs SET state='running', node=NULL, attempts=attempts+1, started_at=?, vacated_s=0 "
                        "WHERE id=?", (now, gang))

    def start_gang(self, gang: int, nodes: list[str]) -> list[int]:
        """Mark gang job *gang* running as one new attempt with a rank on each of *nodes* (rank i on nodes[i]);
        return the ranks' ids. The ranks share the gang's command and outputs; its inputs stay on the gang."""
        now = self._clock()
        with self._atomic():
            self._gang_attempt(gang, now)
            ranks = [int(self.db.execute(  # type: ignore[arg-type]
                "INSERT INTO jobs (state, argv, inputs, wanted, mem_mib, node, attempts, submitted_by, submitted_at, "
                "started_at, guests, network, gang, rank, image, disk_mib, priority) SELECT 'running', argv, ?, "
                "wanted, mem_mib, ?, attempts, submitted_by, submitted_at, ?, guests, network, id, ?, image, disk_mib, "
                "priority FROM jobs "
                "WHERE id=?",
                (msgpack.packb({}), node, now, rank, gang)).lastrowid) for rank, node in enumerate(nodes)]
        return ranks

    def resume_gang(self, gang: int, ranks: list[int], nodes: list[str]) -> None:
        """Mark gang job *gang* running as one new attempt that goes on from its checkpoints: its ranks *ranks*
        (of an earlier attempt, in rank order; the guests in the checkpoints are theirs) run again, rank i on
        nodes[i]."""
        now = self._clock()
        with self._atomic():
            self._gang_attempt(gang, now)
            for rank, node in zip(ranks, nodes):
                self.db.execute("UPDATE jobs SET state='running', node=?, attempts=(SELECT attempts FROM jobs WHERE "
                                "id=?), started_at=?, vacated_s=0, vacated_at=NULL, finished_at=NULL, reason=NULL, "
                                "exit_status=NULL WHERE id=? AND gang=?", (node, gang, now, rank, gang))

    def keep_cut(self, gang: int, number: int, pieces: list[tuple[int, int]], took_s: float) -> None:
        """Record *gang*'s newest complete set (replacing the one before)."""
        self.db.execute("INSERT OR REPLACE INTO gang_cuts VALUES (?, ?, ?, ?)",
                        (gang, number, json.dumps([list(p) for p in pieces]), took_s))

    def cut_sets(self) -> list[tuple[int, int, list[tuple[int, int]], float]]:
        """Every gang's newest complete set, as (gang, number, pieces, took_s)."""
        return [(gang, number, [(int(r), int(s)) for r, s in json.loads(pieces)], took_s)
                for gang, number, pieces, took_s in self.db.execute("SELECT * FROM gang_cuts ORDER BY gang")]

    def running_gangs(self) -> list[int]:
        return [gang for (gang,) in self.db.execute("SELECT id FROM jobs WHERE state='running' AND guests>1 AND "
                                                    "gang IS NULL ORDER BY id")]

    def drop_cut(self, gang: int) -> None:
        self.db.execute("DELETE FROM gang_cuts WHERE gang=?", (gang,))

    def array_jobs(self, array: int) -> list[Job]:
        """The jobs (not ranks) of the array whose first job is *array*, by id."""
        rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE array_id=? AND gang IS NULL ORDER BY id",
                               (array,))
        return [_job(row) for row in rows]

    def ranks(self, gang: int) -> list[Job]:
        """The ranks of the gang's latest attempt, by rank."""
        rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE gang=? AND attempts=(SELECT attempts FROM "
                               f"jobs WHERE id=?) ORDER BY rank", (gang, gang))
        return [_job(row) for row in rows]

    def requeue_gang(self, gang: int, reason: str) -> None:
        """Put a gang back in the queue; what its ranks of this attempt still held is cancelled."""
        with self._atomic():
            self.db.execute("UPDATE jobs SET state='cancelled', reason=?, finished_at=? WHERE gang=? AND state IN "
                            "('running', 'vacated', 'queued')", (f"gang restarted: {reason}", self._clock(), gang))
            self.db.execute("UPDATE jobs SET state='queued', node=NULL, reason=? WHERE id=?", (reason, gang))

    def job(self, ident: int) -> Job | None:
        row = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id=?", (ident,)).fetchone()
        return _job(row) if row else None

    def job_inputs(self, ident: int) -> dict[str, bytes]:
        return self.job_files_in(ident)[0]

    def job_files_in(self, ident: int) -> tuple[dict[str, bytes], dict[str, int]]:
        """A job's inputs and their modes (those not 0644): its own, or its array's, stored on the first job."""
        row = self.db.execute("SELECT inputs, modes FROM jobs WHERE id=(SELECT COALESCE(array_id, id) FROM jobs "
                              "WHERE id=?)", (ident,)).fetchone()
        if not row:
            return {}, {}
        return msgpack.unpackb(row[0], raw=False), (msgpack.unpackb(row[1]) if row[1] is not None else {})

    def jobs(self, states: tuple[str, ...] | None = None, limit: int = 1000, newest_first: bool = False,
             by_finish: bool = False, owner: str | None = None) -> list[Job]:
        """Jobs (not ranks) in *states*, oldest first unless *newest_first*, or the last finished first; without
        states, the newest first. Only *owner*'s if given."""
        mine, args = ("AND submitted_by=? ", (owner,)) if owner is not None else ("", ())
        if by_finish:
            order = "finished_at DESC, id DESC"
        else:
            order = "id DESC" if newest_first else "id"
        if states:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) AND gang IS NULL "
                                   f"{mine}ORDER BY {order} LIMIT ?", (*states, *args, limit))
        else:
            rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE gang IS NULL {mine}ORDER BY id DESC "
                                   f"LIMIT ?", (*args, limit))
        return [_job(row) for row in rows]

    def queued(self) -> list[tuple[int, int, int, int, str, int]]:
        """(job id, guest memory, guests, image size in bytes or 0, owner, priority) of every queued job, oldest
        first (coordinator/queue.py's QueuedJob)."""
        return self.db.execute("SELECT id, mem_mib, guests, COALESCE(images.size, 0), COALESCE(submitted_by, ''), "
                               "priority FROM jobs LEFT JOIN images ON images.name = jobs.image "
                               "WHERE state='queued' AND gang IS NULL ORDER BY id").fetchall()

    def job_counts(self) -> dict[str, int]:
        """How many jobs are in each state (states without jobs are absent); a gang counts once, not per rank."""
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs WHERE gang IS NULL GROUP BY state").fetchall())

    def job_counts_by_user(self) -> list[tuple[str, str | None, int]]:
        """(state, submitter, jobs) for every state and submitter that has jobs; a gang counts once."""
        return self.db.execute("SELECT state, submitted_by, COUNT(*) FROM jobs WHERE gang IS NULL "
                               "GROUP BY state, submitted_by").fetchall()

    def running_jobs(self, node: str | None = None) -> list[Job]:
        """Jobs and ranks running on *node*, or on any node (a gang itself runs nowhere: its ranks do)."""
        if node is None:
            rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state='running' AND node IS NOT NULL")
        else:
            rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state='running' AND node=?", (node,))
        return [_job(row) for row in rows]

    def mark_running(self, ident: int, node: str) -> None:
        self.db.execute("UPDATE jobs SET state='running', node=?, attempts=attempts+1, started_at=?, vacated_s=0 "
                        "WHERE id=?", (node, self._clock(), ident))

    def set_held(self, ident: int, held: bool) -> bool:
        """Hold a queued job (it is not placed) or release a held one; False if it was not in the state."""
        before, after = ("queued", "held") if held else ("held", "queued")
        return self.db.execute("UPDATE jobs SET state=? WHERE id=? AND state=?", (after, ident, before)).rowcount > 0

    def overdue(self, now: float) -> list[Job]:
        """Running jobs (not ranks) that have run, vacated time aside, for longer than their time limit."""
        rows = self.db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state='running' AND gang IS NULL AND "
                               f"timeout_s IS NOT NULL AND started_at + vacated_s + timeout_s <= ?", (now,))
        return [_job(row) for row in rows]

    def requeue(self, ident: int, reason: str) -> None:
        self.db.execute("UPDATE jobs SET state='queued', node=NULL, reason=? WHERE id=? AND state IN "
                        "('running', 'vacated')", (reason, ident))

    def mark_vacated(self, ident: int) -> None:
        self.db.execute("UPDATE jobs SET state='vacated', vacated_at=? WHERE id=? AND state='running'",
                        (self._clock(), ident))

    def mark_resumed(self, ident: int) -> None:
        self.db.execute("UPDATE jobs SET state='running', vacated_s=vacated_s+MAX(0, ?-vacated_at), vacated_at=NULL "
                        "WHERE id=? AND state='vacated'", (self._clock(), ident))

    def vacated_jobs(self, node: str | None = None, older_than: float | None = None) -> list[int]:
        query, args = "SELECT id FROM jobs WHERE state='vacated'", []
        if node is not None:
            query, args = query + " AND node=?", [node]
        if older_than is not None:
            query, args = query + " AND vacated_at < ?", [*args, older_than]
        return [row[0] for row in self.db.execute(query, args)]

    def finish(self, ident: int, state: str, exit_status: int | None, reason: str | None,
               outputs: dict[str, bytes] | None = None, cpu_s: float | None = None) -> None:
        assert state in TERMINAL_STATES
        with self._atomic():
            for path, data in (outputs or {}).items():
                self.db.execute("INSERT OR REPLACE INTO job_files VALUES (?, ?, ?)", (ident, path, data))
            self.db.execute("UPDATE jobs SET state=?, exit_status=?, reason=?, finished_at=?, cpu_s=? WHERE id=?",
                            (state, exit_status, reason, self._clock(), cpu_s, ident))
        self._output_bytes.pop(ident, None)

    def append_output(self, ident: int, stream: str, data: bytes) -> None:
        """Store a piece of a job's stdout or stderr, within the job's stream cap (conode/output_cap.py)."""
        stored = self._output_bytes.get(ident)
        if stored is None:
            (stored,) = self.db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM job_output WHERE job=?",
                                        (ident,)).fetchone()
        passed = output_cap.clip(stored, data, output_cap.DOWNSTREAM_LIMIT)
        if passed:
            self.db.execute("INSERT INTO job_output (job, stream, data) VALUES (?, ?, ?)", (ident, stream, passed))
        self._output_bytes[ident] = stored + len(passed)  # past the limit once cut: nothing more is stored

    def output(self, ident: int) -> dict[str, bytes]:
        """A job's stdout and stderr as stored; never more than the stream cap and its note."""
        streams = {"stdout": bytearray(), "stderr": bytearray()}
        total = 0
        for stream, data in self.db.execute("SELECT stream, data FROM job_output WHERE job=? ORDER BY seq", (ident,)):
            if total + len(data) > _STORED_OUTPUT_MAX:  # only in a database written before the cap
                # Cut where the cap cuts, and say so even if the cap fell on a row boundary.
                streams[stream] += data[:max(0, MAX_STREAM_BYTES - total)] + output_cap.TRUNCATION_NOTE
                break
            streams[stream] += data
            total += len(data)
        return {name: bytes(data) for name, data in streams.items()}

    def output_sizes(self, ident: int) -> dict[str, int]:
        """How many bytes of stdout and stderr the job has stored."""
        sizes = dict.fromkeys(("stdout", "stderr"), 0)
        sizes.update(self.db.execute("SELECT stream, SUM(LENGTH(data)) FROM job_output WHERE job=? GROUP BY stream",
                                     (ident,)).fetchall())
        return sizes

    def output_since(self, ident: int, after: int, max_bytes: int) -> OutputSince:
        """The job's stdout and stderr stored after *after* (a cursor: 0 at first), at most about *max_bytes*."""
        streams = {"stdout": bytearray(), "stderr": bytearray()}
        at = dict.fromkeys(streams, 0)
        at.update(self.db.execute("SELECT stream, SUM(LENGTH(data)) FROM job_output WHERE job=? AND seq<=? "
                                  "GROUP BY stream", (ident, after)).fetchall())
        # truncate_output keeps a job's first row: none left at or before the cursor means clear_output ran
        restarted = after > 0 and self.db.execute(
            "SELECT 1 FROM job_output WHERE job=? AND seq<=? LIMIT 1", (ident, after)).fetchone() is None
        cursor, size, more = after, 0, False
        rows = self.db.execute("SELECT seq, stream, data FROM job_output WHERE job=? AND seq > ? ORDER BY seq",
                               (ident, after))
        for seq, stream, data in rows:
            if size and size + len(data) > max_bytes:
                more = True
                break
            streams[stream] += data
            cursor, size = seq, size + len(data)
        return OutputSince({k: bytes(v) for k, v in streams.items()}, at, cursor, more, restarted)

    def clear_output(self, ident: int) -> None:
        """Forget the output of an attempt that will be run again."""
        self.db.execute("DELETE FROM job_output WHERE job=?", (ident,))
        self._output_bytes[ident] = 0

    def truncate_output(self, ident: int, keep: dict[str, int]) -> None:
        """Keep only the first *keep[stream]* bytes of each stream: a job going on from a checkpoint writes again
        what it wrote after it. The first row stays, if only empty: it tells followers (output_since) that the
        output goes on, cut back, rather than starting afresh."""
        left = dict(keep)
        with self._atomic():
            rows = self.db.execute("SELECT seq, stream, data FROM job_output WHERE job=? ORDER BY seq", (ident,))
            for index, (seq, stream, data) in enumerate(rows.fetchall()):
                room = max(0, left.get(stream, 0))
                if len(data) > room:
                    if room or index == 0:
                        self.db.execute("UPDATE job_output SET data=? WHERE seq=?", (data[:room], seq))
                    else:
                        self.db.execute("DELETE FROM job_output WHERE seq=?", (seq,))
                left[stream] = room - min(room, len(data))
        self._output_bytes.pop(ident, None)

    def files(self, ident: int) -> dict[str, bytes]:
        return {path: data for path, data in self.db.execute("SELECT path, data FROM job_files WHERE job=?", (ident,))}

    # --- moves: which node owns a moving job's guest --------------------------------------------------------
    def begin_move(self, job: int, source: str, destination: str) -> int:
        """Record a move of *job* from *source* to *destination* (the job stays the source's); its epoch."""
        with self._atomic():
            (last,) = self.db.execute("SELECT COALESCE(MAX(epoch), 0) FROM moves WHERE job=?", (job,)).fetchone()
            self.db.execute(f"INSERT INTO moves ({_MOVE_COLUMNS}) VALUES (?, ?, ?, ?, 'prepare', NULL, ?, NULL, NULL, "
                            f"NULL, NULL)", (job, last + 1, source, destination, self._clock()))
        return int(last) + 1

    def hand_over(self, job: int, epoch: int, checkpoint: dict[str, Any] | None = None) -> bool:
        """The guest becomes the destination's, in one transaction with the move and with where its checkpoints
        go on from there (*checkpoint*, None: it takes none): whether it did (the move was being prepared and the
        job still ran on its source)."""
        with self._atomic():
            row = self.db.execute("SELECT source, destination FROM moves WHERE job=? AND epoch=? AND state='prepare'",
                                  (job, epoch)).fetchone()
            moved = row is not None and self.db.execute(
                "UPDATE jobs SET node=? WHERE id=? AND state='running' AND node=?", (row[1], job, row[0])).rowcount == 1
            if moved:
                self.db.execute("UPDATE moves SET state='go' WHERE job=? AND epoch=?", (job, epoch))
                if checkpoint is not None:
                    self.db.execute("INSERT OR REPLACE INTO move_checkpoints VALUES (?, ?, ?)",
                                    (job, epoch, msgpack.packb(checkpoint)))
        return moved

    def move_checkpoint(self, job: int, epoch: int) -> dict[str, Any] | None:
        """What :meth:`hand_over` recorded for an active move's checkpoints (None: nothing)."""
        row = self.db.execute("SELECT start FROM move_checkpoints WHERE job=? AND epoch=?", (job, epoch)).fetchone()
        return msgpack.unpackb(row[0]) if row is not None else None

    def end_move(self, job: int, epoch: int, state: str, reason: str | None = None) -> bool:
        """Close an active move as done or aborted; whether it was active."""
        assert state in ("done", "aborted")
        with self._atomic():
            self.db.execute("DELETE FROM move_checkpoints WHERE job=? AND epoch=?", (job, epoch))
            return self.db.execute("UPDATE moves SET state=?, reason=?, ended_at=? WHERE job=? AND epoch=? AND state "
                                   "IN ('prepare', 'go')", (state, reason, self._clock(), job, epoch)).rowcount == 1

    def move_figures(self, job: int, epoch: int, source: str, downtime_s: float | None, total_s: float,
                     sent: int) -> bool:
        """What a handed-over move cost, as its source measured it; whether there is such a move."""
        return self.db.execute("UPDATE moves SET downtime_s=?, total_s=?, bytes=? WHERE job=? AND epoch=? AND "
                               "source=? AND state IN ('go', 'done')",
                               (downtime_s, total_s, sent, job, epoch, source)).rowcount == 1

    def active_moves(self) -> list[Move]:
        return [Move(*row) for row in self.db.execute(
            f"SELECT {_MOVE_COLUMNS} FROM moves WHERE state IN ('prepare', 'go') ORDER BY job")]

    def moves(self, jobs: list[int]) -> dict[int, list[Move]]:
        """The moves of each of *jobs* (absent: none), oldest first."""
        found: dict[int, list[Move]] = {}
        for start in range(0, len(jobs), 500):
            part = jobs[start:start + 500]
            for row in self.db.execute(f"SELECT {_MOVE_COLUMNS} FROM moves WHERE job IN ({','.join('?' * len(part))}) "
                                       f"ORDER BY job, epoch", part):
                found.setdefault(row[0], []).append(Move(*row))
        return found

    # --- keys --------------------------------------------------------------------------------------------
    def add_key(self, name: str, role: str, public_key: str) -> None:
        self.add_keys([(name, role, public_key)])

    def add_keys(self, keys: list[tuple[str, str, str]]) -> None:
        """Enrol (name, role, public key) entries, all or none (one transaction: fast for thousands)."""
        with self._atomic():
            for name, role, public_key in keys:
                if role not in ROLES:
                    raise ConodeError(f"role must be one of {', '.join(ROLES)}")
                try:
                    self.db.execute("INSERT INTO keys VALUES (?, ?, ?, ?)", (name, role, public_key, self._clock()))
                except sqlite3.IntegrityError:
                    raise ConodeError(f"a key named {name!r} or with that public key is already enrolled") from None

    def remove_key(self, name: str) -> bool:
        return self.db.execute("DELETE FROM keys WHERE name=?", (name,)).rowcount > 0

    def keys(self) -> list[tuple[str, str, str, float]]:
        return self.db.execute("SELECT name, role, public_key, added_at FROM keys ORDER BY role, name").fetchall()

    def agent_count(self) -> int:
        """How many agent keys are enrolled."""
        return int(self.db.execute("SELECT COUNT(*) FROM keys WHERE role='agent'").fetchone()[0])

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the database (SQLite's data_version)."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def key_owner(self, public_key: str) -> tuple[str, str] | None:
        """(name, role) of an enrolled key."""
        return self.db.execute("SELECT name, role FROM keys WHERE public_key=?", (public_key,)).fetchone()

    # --- drained nodes -------------------------------------------------------------------------------------
    def set_drained(self, node: str, drained: bool) -> None:
        if drained:
            self.db.execute("INSERT OR IGNORE INTO drained VALUES (?)", (node,))
        else:
            self.db.execute("DELETE FROM drained WHERE node=?", (node,))

    def drained(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT node FROM drained")}

    # --- disk images ---------------------------------------------------------------------------------------
    def add_image(self, name: str, sha256: str, size: int, chunks: list[bytes], added_by: str) -> None:
        try:
            self.db.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                            (name, sha256, size, b"".join(chunks), added_by, self._clock()))
        except sqlite3.IntegrityError:
            raise ConodeError(f"an image named {name!r} exists; remove it first (`coordinator image rm {name}`)") \
                from None

    def image(self, name: str) -> Image | None:
        row = self.db.execute("SELECT * FROM images WHERE name=?", (name,)).fetchone()
        return _image(row) if row else None

    def images(self) -> list[Image]:
        return [_image(row) for row in self.db.execute("SELECT * FROM images ORDER BY name")]

    def remove_image(self, name: str) -> bool:
        return self.db.execute("DELETE FROM images WHERE name=?", (name,)).rowcount > 0

    def jobs_using_image(self, name: str) -> list[int]:
        """Jobs not yet ended (queued, running, vacated) whose guests boot from image *name*."""
        return [row[0] for row in self.db.execute(
            "SELECT id FROM jobs WHERE image=? AND state IN ('queued', 'held', 'running', 'vacated') AND gang IS NULL "
            "ORDER BY id", (name,))]
