"""The `conode` command line: the cooperative machine (`conode vm ...`) and engine information."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NoReturn

import click

from conode import shell
from conode.cli_guard import run_guarded
from conode.errors import ConodeError
from conode.limits import DEFAULT_DISK_BUDGET_MIB
from conode.vm import layout

if TYPE_CHECKING:
    from conode.vm.machine import MachineConfig

EXIT_CONODE_ERROR = 125  # like `docker run`: 125 = the tool failed, otherwise the command's own status


def _progress(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda line: None
    return lambda line: click.echo(f"conode: {line}", err=True)


def _guarded(fn: Callable[[], int | None]) -> NoReturn:
    """Run *fn*, turning conode errors into one clear line and a non-zero exit, never a traceback."""
    run_guarded(fn, "conode", EXIT_CONODE_ERROR)


@click.group()
@click.version_option(package_name="conode")
def main() -> None:
    """conode: idle workstations as a compute pool of cooperative Linux guests."""


@main.group()
def vm() -> None:
    """The cooperative machine: a real Linux i386 guest on an emulated CPU."""


_image_options = [
    click.option("--mem", "mem_mib", type=int, default=layout.DEFAULT_RAM_MIB, show_default=True,
                 help="Guest memory in MiB."),
    click.option("--kernel", type=click.Path(path_type=Path), default=None,
                 help="Guest kernel (bzImage) instead of the packaged one."),
    click.option("--initrd", type=click.Path(path_type=Path), default=None,
                 help="Guest initramfs instead of the packaged one."),
    click.option("--append", default="", metavar="TEXT",
                 help="Text added to the guest kernel's command line."),
]

_disk_options = [
    click.option("--disk", "disk", type=click.Path(path_type=Path), default=None, metavar="IMAGE",
                 help="A raw disk image for the guest, as /dev/vda; it is never written (see --disk-overlay)."),
    click.option("--disk-overlay", type=click.Path(path_type=Path), default=None, metavar="FILE",
                 help="Keep the guest's disk changes in FILE (reused if it exists); default: a temporary file."),
    click.option("--disk-budget", "disk_budget", type=int, default=DEFAULT_DISK_BUDGET_MIB, show_default=True,
                 metavar="MiB", help="What the guest may write to its disk; writes beyond fail (EIO)."),
    click.option("--disk-ro", is_flag=True, help="Give the guest the disk read-only."),
    click.option("--disk-root", is_flag=True,
                 help="The disk holds the guest's root file system: the guest switches to it at boot "
                      "(jobs run there; the initramfs stays the fallback)."),
]


def _with_image_options(fn: Callable) -> Callable:
    for option in reversed(_image_options + _disk_options):
        fn = option(fn)
    return fn


def _machine_config(mem_mib: int, append: str, disk: Path | None, disk_overlay: Path | None, disk_budget: int,
                    disk_ro: bool, disk_root: bool) -> "MachineConfig":
    from conode.vm.disk.config import DiskConfig
    from conode.vm.machine import MachineConfig

    if disk is None and (disk_overlay is not None or disk_ro or disk_root):
        raise click.UsageError("--disk-overlay, --disk-ro and --disk-root need --disk")
    disk_config = None if disk is None else DiskConfig(disk, disk_overlay, disk_budget, disk_ro, disk_root)
    return MachineConfig(mem_mib=mem_mib, cmdline_extra=append, disk=disk_config)


@vm.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_with_image_options
@click.option("--snapshot-after", type=float, default=None, metavar="SECONDS",
              help="Stop this many seconds (guest time) after the command started and write a snapshot "
                   "(needs --snapshot-to).")
@click.option("--snapshot-to", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Where --snapshot-after writes the snapshot.")
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="Give up if the command has not finished after this many seconds.")
@click.option("--cwd", default="/", show_default=True, help="Working directory in the guest.")
@click.option("-v", "--verbose", is_flag=True, help="Show the guest kernel's boot messages on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(mem_mib: int, kernel: Path | None, initrd: Path | None, append: str, disk: Path | None,
        disk_overlay: Path | None, disk_budget: int, disk_ro: bool, disk_root: bool, snapshot_after: float | None,
        snapshot_to: Path | None, timeout: float | None, cwd: str, verbose: bool, quiet: bool,
        command: tuple[str, ...]) -> None:
    """Boot the guest, run COMMAND in it, stream its output, exit with its status.

    \b
    Example:  conode vm run -- sh -c 'echo $((6*7)); exit 3'
              conode vm run --disk root.img -- sh -c 'mount /dev/vda /mnt && ls /mnt'
              conode vm run --disk debian.img --disk-root -- python3 -c 'print(6*7)'
    """
    if (snapshot_after is None) != (snapshot_to is None):
        raise click.UsageError("--snapshot-after and --snapshot-to go together")

    def body() -> int:
        from conode.vm.guest_image import load_guest_image
        from conode.vm.session import GuestSession

        image = load_guest_image(kernel, initrd)
        console = (lambda data: (sys.stderr.buffer.write(data), sys.stderr.buffer.flush())) if verbose else None
        config = _machine_config(mem_mib, append, disk, disk_overlay, disk_budget, disk_ro, disk_root)
        session = GuestSession.boot(image, config, sys.stdout.buffer,
                                    sys.stderr.buffer, _progress(quiet), verbose, console)
        session.start(list(command), cwd)
        try:
            return session.run(snapshot_after, snapshot_to, timeout)
        finally:
            session.machine.close()  # a named disk overlay keeps its map for the next run

    _guarded(body)


@vm.command()
@click.argument("snapshot", type=click.Path(path_type=Path))
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="Give up if the command has not finished after this many seconds.")
@click.option("--disk", type=click.Path(path_type=Path), default=None, metavar="IMAGE",
              help="Where the base image of the guest's disk is now (it must be the same image).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def resume(snapshot: Path, timeout: float | None, disk: Path | None, quiet: bool) -> None:
    """Continue a guest from SNAPSHOT: same streaming, same exit status as `conode vm run`."""

    def body() -> int:
        from conode.vm.session import GuestSession

        session = GuestSession.resume(snapshot, sys.stdout.buffer, sys.stderr.buffer, _progress(quiet), disk)
        try:
            return session.run(timeout_s=timeout)
        finally:
            session.machine.close()

    _guarded(body)


LEAVE_KEY = b"\x1d"  # Ctrl-], as in telnet and virsh console


@vm.command()
@_with_image_options
def console(mem_mib: int, kernel: Path | None, initrd: Path | None, append: str, disk: Path | None,
            disk_overlay: Path | None, disk_budget: int, disk_ro: bool, disk_root: bool) -> None:
    """An interactive shell on the guest's serial console (Ctrl-] leaves)."""

    def body() -> int:
        from conode.vm.guest_image import BASE_CMDLINE, load_guest_image
        from conode.vm.machine import CoMachine

        image = load_guest_image(kernel, initrd)
        out = sys.stdout.buffer

        def show(data: bytes) -> None:
            out.write(data)
            out.flush()

        config = _machine_config(mem_mib, append, disk, disk_overlay, disk_budget, disk_ro, disk_root)
        machine = CoMachine(config, show, lambda data: None)
        machine.boot(image.kernel, image.initrd, BASE_CMDLINE + " conode.shell=1")
        click.echo("conode: guest console; press Ctrl-] to leave", err=True)
        with _raw_terminal():
            threading.Thread(target=_forward_keys, args=(machine,), daemon=True).start()
            started = time.monotonic()
            exit_reason = machine.run()
        machine.close()
        click.echo(f"\r\nconode: console closed ({exit_reason.value}, {time.monotonic() - started:.0f} s)",
                   err=True)
        return 0

    _guarded(body)


