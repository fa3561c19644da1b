"""`coordinator`: run the coordinator and manage the pool (status, jobs, keys, users)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from conode import shell
from conode.cluster.keys import generate_key_pair, is_valid_public_key
from conode.cli_guard import run_guarded
from conode.errors import ConodeError
from conode.limits import (DEFAULT_DISK_BUDGET_MIB, DEFAULT_GUEST_MEM_MIB, MAX_ARRAY_TASKS, MAX_DISK_BUDGET_MIB,
                           MAX_GUEST_MEM_MIB, MAX_JOB_GUESTS, MAX_JOB_PRIORITY, MAX_JOB_TIMEOUT_S, MIN_GUEST_MEM_MIB)
from conode.tomlfile import write_toml
from coordinator import render
from coordinator.config import (ADMIN_KEY_NAME, DEFAULT_BIND, PRIVATE_UMASK, SERVER_KEY_NAME, StateDir,
                                load_client_config, user_client_config_path)
from coordinator.store import JOB_STATES

EXIT_ERROR = 2
TERMINAL = ("done", "failed", "cancelled")
FOLLOW_POLL_S = 0.25  # how often a followed job's new output is asked for


def _guarded(fn: Callable[[], int | None]) -> NoReturn:
    """Run *fn*, turning conode errors into one clear line and a non-zero exit, never a traceback."""
    run_guarded(fn, "coordinator", EXIT_ERROR)


def _request_and_say(config_path: Path | None, endpoint: str | None, kind: str, **fields: Any) -> NoReturn:
    """Send one request the coordinator answers with ``ok``, print what it says it did, and exit."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            click.echo(client.request(kind, "ok", **fields).get("detail", "ok"))

    _guarded(body)


@click.group()
@click.version_option(package_name="conode")
def main() -> None:
    """The conode coordinator: knows the pool, queues and places jobs."""


state_dir_option = click.option("--state-dir", required=True, type=click.Path(path_type=Path),
                                 help="The coordinator's state directory.")


# --- running the coordinator ---------------------------------------------------------------------------------
@main.command()
@state_dir_option
@click.option("--bind", default=DEFAULT_BIND, show_default=True, help="Where `serve` listens by default.")
@click.option("--advertise", default=None, help="The endpoint clients connect to (default: the bind address).")
def init(state_dir: Path, bind: str, advertise: str | None) -> None:
    """Create a coordinator: key pair, database, an admin key and a client configuration."""

    def body() -> None:
        from coordinator.store import Store

        state = StateDir(state_dir)
        if state.database.exists():
            raise ConodeError(f"{state_dir} already holds a coordinator")
        os.umask(PRIVATE_UMASK)
        state.root.mkdir(parents=True, exist_ok=True)
        server = generate_key_pair(state.keys, SERVER_KEY_NAME)
        admin = generate_key_pair(state.keys, ADMIN_KEY_NAME)
        store = Store(state.database)
        store.add_key(ADMIN_KEY_NAME, "admin", admin.public)
        store.close()
        endpoint = advertise or bind.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
        write_toml(state.settings, {"bind": bind})
        client = {"endpoint": endpoint, "server_public_key": server.public,
                  "key_directory": str(state.keys.resolve()), "key_name": ADMIN_KEY_NAME}
        write_toml(state.client_config, client)
        state.make_private()
        user_config = user_client_config_path()
        if not user_config.exists():
            user_config.parent.mkdir(parents=True, exist_ok=True)
            write_toml(user_config, client)
        click.echo(f"coordinator created in {state_dir}")
        click.echo(f"  start it:          {shell.command('coordinator', 'serve', '--state-dir', state_dir)}")
        click.echo(f"  client config:     {state.client_config} (also {user_config})")
        click.echo(f"  coordinator key:   {server.public}")
        click.echo("to join an agent, run on the workstation (DIR: the agent's state directory):")
        click.echo("  conode agent init --state-dir DIR")
        click.echo("  " + shell.command("conode", "agent", "--state-dir", "DIR", "--coordinator", endpoint,
                                        "--coordinator-key", server.public))
        click.echo("and enrol the key it prints here:")
        click.echo("  " + shell.command("coordinator", "keys", "add", "--state-dir", state_dir, "--role", "agent",
                                        "--", "NODE-NAME", "AGENT-PUBLIC-KEY"))
        click.echo("to let a person submit jobs with a key of their own (with `serve` running):")
        click.echo("  coordinator user add NAME")

    _guarded(body)


