# SPDX-License-Identifier: GPL-2.0-or-later
"""Users end to end, through the real CLI against a real coordinator and a real agent booting real guests: an
admin adds researchers, each submits with the client configuration handed to them and sees every job with its
OWNER, a user cannot cancel or hold another's job nor do what is for admins, an admin can, and the pool shares its
slot fairly between the people waiting for it.

The tests share one pool (one agent, one slot) and run in order.
"""

from __future__ import annotations

import shlex
import stat
import time
from pathlib import Path

import pytest
from pool import Pool
from test_coordinator_cli_limits import one_error_line

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pool = Pool(tmp_path_factory.mktemp("users"))
    pool.start_coordinator()
    pool.add_agent("node-a")
    try:
        pool.wait_until("a ready node", lambda: pool.ready_nodes() == ["node-a"], timeout=180)
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def people(pool: Pool) -> dict[str, Path]:
    """alice and bob, added by the admin: the client configuration of each."""
    configs = {}
    for name in ("alice", "bob"):
        target = pool.root / f"{name}.toml"
        done = pool.cli("user", "add", name, "--out", str(target))
        printed = done.stdout.decode()
        assert f"user {name} added" in printed and str(target) in printed
        command = shlex.split(printed.splitlines()[-1])  # what the person runs, quoted for a shell
        assert command == ["coordinator", "submit", "--config", f"{name}.toml", "--", "echo", "hello"]
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        configs[name] = target
    return configs


def as_user(pool: Pool, config: Path, command: str, *args: str, check: bool = True):
    """`coordinator COMMAND ARGS` as the person whose client configuration is *config* (not the admin's)."""
    return pool.cli(*command.split(), "--config", str(config), *args, check=check)


def table(done) -> list[dict[str, str]]:
    """A CLI table's rows as {HEADER: cell} (cells without spaces, as the jobs table's first columns are)."""
    lines = done.stdout.decode().splitlines()
    headers = lines[0].split()
    return [dict(zip(headers, line.split())) for line in lines[1:]]


def test_users_are_added_and_listed(pool, people):
    rows = {row["USER"]: row for row in table(pool.cli("user", "list"))}
    assert set(rows) == {"alice", "bob"} and rows["alice"]["QUEUED"] == "0"
    assert "already enrolled" in one_error_line(pool.cli("user", "add", "alice", "--out",
                                                         str(pool.root / "again.toml"), check=False))
    assert not (pool.root / "again.toml").exists()  # refused: no file with a key nobody enrolled


def test_a_user_submits_and_everyone_sees_the_owner(pool, people):
    job = int(as_user(pool, people["alice"], "submit", "--", "sh", "-c", "echo from-alice").stdout)
    assert as_user(pool, people["alice"], "wait", str(job), "--timeout", "120", check=False).returncode == 0
    assert as_user(pool, people["alice"], "logs", str(job)).stdout == b"from-alice\n"
    rows = {row["JOB"]: row for row in table(as_user(pool, people["bob"], "jobs"))}
    assert rows[str(job)]["OWNER"] == "alice" and rows[str(job)]["STATE"] == "done"
    assert pool.jobs()[job]["owner"] == "alice"
    assert [row["JOB"] for row in table(pool.cli("jobs", "--user", "alice"))] == [str(job)]
    assert table(pool.cli("jobs", "--user", "bob")) == []


def test_only_the_owner_or_an_admin_cancels(pool, people):
    job = int(as_user(pool, people["alice"], "submit", "--", "sh", "-c", "sleep 60").stdout)
    pool.wait_until("alice's job to run", lambda: pool.jobs()[job]["state"] == "running", timeout=60)
    refused = one_error_line(as_user(pool, people["bob"], "cancel", str(job), check=False))
    assert refused == (f"coordinator: error: job {job} belongs to alice; bob may cancel only their own jobs (an "
                       f"admin may cancel any)")
    refused = one_error_line(as_user(pool, people["bob"], "hold", str(job), check=False))
    assert refused.endswith(f"job {job} belongs to alice; bob may hold only their own jobs (an admin may hold any)")
    assert pool.jobs()[job]["state"] == "running"
    assert pool.cli("cancel", str(job)).stdout.decode().strip() == f"job {job} cancelled"
    assert pool.jobs()[job]["state"] == "cancelled"
    mine = int(as_user(pool, people["bob"], "submit", "--", "sh", "-c", "sleep 60").stdout)
    assert as_user(pool, people["bob"], "cancel", str(mine)).returncode == 0
    pool.wait_until("the slot to be free", lambda: pool.status()["totals"]["idle_cores"] == 1, timeout=60)


def test_a_user_cannot_do_what_is_for_admins(pool, people):
    for args in [("drain", "node-a"), ("forget", "node-a"), ("user rm", "alice"), ("user list",)]:
        refused = one_error_line(as_user(pool, people["bob"], *args, check=False))
        assert refused == (f"coordinator: error: `coordinator {args[0]}` is for the pool's admins; bob is a user's "
                           f"key (ask an admin)")
    disk = pool.root / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    done = as_user(pool, people["bob"], "image add", "mine", str(disk), check=False)
    assert done.returncode == 2 and done.stderr.decode().splitlines()[-1] == (
        "coordinator: error: `coordinator image add` is for the pool's admins; bob is a user's key (ask an admin)")
    assert not pool.status()["nodes"][0]["drained"] and pool.cli("image", "list", "--json").stdout == b"[]\n"
    # `user add` asks the coordinator before anything is kept: bob's attempt leaves no file behind
    target = pool.root / "mallory.toml"
    assert "`coordinator user add` is for the pool's admins" in one_error_line(
        as_user(pool, people["bob"], "user add", "mallory", "--out", str(target), check=False))
    assert not target.exists()


def test_the_slot_is_shared_fairly_between_people(pool, people):
    """One slot: while the admin's job runs, alice queues two jobs and then bob one. When the slot frees, alice's
    first goes (the oldest), then bob's, before alice's second: bob does not wait behind all of alice's."""
    blocker = int(pool.cli("submit", "--", "sh", "-c", "sleep 12").stdout)
    pool.wait_until("the admin's job to run", lambda: pool.jobs()[blocker]["state"] == "running", timeout=60)
    alice = [int(as_user(pool, people["alice"], "submit", "--", "echo", f"a{i}").stdout) for i in range(2)]
    bob = int(as_user(pool, people["bob"], "submit", "--", "echo", "b").stdout)
    assert pool.jobs()[blocker]["state"] == "running", "this machine took over 12 s for three submissions"
    for job in (blocker, *alice, bob):
        assert pool.cli("wait", str(job), "--timeout", "180", check=False, timeout=200).returncode == 0
    jobs = pool.jobs()
    started = sorted((blocker, *alice, bob), key=lambda j: jobs[j]["started_at"])
    assert started == [blocker, alice[0], bob, alice[1]], {j: jobs[j]["started_at"] for j in started}


def test_a_removed_user_is_refused(pool, people):
    assert pool.cli("user", "rm", "bob").stdout.decode().strip() == "user bob removed; their jobs stay as they are"
    deadline = time.monotonic() + 10
    while True:  # the refusal is immediate for new connections; allow a loaded machine its slowness
        done = as_user(pool, people["bob"], "jobs", check=False)
        if done.returncode != 0 or time.monotonic() > deadline:
            break
    assert "refused this client's key" in one_error_line(done)
    assert as_user(pool, people["alice"], "jobs").returncode == 0