def _forward_keys(machine: "object") -> None:
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, 1024)
        except OSError:
            data = b""
        if not data or LEAVE_KEY in data:
            machine.pause()  # type: ignore[attr-defined]
            return
        machine.call_soon(lambda data=data: machine.uart.feed(data.replace(b"\n", b"\r")))  # type: ignore[attr-defined]


class _raw_terminal:
    """Put the controlling terminal in raw mode for the console's lifetime (no-op when not a tty)."""

    def __enter__(self) -> None:
        self._saved = None
        if sys.stdin.isatty():
            import termios
            import tty

            self._saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setraw(sys.stdin.fileno())

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)


@main.group(invoke_without_command=True)
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The agent's state directory (keys, settings, unacknowledged results).")
@click.option("--coordinator", default=None, help="Coordinator endpoint, e.g. tcp://coord.example:7700.")
@click.option("--coordinator-key", default=None, help="The coordinator's public key (`coordinator init` prints it).")
@click.option("--cores", type=int, default=None, help="Guests to offer, one per core (default 1).")
@click.option("--mem", "mem_mib", type=int, default=None, help="Memory of each guest in MiB (default 128).")
@click.option("--idle-source", default=None, metavar="auto|away|present|file:PATH",
              help="How to tell the owner is away: the platform's sources (auto, the default), a file holding "
                   "the time of the last activity, or a fixed answer.")