@main.command()
@state_dir_option
@click.option("--bind", default=None, help="ZeroMQ endpoint to listen on, e.g. tcp://0.0.0.0:7700.")
@click.option("--metrics", default=None, metavar="ADDR",
              help="Serve Prometheus metrics on ADDR: PORT (on 127.0.0.1), HOST:PORT, or off (the default, or "
                   "metrics in coordinator.toml).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve(state_dir: Path, bind: str | None, metrics: str | None, log_level: str) -> None:
    """Run the coordinator until interrupted."""

    def body() -> None:
        from conode.logsetup import configure_logging
        from conode.metrics import parse_address, serve_metrics
        from coordinator.metrics import CoordinatorCollector
        from coordinator.server import Coordinator

        configure_logging(log_level)
        state = StateDir(state_dir)
        state.require()
        os.umask(PRIVATE_UMASK)
        _raise_open_file_limit()  # one socket per agent
        endpoint = bind or state.default_bind()
        metrics_at = parse_address(metrics or state.metrics())
        coordinator = Coordinator(state, endpoint, relay=state.conet_relay(endpoint))
        signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
        signal.signal(signal.SIGINT, lambda *_: coordinator.stop())
        try:
            exporter = serve_metrics(metrics_at, CoordinatorCollector(coordinator))
        except ConodeError:
            coordinator.close()
            raise
        try:
            coordinator.serve_forever()
        finally:
            if exporter is not None:
                exporter.close()

    _guarded(body)


def _raise_open_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@main.group()
def keys() -> None:
    """Enrolled agent and admin keys (run on the coordinator host; people get theirs from `user add`)."""


@keys.command("add", context_settings={"ignore_unknown_options": True})
@state_dir_option
@click.option("--role", type=click.Choice(["agent", "admin"]), required=True)
@click.argument("name")
@click.argument("public_key")
def keys_add(state_dir: Path, role: str, name: str, public_key: str) -> None:
    """Enrol PUBLIC_KEY as NAME (for an agent, NAME is its node name)."""

    def body() -> None:
        if not is_valid_public_key(public_key):
            raise ConodeError("that is not a CURVE public key (40 Z85 characters, as `conode agent init` prints)")
        store = _store(state_dir)
        store.add_key(name, role, public_key)
        click.echo(f"enrolled {role} {name}")

    _guarded(body)


@keys.command("list")
@state_dir_option
def keys_list(state_dir: Path) -> None:
    """List enrolled keys."""

    def body() -> None:
        rows = _store(state_dir).keys()
        _table(["NAME", "ROLE", "PUBLIC KEY", "ADDED"],
               [[name, role, key, render.stamp(added)]
                for name, role, key, added in rows])

    _guarded(body)


@keys.command("remove")
@state_dir_option
@click.argument("name")
def keys_remove(state_dir: Path, name: str) -> None:
    """Revoke the key enrolled as NAME (new connections with it are refused)."""

    def body() -> None:
        if not _store(state_dir).remove_key(name):
            raise ConodeError(f"no key named {name!r}")
        click.echo(f"removed {name}")

    _guarded(body)


def _store(state_dir: Path) -> Any:
    from coordinator.store import Store

    state = StateDir(state_dir)
    state.require()
    return Store(state.database)


# --- the admin client ----------------------------------------------------------------------------------------
client_options = [
    click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                 help="Client configuration (default: $CONODE_CLIENT_CONFIG or ~/.config/conode/client.toml)."),
    click.option("--coordinator", "endpoint", default=None, help="Coordinator endpoint, overriding the config."),
]


def with_options(options: list[Callable]) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def with_client(fn: Callable) -> Callable:
    return with_options(client_options)(fn)


