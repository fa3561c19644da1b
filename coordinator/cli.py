"""`coordinator`: run the coordinator and manage the pool (status, jobs, keys)."""

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
from conode.limits import (DEFAULT_DISK_BUDGET_MIB, DEFAULT_GUEST_MEM_MIB, MAX_DISK_BUDGET_MIB, MAX_JOB_GUESTS,
                           MAX_JOB_INPUT_BYTES)
from conode.tomlfile import write_toml
from coordinator import render
from coordinator.config import (ADMIN_KEY_NAME, DEFAULT_BIND, PRIVATE_UMASK, SERVER_KEY_NAME, StateDir,
                                load_client_config, user_client_config_path)

EXIT_ERROR = 2
TERMINAL = ("done", "failed", "cancelled")


def _guarded(fn: Callable[[], int | None]) -> NoReturn:
    """Run *fn*, turning conode errors into one clear line and a non-zero exit, never a traceback."""
    run_guarded(fn, "coordinator", EXIT_ERROR)


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

    _guarded(body)


@main.command()
@state_dir_option
@click.option("--bind", default=None, help="ZeroMQ endpoint to listen on, e.g. tcp://0.0.0.0:7700.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve(state_dir: Path, bind: str | None, log_level: str) -> None:
    """Run the coordinator until interrupted."""

    def body() -> None:
        from conode.logsetup import configure_logging
        from coordinator.server import Coordinator

        configure_logging(log_level)
        state = StateDir(state_dir)
        state.require()
        os.umask(PRIVATE_UMASK)
        _raise_open_file_limit()  # one socket per agent
        endpoint = bind or state.default_bind()
        coordinator = Coordinator(state, endpoint, relay=state.conet_relay(endpoint))
        signal.signal(signal.SIGTERM, lambda *_: coordinator.stop())
        signal.signal(signal.SIGINT, lambda *_: coordinator.stop())
        coordinator.serve_forever()

    _guarded(body)


def _raise_open_file_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@main.group()
def keys() -> None:
    """Enrolled agent and admin keys (run on the coordinator host)."""


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
               [[name, role, key, time.strftime("%Y-%m-%d %H:%M", time.localtime(added))]
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


def with_client(fn: Callable) -> Callable:
    for option in reversed(client_options):
        fn = option(fn)
    return fn


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
        rows.append([n["name"], state, n["cores"], render.mib(n["mem_mib"]), render.speed(n["speed"]), jobs,
                     render.duration(n["idle_s"])])
    now = time.time()
    for n in reply.get("down", []):
        rows.append([n["name"], f"down since {render.since(n['since'], now)}: {n['why']}", n["cores"],
                     render.mib(n["mem_mib"]), "-", "-", "-"])
    _table(["NODE", "STATE", "CORES", "MEMORY", "SPEED", "JOBS", "IDLE"], rows)
    t = reply["totals"]
    jobs = t["jobs"]
    down = f" ({len(reply['down'])} down: `coordinator forget NODE` once gone for good)" if reply.get("down") else ""
    click.echo(f"\npool: {t['nodes']} nodes{down}, {t['cores']} cores ({t['idle_cores']} free), "
               f"{render.mib(t['mem_mib'])}; jobs: {jobs['queued']} queued, {jobs['running']} running, "
               f"{jobs['vacated']} vacated, {jobs['done']} done, {jobs['failed']} failed, "
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


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@with_client
@click.option("--input", "inputs", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file to place in the job's working directory (repeatable).")
@click.option("--output", "outputs", multiple=True, help="A path (relative to the job's directory) to bring back.")
@click.option("--mem", "mem_mib", type=int, default=DEFAULT_GUEST_MEM_MIB, show_default=True, help="Guest memory the job needs (MiB).")
@click.option("--guests", type=click.IntRange(1, MAX_JOB_GUESTS), default=1, show_default=True,
              help="Run COMMAND in this many guests at once, joined by conet (rank i in $CONODE_RANK).")
@click.option("--network", default=None, help="A shared conet network to join, by name (default: the job's own).")
@click.option("--image", "image_name", default=None, metavar="NAME",
              help="Boot the job's guests from this pool image (`coordinator image list`) as their root disk.")
@click.option("--disk-budget", "disk_mib", type=click.IntRange(1, MAX_DISK_BUDGET_MIB), default=None, metavar="MiB",
              help=f"What each guest may write to its disk (default {DEFAULT_DISK_BUDGET_MIB}).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def submit(config_path: Path | None, endpoint: str | None, inputs: tuple[Path, ...], outputs: tuple[str, ...],
           mem_mib: int, guests: int, network: str | None, image_name: str | None, disk_mib: int | None,
           command: tuple[str, ...]) -> None:
    """Queue COMMAND to run in a guest (or in several, --guests); prints the job id."""

    def body() -> None:
        if disk_mib is not None and image_name is None:
            raise click.UsageError("--disk-budget is for a job on an image: give --image NAME too")
        total = sum(path.stat().st_size for path in inputs)
        if total > MAX_JOB_INPUT_BYTES:
            raise ConodeError(f"the input files take {total} bytes; a job's inputs may take at most "
                              f"{MAX_JOB_INPUT_BYTES}")
        files = {path.name: path.read_bytes() for path in inputs}
        with _client(config_path, endpoint) as client:
            extra: dict[str, Any] = {"network": network} if network else {}
            if image_name is not None:
                extra["image"] = image_name
            if disk_mib is not None:
                extra["disk_mib"] = disk_mib
            reply = client.request("submit", "submitted", argv=list(command), inputs=files, outputs=list(outputs),
                                   mem_mib=mem_mib, guests=guests, **extra)
        click.echo(reply["job"])

    _guarded(body)


@main.command()
@with_client
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=int, default=50, show_default=True)
def jobs(config_path: Path | None, endpoint: str | None, as_json: bool, limit: int) -> None:
    """Recent jobs, newest first."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            reply = client.request("jobs", "jobs_reply", limit=limit)
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
            rows.append([j["id"], j["state"], where, status_text, runtime, j["attempts"], render.moves(j),
                         " ".join(j["argv"])[:60]])
        _table(["JOB", "STATE", "NODE", "STATUS", "RUNTIME", "TRIES", "MOVES", "COMMAND"], rows)

    _guarded(body)


@main.command()
@with_client
@click.argument("job", type=int)
@click.option("--rank", type=click.IntRange(0, MAX_JOB_GUESTS - 1), default=None,
              help="Only this guest of a job of several (default: all, each under a header).")
def logs(config_path: Path | None, endpoint: str | None, job: int, rank: int | None) -> None:
    """The job's stdout (to stdout) and stderr (to stderr) so far."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
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
        what = f"job {job}" if settled is state else f"job {job} rank {rank}"
        if settled["state"] == "done":
            if settled["reason"]:
                click.echo(f"coordinator: {what}: {settled['reason']}", err=True)
            return int(settled["exit_status"])
        click.echo(f"coordinator: {what} {settled['state']}: {settled['reason']}", err=True)
        return 1 if settled["state"] == "failed" else 130

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

    def body() -> None:
        with _client(config_path, endpoint) as client:
            click.echo(client.request("image_rm", "ok", name=name).get("detail", "ok"))

    _guarded(body)


@main.command()
@with_client
@click.argument("job", type=int)
def cancel(config_path: Path | None, endpoint: str | None, job: int) -> None:
    """Cancel a queued or running job."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            click.echo(client.request("cancel", "ok", job=job).get("detail", "ok"))

    _guarded(body)


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

    def body() -> None:
        with _client(config_path, endpoint) as client:
            extra = {"to": to} if to else {}
            click.echo(client.request("migrate", "ok", job=job, **extra).get("detail", "ok"))

    _guarded(body)



@main.command()
@with_client
@click.argument("node")
def forget(config_path: Path | None, endpoint: str | None, node: str) -> None:
    """Stop showing down NODE in `status` (it appears again if its agent comes back)."""

    def body() -> None:
        with _client(config_path, endpoint) as client:
            click.echo(client.request("forget", "ok", node=node).get("detail", "ok"))

    _guarded(body)


if __name__ == "__main__":
    main()