@click.option("--owner", type=click.Choice(["away", "present"]), default=None,
              help="Shorthand for --idle-source away|present.")
@click.option("--while-owner", type=click.Choice(["pause", "shutdown"]), default=None,
              help="Keep idle guests paused while the owner works (default), or shut them down.")
@click.option("--cpu-cap", type=float, default=None, help="Percent of a core each guest may use (default 100).")
@click.option("--conet-listen", default=None, metavar="tcp://ADDR:PORT|off",
              help="Where the guests' network switch takes other agents' traffic (default tcp://0.0.0.0:7704).")
@click.option("--image-cache", "image_cache_mib", type=int, default=None, metavar="MiB",
              help="What the pool's disk images may take on this disk (default 16384); the least recently used "
                   "images no guest uses are removed to make room.")
@click.option("--metrics", default=None, metavar="ADDR",
              help="Serve Prometheus metrics on ADDR: PORT (on 127.0.0.1), HOST:PORT, or off (the default).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="A TOML file with any of: coordinator, coordinator_key, cores, mem, name, idle_source, "
                   "while_owner, cpu_cap, conet_listen, image_cache_mib, idle_reports, metrics and the owner policy (start_idle_s, start_max_load, suspend_load, "
                   "continue_idle_s, vacate_after_s, active_input_s, allow_on_battery, and [[windows]] tables of start, "
                   "end and days: when guests may run).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.pass_context
def agent(ctx: click.Context, state_dir: Path | None, coordinator: str | None, coordinator_key: str | None,
          cores: int | None, mem_mib: int | None, idle_source: str | None, owner: str | None,
          while_owner: str | None, cpu_cap: float | None, conet_listen: str | None, image_cache_mib: int | None,
          metrics: str | None, config_file: Path | None, log_level: str) -> None:
    """Run the node agent: join the pool and run jobs in guests (`conode agent init` first)."""
    if ctx.invoked_subcommand is not None:
        return

    def body() -> int:
        import signal

        from conode.agent.daemon import AgentConfig, AgentDaemon
        from conode.agent.metrics import AgentCollector
        from conode.agent.settings import resolve_agent_config
        from conode.logsetup import configure_logging
        from conode.metrics import serve_metrics

        if state_dir is None:
            raise click.UsageError("--state-dir is required")
        configure_logging(log_level)
        overrides = {"coordinator": coordinator, "coordinator_key": coordinator_key, "cores": cores,
                     "mem": mem_mib, "idle_source": idle_source or owner, "while_owner": while_owner,
                     "cpu_cap": cpu_cap, "conet_listen": conet_listen, "image_cache_mib": image_cache_mib,
                     "metrics": metrics}
        config: AgentConfig = resolve_agent_config(state_dir, config_file, overrides)
        daemon = AgentDaemon(config)
        signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
        signal.signal(signal.SIGINT, lambda *_: daemon.stop())
        exporter = serve_metrics(config.metrics, AgentCollector(daemon))
        try:
            daemon.run()
        finally:
            if exporter is not None:
                exporter.close()
        return 0

    _guarded(body)


@agent.command("init")
@click.option("--state-dir", type=click.Path(path_type=Path), required=True)
@click.option("--name", default=None, help="Node name (default: the host name).")
def agent_init(state_dir: Path, name: str | None) -> None:
    """Create the agent's key pair and print what the coordinator's admin must enrol."""

    def body() -> int:
        from conode.agent.settings import init_agent_state

        node, public = init_agent_state(state_dir, name)
        click.echo(f"agent {node} created in {state_dir}")
        click.echo("enrol it on the coordinator host with:")
        click.echo("  " + shell.command("coordinator", "keys", "add", "--state-dir", "STATE", "--role", "agent", "--",
                                        node, public))
        return 0

    _guarded(body)


@main.command("idle-report")
@click.option("--to", "directory", type=click.Path(path_type=Path), default=Path("/run/conode-idle"),
              show_default=True, help="The directory the agent's idle_reports setting names.")
@click.option("--every", type=click.FloatRange(0.5, 60), default=None, metavar="SECONDS",
              help="How often to report (default 5).")
def idle_report(directory: Path, every: float | None) -> None:
    """Report this desktop session's input idle time to the agent (run in the session: X11 or Windows)."""

    def body() -> int:
        from conode.idle.report import REPORT_EVERY_S, report_forever, session_source

        if not directory.is_dir():
            raise ConodeError(f"{directory} does not exist; the agent's installation creates it")
        source = session_source()
        reading = source.read()
        if reading.idle_s is None:
            raise ConodeError(f"cannot read this session's idle time ({reading.detail}); the helper needs an "
                              f"X11 session (DISPLAY) or Windows; elsewhere the agent relies on logind's idle hint")
        report_forever(directory, source, every or REPORT_EVERY_S)
        return 0

    _guarded(body)


_pause_dir_options = [
    click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                 help="The state directory of an agent you run yourself."),
    click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
                 help="The agent's idle_reports directory, when it runs as a service (default /run/conode-idle)."),
]