def _client(config_path: Path | None, endpoint: str | None) -> Any:
    from coordinator.client import AdminClient

    return AdminClient(load_client_config(config_path, endpoint))


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _render_status(reply: dict[str, Any]) -> None:
    rows = []
    for n in reply["nodes"]:
        state = n["state"] + (" (drained)" if n["drained"] else "")
        jobs = ",".join(str(j) for j in n["jobs"]) or "-"
        load = n.get("owner_load")
        rows.append([n["name"], state, n["cores"], render.mib(n["mem_mib"]), render.speed(n["speed"]), jobs,
                     render.duration(n["idle_s"]), "-" if load is None else f"{load:.2f}"])
    now = time.time()
    for n in reply.get("down", []):
        rows.append([n["name"], f"down since {render.since(n['since'], now)}: {n['why']}", n["cores"],
                     render.mib(n["mem_mib"]), "-", "-", "-", "-"])
    _table(["NODE", "STATE", "CORES", "MEMORY", "SPEED", "JOBS", "IDLE", "OWNER LOAD"], rows)
    t = reply["totals"]
    jobs = t["jobs"]
    down = f" ({len(reply['down'])} down: `coordinator forget NODE` once gone for good)" if reply.get("down") else ""
    click.echo(f"\npool: {t['nodes']} nodes{down}, {t['cores']} cores ({t['idle_cores']} free), "
               f"{render.mib(t['mem_mib'])}; jobs: {jobs['queued']} queued, {jobs.get('held', 0)} held, "
               f"{jobs['running']} running, {jobs['vacated']} vacated, {jobs['done']} done, {jobs['failed']} failed, "
               f"{jobs['cancelled']} cancelled" + (f"; {t['moving']} moving" if t.get("moving") else ""))


@main.command()
@with_client
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=False, flag_value=2.0, default=None, type=float, metavar="[SECONDS]",
              help="Refresh in place every SECONDS (default 2) until interrupted.")
def status(config_path: Path | None, endpoint: str | None, as_json: bool, watch: float | None) -> None:
    """The pool's capacity: one row per node, then totals."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            while True:
                reply = client.request("status", "status_reply")
                if as_json:
                    click.echo(json.dumps({"nodes": reply["nodes"], "totals": reply["totals"],
                                           "down": reply.get("down", [])}))
                else:
                    if watch and sys.stdout.isatty():
                        click.echo("\x1b[H\x1b[2J", nl=False)
                    _render_status(reply)
                if not watch:
                    return
                time.sleep(watch)

    _guarded(body)


submit_options = [
    click.option("-f", "--file", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="A job description (TOML, see README); options given here add to it or override it."),
    click.option("--input", "inputs", multiple=True, type=click.Path(exists=True),
                 help="A file or directory to place in the job's directory, at the relative path given (an absolute "
                      "path or one leading outside: under its own name); modes are kept (repeatable)."),
    click.option("--output", "outputs", multiple=True,
                 help="A path or glob (relative to the job's directory) to bring back (repeatable)."),
    click.option("--mem", "mem_mib", type=int, default=None,
                 help=f"Guest memory the job needs, MiB (default {DEFAULT_GUEST_MEM_MIB}; {MIN_GUEST_MEM_MIB} to "
                      f"{MAX_GUEST_MEM_MIB})."),
    click.option("--guests", type=click.IntRange(1, MAX_JOB_GUESTS), default=None,
                 help="Run COMMAND in this many guests at once, joined by conet (rank i in $CONODE_RANK; default 1)."),
    click.option("--network", default=None, help="A shared conet network to join, by name (default: the job's own)."),
    click.option("--image", "image_name", default=None, metavar="NAME",
                 help="Boot the job's guests from this pool image (`coordinator image list`) as their root disk."),
    click.option("--disk-budget", "disk_mib", type=click.IntRange(1, MAX_DISK_BUDGET_MIB), default=None,
                 metavar="MiB", help=f"What each guest may write to its disk (default {DEFAULT_DISK_BUDGET_MIB})."),
    click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
                 help="An environment variable for the command (repeatable)."),
    click.option("--stdin", "stdin", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="A file the command reads as its standard input."),
    click.option("--timeout", "timeout_s", type=click.FloatRange(1, MAX_JOB_TIMEOUT_S), default=None,
                 metavar="SECONDS", help="The job's time limit: at it the job is killed and fails."),
    click.option("--priority", type=click.IntRange(-MAX_JOB_PRIORITY, MAX_JOB_PRIORITY), default=None,
                 help="Among your own queued jobs, higher runs first (default 0; the pool shares fairly between "
                      "people)."),
]
array_options = [
    click.option("--queue", "count", type=click.IntRange(1, MAX_ARRAY_TASKS), default=None, metavar="N",
                 help="An array of N jobs: $(index) and $(item) are 0 to N-1 in each."),
    click.option("--items", "items_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 default=None, metavar="FILE", help="An array: one job per line of FILE, that line as $(item)."),
]
command_argument = click.argument("command", nargs=-1, type=click.UNPROCESSED)
# Options come first; the command starts at the first word that is not one (or after --), so that its own
# options are never taken for ours, and an option of ours misspelt is refused, never run as the command.
COMMAND_SETTINGS = {"allow_interspersed_args": False}


def _description(options: dict[str, Any], command: tuple[str, ...]) -> Any:
    """The job described by the file (if any) and the command line's options, the latter winning."""
    from coordinator.jobfile import JobDescription, count_items, parse_env, read_description, read_items

    items = None
    if options.get("count") is not None and options.get("items_file") is not None:
        raise click.UsageError("--queue and --items both make an array: give one")
    if options.get("count") is not None:
        items = count_items(options["count"])
    elif options.get("items_file") is not None:
        items = read_items(options["items_file"])
    given = JobDescription(
        command=list(command), inputs=[(text, Path(text)) for text in options["inputs"]],
        outputs=list(options["outputs"]), env=parse_env(list(options["env"])), stdin=options["stdin"],
        mem_mib=options["mem_mib"], guests=options["guests"], time_limit_s=options["timeout_s"],
        image=options["image_name"], disk_mib=options["disk_mib"], network=options["network"], items=items,
        priority=options["priority"])
    base = read_description(options["job_file"]) if options["job_file"] is not None else JobDescription()
    return base.merged(given)


@main.command(context_settings=COMMAND_SETTINGS)
@with_client
@with_options(submit_options + array_options)
@command_argument
def submit(config_path: Path | None, endpoint: str | None, command: tuple[str, ...], **options: Any) -> None:
    """Queue COMMAND to run in a guest (or in several, --guests; or an array, --queue/--items or queue in -f's
    file); prints the job id, one per line for an array.

    Everything before COMMAND (or before --) is an option of submit's; COMMAND is run as given."""

    def body() -> None:
        fields = _description(options, command).message()
        with _client(config_path, endpoint) as client:
            reply = client.request("submit", "submitted", **fields)
        for job in reply.get("jobs", [reply["job"]]):
            click.echo(job)

    _guarded(body)


@main.command(context_settings=COMMAND_SETTINGS)
@with_client
@with_options(submit_options)
@command_argument
def run(config_path: Path | None, endpoint: str | None, command: tuple[str, ...], **options: Any) -> None:
    """Run COMMAND in the pool as if here: submit it (submit's options), show its stdout and stderr as they come
    and exit with its status (1 if it failed, 130 if cancelled; Ctrl-C cancels it)."""

    def body() -> int:
        description = _description(options, command)
        if description.items is not None:
            raise ConodeError("run takes one job; submit an array with `coordinator submit`")
        fields = description.message()
        with _client(config_path, endpoint) as client:
            job = client.request("submit", "submitted", **fields)["job"]
            if sys.stderr.isatty():
                click.echo(f"coordinator: job {job}", err=True)
            try:
                state = _follow(client, job, None)
            except KeyboardInterrupt:
                client.request("cancel", "ok", job=job)
                click.echo(f"coordinator: job {job} cancelled", err=True)
                return 130
        return _ended(state, job, None)

    _guarded(body)