def _pause_dir(state_dir: Path | None, directory: Path | None) -> Path:
    """Where the agent looks for pauses: the state directory of an agent the owner runs, else the directory
    every local user may write to (the installation's idle_reports)."""
    from conode.idle.report import DEFAULT_REPORTS_DIR

    chosen = state_dir or directory or DEFAULT_REPORTS_DIR
    if not chosen.is_dir():
        raise ConodeError(f"{chosen} does not exist; give the agent's state directory (--state-dir) or its "
                          f"idle_reports directory (--dir)")
    return chosen


def _with_pause_dir(fn: Callable) -> Callable:
    for option in reversed(_pause_dir_options):
        fn = option(fn)
    return fn


@main.command()
@click.option("--for", "for_", default=None, metavar="DURATION",
              help="How long: 90s, 45m, 2h, 1h30m, 1d (default 1h; at most 7 days).")
@_with_pause_dir
def pause(for_: str | None, state_dir: Path | None, directory: Path | None) -> None:
    """Pause the pool on this workstation: running guests stop at once, as when you come back.

    \b
    It ends by itself; `conode resume` ends it earlier. No admin rights needed.
    Example:  conode pause --for 2h
    """

    def body() -> int:
        from conode.agent.pause import write_pause
        from conode.idle.explain import duration, when
        from conode.limits import DEFAULT_PAUSE_S

        seconds = DEFAULT_PAUSE_S if for_ is None else _duration(for_)
        written = write_pause(_pause_dir(state_dir, directory), seconds)
        click.echo(f"pool paused here for {duration(seconds)}, until {when(written.until)}; "
                   f"`conode resume` ends it earlier")
        return 0

    _guarded(body)


@main.command("resume")
@_with_pause_dir
def resume_pool(state_dir: Path | None, directory: Path | None) -> None:
    """End your pause: the pool may use this workstation again when you are idle."""

    def body() -> int:
        from conode.agent.pause import read_pauses, remove_pause
        from conode.idle.explain import when

        chosen = _pause_dir(state_dir, directory)
        removed = remove_pause(chosen)
        other = read_pauses([chosen], time.time())
        if other is not None:
            click.echo(f"{'your pause ended' if removed else 'you had no pause'}; still paused by {other.by} until "
                       f"{when(other.until)}")
            return 0
        click.echo("pool resumed here: it starts when you are idle" if removed else "the pool was not paused here")
        return 0

    _guarded(body)


def _duration(text: str) -> float:
    """Seconds in "90s", "45m", "2h", "1h30m", "1d" (a bare number: minutes)."""
    import re

    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 60
    if not re.fullmatch(r"(\d+(\.\d+)?\s*[dhms]\s*)+", text):
        raise ConodeError(f"--for {text!r}: give a duration such as 90s, 45m, 2h or 1h30m")
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text))


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="The agent's state directory, to show what the running agent sees and does.")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="The agent's idle_reports directory, where an agent run as a service shares its status "
                   "(default /run/conode-idle).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(state_dir: Path | None, directory: Path | None, as_json: bool) -> None:
    """This workstation in plain words: whose job runs here and what it uses, whether the pool is paused, what
    makes it start or stop; the owner state and idle time per source."""

    def body() -> int:
        import json

        from conode.agent.owner import make_sources
        from conode.agent.status import STATUS_NAME, shared_status
        from conode.idle.report import DEFAULT_REPORTS_DIR
        from conode.idle.sources import OwnerLoad, combine, on_battery

        report: dict = {}
        path = state_dir / STATUS_NAME if state_dir is not None else shared_status(directory or DEFAULT_REPORTS_DIR)
        if path is not None:
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError):
                report = {}
            if not isinstance(report, dict):
                report = {}
            if report and time.time() - report.get("time", 0) > 10:
                report["stale"] = True
        if not report or report.get("stale"):
            # No running agent to ask: probe this machine's idle sources directly.
            readings = [source.read() for source in make_sources("auto")]
            load = OwnerLoad()
            load.read()
            time.sleep(0.5)
            report.update({
                "probe": True,
                "sources": [{"name": r.source, "idle_s": r.idle_s, "detail": r.detail} for r in readings],
                "idle_s": combine(readings), "owner_load": load.read(), "on_battery": on_battery(),
            })
        if as_json:
            click.echo(json.dumps(report))
            return 0
        _print_workstation_status(report, state_dir)
        return 0

    _guarded(body)


def _seconds(value: float | None) -> str:
    if value is None:
        return "unknown"
    if value == float("inf") or value > 1e8:
        return "forever"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.0f} min"


def _mib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / (1 << 20):.0f} MiB"


def _guest_words(guest: dict) -> str:
    """One guest in plain words: "running job 17 (alice's): 97 % of a core, 141 MiB"."""
    if guest.get("job") is None:
        doing = {"running": "idle, no job", "paused": "paused, no job", "starting": "starting",
                 "stopped": "not running"}.get(guest["state"], guest["state"])
    else:
        owner = f" ({guest['owner']}'s)" if guest.get("owner") else ""
        doing = f"{'paused with' if guest['state'] == 'paused' else 'running'} job {guest['job']}{owner}"
    if guest.get("pid") is None:
        return doing
    return f"{doing}: {guest.get('cpu_percent', 0.0):.0f} % of a core, {_mib(guest.get('memory_bytes'))} memory"