def _follow(client: Any, job: int, rank: int | None) -> dict[str, Any]:
    """Write the job's stdout and stderr (of one rank, or of every rank under headers) as they are stored, until
    the job ends; return its final state. Each byte is written once: a job going on from a checkpoint has its
    stored output cut back to it and writes the rest again, which is skipped up to what was written already."""
    cursors: dict[int, int] = {}
    written: dict[tuple[int, str], int] = {}  # (rank, stream) -> bytes of it written so far
    shown: dict[str, int | None] = {"stdout": None, "stderr": None}  # the rank whose output each stream shows
    attempts = 0
    while True:
        state = client.request("job", "job_reply", job=job)["job"]
        if attempts and state["attempts"] > attempts:
            # Its output so far was of an attempt that did not finish: what follows starts from the beginning.
            click.echo(f"coordinator: job {job} runs again ({state['reason']})", err=True)
        attempts = state["attempts"]
        if state["guests"] > 1:
            ranks = [r["rank"] for r in state.get("ranks", []) if rank in (None, r["rank"])]
        else:
            ranks = [0]
        for each in ranks:
            while True:
                reply = client.request("logs", "logs_reply", job=job, after=cursors.get(each, 0),
                                       **({"rank": each} if state["guests"] > 1 else {}))
                cursors[each] = reply.get("cursor", 0)
                for name, out in (("stdout", sys.stdout), ("stderr", sys.stderr)):
                    data = _unwritten(reply, name, written, each)
                    if not data:
                        continue
                    if state["guests"] > 1 and rank is None and shown[name] != each:
                        out.buffer.write(f"==> rank {each} <==\n".encode())
                        shown[name] = each
                    out.buffer.write(data)
                    out.flush()
                if not reply.get("more"):
                    break
        if state["state"] in TERMINAL:
            return state
        time.sleep(FOLLOW_POLL_S)


def _unwritten(reply: dict[str, Any], stream: str, written: dict[tuple[int, str], int], rank: int) -> bytes:
    """The bytes of *stream* in a followed job's *reply* not written yet (and count them as written)."""
    data, at = reply[stream], reply.get(f"{stream}_at")
    if at is None:  # a coordinator that does not say where they begin
        return data
    if reply.get("restarted"):  # a new attempt from the beginning: all of it is new
        written[rank, stream] = 0
    done = written.get((rank, stream), 0)
    written[rank, stream] = max(done, at + len(data))
    return data[max(0, done - at):]


def _ended(state: dict[str, Any], job: int, rank: int | None) -> int:
    """The exit status of a job (or rank) that ended, said on stderr unless it is the command's own."""
    what = f"job {job}" if rank is None else f"job {job} rank {rank}"
    if state["state"] == "done":
        if state["reason"]:
            click.echo(f"coordinator: {what}: {state['reason']}", err=True)
        return int(state["exit_status"])
    click.echo(f"coordinator: {what} {state['state']}: {state['reason']}", err=True)
    return 1 if state["state"] == "failed" else 130


@main.command()
@with_client
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--state", "states", multiple=True, type=click.Choice(JOB_STATES),
              help="Only jobs in this state (repeatable).")
@click.option("--user", "owner", default=None, metavar="NAME", help="Only the jobs NAME submitted.")
def jobs(config_path: Path | None, endpoint: str | None, as_json: bool, limit: int, states: tuple[str, ...],
         owner: str | None) -> None:
    """Recent jobs, newest first: everyone's, with who submitted each (OWNER); a queued one says why it waits."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            reply = client.request("jobs", "jobs_reply", limit=limit, **({"states": list(states)} if states else {}),
                                   **({} if owner is None else {"user": owner}))
        if as_json:
            click.echo(json.dumps(reply["jobs"]))
            return
        now = time.time()
        rows = []
        for j in reply["jobs"]:
            end = j["finished_at"] or now
            runtime = render.duration(end - j["started_at"]) if j["started_at"] else "-"
            status_text = "-" if j["exit_status"] is None else j["exit_status"]
            where = j["node"] or (f"{j['guests']} guests" if j.get("guests", 1) > 1 else "-")
            state = _state_text(j)
            rows.append([j["id"], _owner_text(j), _array_text(j), state, where, status_text, runtime, j["attempts"],
                         render.moves(j), _command_text(j)])
        _table(["JOB", "OWNER", "ARRAY", "STATE", "NODE", "STATUS", "RUNTIME", "TRIES", "MOVES", "COMMAND"], rows)

    _guarded(body)


def _state_text(job: dict[str, Any]) -> str:
    """A job's state, and why it waits when that says more."""
    why = job.get("why")
    return f"{job['state']} ({why})" if why and why != job["state"] else job["state"]


def _owner_text(job: dict[str, Any]) -> str:
    return job.get("owner") or "-"


def _array_text(job: dict[str, Any]) -> str:
    return "-" if job.get("array") is None else f"{job['array']}[{job['task']}]"


def _command_text(job: dict[str, Any], width: int = 60) -> str:
    """The command as a shell would take it back, cut to *width*."""
    text = shell.command(*job["argv"]) + (" ..." if job.get("argv_truncated") else "")
    return text if len(text) <= width else text[:width - 3] + "..."


@main.command()
@with_client
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=int, default=50, show_default=True)
def history(config_path: Path | None, endpoint: str | None, as_json: bool, limit: int) -> None:
    """Finished jobs, the last to finish first: where they ran, their guests' CPU time, exit status and when."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            reply = client.request("jobs", "jobs_reply", limit=limit, history=True)
        if as_json:
            click.echo(json.dumps(reply["jobs"]))
            return
        rows = []
        for j in reply["jobs"]:
            where = ",".join(j.get("nodes") or []) or j["node"] or "-"
            status_text = "-" if j["exit_status"] is None else j["exit_status"]
            finished = _stamp(j["finished_at"])
            rows.append([j["id"], _owner_text(j), j["state"], where, status_text, render.duration(j.get("cpu_s")),
                         finished, _command_text(j, 50)])
        _table(["JOB", "OWNER", "STATE", "NODE", "STATUS", "CPU", "FINISHED", "COMMAND"], rows)

    _guarded(body)


@main.command()
@with_client
@click.argument("job", type=int)
@click.option("--json", "as_json", is_flag=True)
def job(config_path: Path | None, endpoint: str | None, job: int, as_json: bool) -> None:
    """One job in full: its command, where it stands (and why it waits), its limits and its ranks."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            state = client.request("job", "job_reply", job=job)["job"]
        if as_json:
            click.echo(json.dumps(state))
            return
        lines = [("job", state["id"]), ("state", _state_text(state)),
                 ("command", shell.command(*state["argv"])), ("array", _array_text(state)),
                 ("node", state["node"] or "-"), ("memory", render.mib(state["mem_mib"])),
                 ("guests", state["guests"]), ("image", state.get("image") or "-"),
                 ("time limit", f"{state['timeout_s']:g} s" if state.get("timeout_s") else "-"),
                 ("environment", " ".join(f"{k}={shell.command(v)}" for k, v in state.get("env", {}).items()) or "-"),
                 ("submitted", _stamp(state["submitted_at"])), ("started", _stamp(state["started_at"])),
                 ("finished", _stamp(state["finished_at"])),
                 ("exit status", "-" if state["exit_status"] is None else state["exit_status"]),
                 ("cpu time", render.duration(state.get("cpu_s"))), ("tries", state["attempts"]),
                 ("reason", state["reason"] or "-")]
        for name, value in lines:
            click.echo(f"{name + ':':13}{value}")
        for r in state.get("ranks", []):
            click.echo(f"rank {r['rank']}:      {r['state']} on {r['node'] or '-'}, status "
                       f"{'-' if r['exit_status'] is None else r['exit_status']}")

    _guarded(body)


def _stamp(wall: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall)) if wall else "-"


array_option = click.option("--array", "whole_array", is_flag=True,
                            help="Every job of the array JOB belongs to (JOB may be any of its tasks).")


def _job_command(kind: str, doc: str) -> None:
    """A command that changes one job, or with --array every job of its array: cancel, hold, release."""

    @main.command(kind, help=doc)
    @with_client
    @click.argument("job", type=int)
    @array_option
    def command(config_path: Path | None, endpoint: str | None, job: int, whole_array: bool) -> None:
        _request_and_say(config_path, endpoint, kind, job=job, **({"array": True} if whole_array else {}))


_job_command("cancel", "Cancel queued or running JOB.")
_job_command("hold", "Keep queued JOB from being placed until released.")
_job_command("release", "Let held JOB be placed again.")


@main.command()
@with_client
@click.argument("job", type=int)
@click.option("--rank", type=click.IntRange(0, MAX_JOB_GUESTS - 1), default=None,
              help="Only this guest of a job of several (default: all, each under a header).")