def _print_workstation_status(report: dict, state_dir: Path | None) -> None:
    if report.get("probe"):
        reason = "its status is stale" if report.get("stale") else \
            "no status shared in its idle-reports directory; give --state-dir or --dir"
        if state_dir is not None and not report.get("stale"):
            reason = f"no running agent in {state_dir}"
        click.echo(f"agent:        not running ({reason}); probing this machine")
    else:
        from conode.idle.explain import when

        connected = "connected" if report.get("connected") else "not connected"
        click.echo(f"agent:        {report['node']} (pid {report['pid']}), {connected} to {report['coordinator']}")
        if report.get("link_problem"):
            click.echo(f"  problem:    {report['link_problem']}")
        if report.get("pool_rule"):
            click.echo(f"the pool:     {report['pool_rule']}")
        until = report.get("paused_until")
        click.echo("paused:       " + (f"yes, by {report.get('paused_by') or '?'} until {when(until)}"
                                       if until is not None else "no (`conode pause --for 2h` pauses it)"))
        for guest in report.get("guests", []):
            click.echo(f"guest {guest['index']}:{' ' * max(1, 7 - len(str(guest['index'])))}{_guest_words(guest)}")
        if report.get("saved_budget_bytes") is not None:
            saved = report.get("vacated_jobs") or []
            jobs = f" (jobs {', '.join(map(str, saved))})" if saved else ""
            click.echo(f"saved guests: {_mib(report.get('saved_bytes'))} on disk{jobs}, at most "
                       f"{_mib(report['saved_budget_bytes'])}")
        click.echo(f"owner state:  {report['owner_state']} for {_seconds(report.get('state_since_s'))}")
    click.echo(f"owner idle:   {_seconds(report.get('idle_s'))}")
    for source in report.get("sources", []):
        click.echo(f"  {source['name']:<8}    {_seconds(source['idle_s']):<10}  {source['detail']}")
    load = report.get("owner_load")
    click.echo(f"owner load:   {'unknown' if load is None else f'{load:.2f} cores'}")
    battery = report.get("on_battery")
    click.echo(f"power:        {'battery' if battery else 'mains' if battery is False else 'no battery'}")
    if report.get("probe"):
        return
    click.echo(f"CPU used:     {report.get('cpu_percent', 0.0):.0f} % of a core (agent and guests)")
    click.echo(f"jobs:         {', '.join(map(str, report.get('jobs', []))) or 'none'}"
               + (f"; saved to disk: {', '.join(map(str, report['vacated_jobs']))}" if report.get("vacated_jobs") else ""))
    if report.get("yield_ms"):
        click.echo(f"last yields:  {', '.join(f'{x:.0f}' for x in report['yield_ms'][-5:])} ms from input to guest stop")


@main.group(invoke_without_command=True)
@click.pass_context
def engine(ctx: click.Context) -> None:
    """Report which CPU engine runs the guest, and why (`conode engine build` builds the fast one)."""
    if ctx.invoked_subcommand is not None:
        return

    def body() -> int:
        import unicorn

        from conode.vm import ENGINE
        from conode.vm.cpu.unicorn_cpu import GuestRam, UnicornCpu

        class _NoPorts:
            def port_read(self, port: int, size: int) -> int:
                return 0xFF

            def port_write(self, port: int, size: int, value: int) -> None:
                pass

        cpu = UnicornCpu(GuestRam(1 << 20), _NoPorts())
        kind = {"fast": "conode's fast engine", "stock": "stock Unicorn", "custom": "a custom Unicorn"}[ENGINE.name]
        click.echo(f"engine:      {kind} {unicorn.__version__} ({ENGINE.reason})")
        delivery = ("native, in the engine (QEMU's own code)" if cpu.native_interrupts
                    else "the Python passage (conode/vm/cpu/passage.py)")
        click.echo(f"interrupts:  {delivery}")
        click.echo(f"slicer:      {cpu.slicer.info.detail}")
        return 0

    _guarded(body)


@engine.command("build")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when the host cannot build it, instead of falling back.")
def engine_build(strict: bool) -> None:
    """Build the fast engine from the pinned Unicorn sources (needs cc, cmake, make; about a minute)."""

    def body() -> int:
        from conode.vm.cpu.engine.build import ToolsMissing, build_engine

        try:
            build_engine(progress=lambda line: click.echo(f"conode: {line}", err=True))
        except ToolsMissing as exc:
            click.echo(f"conode: {exc}; conode will run on stock Unicorn with the Python passage "
                       f"(slower, but complete)", err=True)
            return 1 if strict else 0
        return 0

    _guarded(body)


if __name__ == "__main__":
    main()