@click.option("-f", "--follow", is_flag=True, help="Keep showing output as it comes, until the job ends.")
def logs(config_path: Path | None, endpoint: str | None, job: int, rank: int | None, follow: bool) -> None:
    """The job's stdout (to stdout) and stderr (to stderr) so far, or as it comes (-f)."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            if follow:
                _follow(client, job, rank)
                return
            reply = client.request("logs", "logs_reply", job=job, **_rank(rank))
        sys.stdout.buffer.write(reply["stdout"])
        sys.stdout.flush()
        sys.stderr.buffer.write(reply["stderr"])
        sys.stderr.flush()

    _guarded(body)


def _rank(rank: int | None) -> dict[str, int]:
    return {} if rank is None else {"rank": rank}


@main.command()
@with_client
@click.argument("job", type=int)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--rank", type=click.IntRange(0, MAX_JOB_GUESTS - 1), default=None,
              help="Wait for this guest only, and exit with its status (default: the whole job).")
def wait(config_path: Path | None, endpoint: str | None, job: int, timeout: float | None, rank: int | None) -> None:
    """Wait for JOB (or one rank of it) to finish; exit with its status (1 if it failed, 130 if cancelled)."""

    def body() -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with _client(config_path, endpoint) as client:
            while True:
                state = client.request("job", "job_reply", job=job)["job"]
                settled = _settled(state, job, rank)
                if settled is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    what = f"job {job}" if rank is None else f"rank {rank} of job {job}"
                    raise ConodeError(f"{what} is still {state['state']} after {timeout:g} s")
                time.sleep(0.25)
        return _ended(settled, job, None if settled is state else rank)

    _guarded(body)


def _settled(state: dict[str, Any], job: int, rank: int | None) -> dict[str, Any] | None:
    """What `wait` waited for, once it has ended: the job, or its rank *rank* (its record in the job's); None
    while it runs. A rank cancelled because its gang starts again is not an end: the gang's next attempt is."""
    if rank is None or state["guests"] == 1:
        if rank not in (None, 0):
            raise ConodeError(f"job {job} has no rank {rank}: it has one guest")
        return state if state["state"] in TERMINAL else None
    if rank >= state["guests"]:
        raise ConodeError(f"job {job} has no rank {rank}: it has {state['guests']} guests")
    record = next((r for r in state.get("ranks", []) if r["rank"] == rank), None)
    if record is not None and record["state"] in TERMINAL and state["state"] != "queued":
        return record
    return state if state["state"] in TERMINAL else None


@main.command()
@with_client
@click.argument("job", type=int)
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rank", type=click.IntRange(0, MAX_JOB_GUESTS - 1), default=None,
              help="Only this guest's files (default: every guest's, under rankN/).")
def fetch(config_path: Path | None, endpoint: str | None, job: int, directory: Path, rank: int | None) -> None:
    """Write JOB's output files into DIRECTORY."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            reply = client.request("fetch", "fetch_reply", job=job, **_rank(rank))
        from coordinator.outputs import write_outputs

        for target, size in write_outputs(directory, reply["outputs"]):
            click.echo(f"{target} ({size} bytes)")
        if not reply["outputs"]:
            click.echo(f"job {job} has no output files", err=True)

    _guarded(body)


# --- users ---------------------------------------------------------------------------------------------------
@main.group()
def user() -> None:
    """The people who submit jobs with keys of their own (admins only): they see every job and change their own."""


@user.command("add")
@with_client
@click.argument("name")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the person's client configuration (default: NAME.toml here).")
def user_add(config_path: Path | None, endpoint: str | None, name: str, out_path: Path | None) -> None:
    """Add user NAME: a new key pair, enrolled, and a client configuration to hand to the person."""

    def body() -> None:
        from conode.cluster.keys import new_key_pair
        from coordinator.config import write_user_client_config
        from coordinator.users import check_user_name

        problem = check_user_name(name)
        if problem:
            raise ConodeError(problem)
        from coordinator.client import AdminClient

        config = load_client_config(config_path, endpoint)
        target = out_path or Path(f"{name}.toml")
        pair = new_key_pair()  # its secret half is written once, into the person's file, and nowhere else
        write_user_client_config(target, config.endpoint, config.server_public_key, pair)
        try:
            with AdminClient(config) as client:
                client.request("user_add", "ok", name=name, public_key=pair.public)
        except BaseException:
            target.unlink(missing_ok=True)  # not enrolled: the file would open nothing
            raise
        click.echo(f"user {name} added; their client configuration is {target} (it holds their secret key: hand it "
                   f"over privately)")
        click.echo(f"{name} saves it as ~/.config/conode/client.toml (or anywhere, named by --config or "
                   f"CONODE_CLIENT_CONFIG) and runs, for example:")
        click.echo("  " + shell.command("coordinator", "submit", "--config", target.name, "--", "echo", "hello"))

    _guarded(body)


@user.command("list")
@with_client
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def user_list(config_path: Path | None, endpoint: str | None, as_json: bool) -> None:
    """The pool's users: when each was added, and their jobs queued and running now."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            users = client.request("users", "users_reply")["users"]
        if as_json:
            click.echo(json.dumps(users))
            return
        _table(["USER", "QUEUED", "RUNNING", "ADDED", "PUBLIC KEY"],
               [[u["name"], u["queued"], u["running"], render.stamp(u["added_at"]),
                 u["public_key"]] for u in users])

    _guarded(body)


@user.command("rm")
@with_client
@click.argument("name")
def user_rm(config_path: Path | None, endpoint: str | None, name: str) -> None:
    """Remove user NAME: their key is refused from now on (their jobs stay as they are)."""

    _request_and_say(config_path, endpoint, "user_rm", name=name)


# --- disk images ---------------------------------------------------------------------------------------------
@main.group()
def image() -> None:
    """The pool's disk images: jobs boot from them with `submit --image NAME`."""


@image.command("add")
@with_client
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def image_add(config_path: Path | None, endpoint: str | None, name: str, file: Path) -> None:
    """Add FILE (a raw disk image) to the pool as NAME; only the chunks the coordinator lacks are sent."""

    def body() -> None:
        from coordinator.images import check_image_name
        from coordinator.uploads import upload_image

        problem = check_image_name(name)
        if problem:
            raise ConodeError(problem)
        with _client(config_path, endpoint) as client:
            click.echo(upload_image(client, name, file, _progress_line))

    _guarded(body)


def _progress_line(text: str, final: bool = False) -> None:
    """A progress line on stderr: rewritten in place on a terminal, else printed when final."""
    if sys.stderr.isatty():
        click.echo(f"\r{text}\x1b[K", nl=final, err=True)
    elif final:
        click.echo(text, err=True)


@image.command("list")
@with_client
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def image_list(config_path: Path | None, endpoint: str | None, as_json: bool) -> None:
    """The pool's images: name, size, SHA-256 and the jobs not yet ended that use each."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            images = client.request("image_list", "image_list_reply")["images"]
        if as_json:
            click.echo(json.dumps(images))
            return
        _table(["IMAGE", "SIZE", "CHUNKS", "SHA256", "JOBS"],
               [[i["name"], render.size(i["size"]), i["chunks"], i["sha256"][:16],
                 ",".join(map(str, i["jobs"])) or "-"] for i in images])

    _guarded(body)


@image.command("rm")
@with_client
@click.argument("name")
def image_rm(config_path: Path | None, endpoint: str | None, name: str) -> None:
    """Remove image NAME (refused while a job not yet ended uses it); its chunks no other image uses go too."""

    _request_and_say(config_path, endpoint, "image_rm", name=name)


@main.command()
@with_client
@click.argument("node")
@click.option("--undo", is_flag=True, help="Let the node take jobs again.")
@click.option("--migrate", "move", is_flag=True, help="Also move its running jobs' guests to other nodes now.")
def drain(config_path: Path | None, endpoint: str | None, node: str, undo: bool, move: bool) -> None:
    """Stop placing new jobs on NODE (running jobs finish there, or move away with --migrate)."""

    def body() -> None:
        if move and undo:
            raise click.UsageError("--migrate moves jobs off a node being drained; it does not go with --undo")
        with _client(config_path, endpoint) as client:
            extra = {"migrate": True} if move else {}
            click.echo(client.request("drain", "ok", node=node, undrain=undo, **extra).get("detail", "ok"))

    _guarded(body)


@main.command()
@with_client
@click.argument("job", type=int)
@click.option("--to", "to", default=None, metavar="NODE", help="The node to move to (default: the coordinator "
              "picks an idle one).")
def migrate(config_path: Path | None, endpoint: str | None, job: int, to: str | None) -> None:
    """Move running JOB's guest to another node while it runs; its output goes on from there."""

    _request_and_say(config_path, endpoint, "migrate", job=job, **({"to": to} if to else {}))



@main.command()
@with_client
@click.argument("node")
def forget(config_path: Path | None, endpoint: str | None, node: str) -> None:
    """Stop showing down NODE in `status` (it appears again if its agent comes back)."""

    _request_and_say(config_path, endpoint, "forget", node=node)


if __name__ == "__main__":
    main()
