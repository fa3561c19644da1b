"""Two processes that move a running guest between them, for the migration tests.

    python -m conode.testing.migration destination ADDRESS OUT    receive a guest at ADDRESS (a Unix socket's
                                                                   path), run its job to the end, its stdout to OUT
    python -m conode.testing.migration source ADDRESS OUT PROGRAM AFTER [ARGS...]
                                                                   boot a guest, run PROGRAM ARGS as its job, its
                                                                   stdout to OUT; AFTER seconds into the job (or
                                                                   after its first output, --after-output) move it
                                                                   to ADDRESS

The destination first prints {"listening": ADDRESS}; with ``--curve KEYDIR`` the link is the agents' (ZeroMQ
CURVE, conode/migration/curve.py) and ADDRESS a ZeroMQ endpoint (``tcp://127.0.0.1:*`` picks a port: the
printed address is the one to give the source). Each prints one JSON line at the end: what happened and the
figures (``error`` if it failed). The source's guest goes on where it was if the move fails, and the source then
runs its job to the end itself. ``--mem`` sets the guest's RAM, ``--max-downtime`` the policy's limit,
``--digest`` its digest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import threading
import time
from pathlib import Path

import zmq

from conode.cluster.keys import KeyPair, load_key_pair
from conode.migration import (MigrationError, Policy, RunningGuest, SocketStream, curve, migrate_in,
                              migrate_out)
from conode.migration.curve import CurveStream
from conode.vm.guest import Guest, JobSpec
from conode.vm.guest_image import load_guest_image
from conode.vm.machine import MachineConfig

JOB_TIMEOUT_S = 600.0


class FileSink:
    """A job's stdout and stderr appended to a file (stderr marked), and how it ended."""

    def __init__(self, path: Path) -> None:
        self.out = open(path, "ab", buffering=0)
        self.status: int | None = None
        self.failure: str | None = None
        self.printed = threading.Event()

    def output(self, job: int, stream: str, data: bytes) -> None:
        self.out.write(data if stream == "stdout" else b"[stderr] " + data)
        self.printed.set()

    def finished(self, job: int, status: int, outputs: dict[str, bytes], missing: list[str],
                 runtime_s: float) -> None:
        self.status = status

    def failed(self, job: int, reason: str) -> None:
        self.failure = reason


def _finish(running: RunningGuest, sink: FileSink) -> dict:
    if not running.wait(JOB_TIMEOUT_S):
        running.pause()
        return {"error": f"the job did not end within {JOB_TIMEOUT_S:g} s"}
    running.guest.machine.close()
    return {"status": sink.status, "failure": sink.failure}


def _keys(directory: Path) -> tuple[KeyPair, KeyPair]:
    return load_key_pair(directory, "source"), load_key_pair(directory, "destination")


def source(args: argparse.Namespace) -> dict:
    sink = FileSink(args.out)
    program = args.program.read_bytes()
    guest = Guest.boot(load_guest_image(), MachineConfig(mem_mib=args.mem))
    spec = JobSpec.in_job_directory(1, ["sh", "-c", 'chmod +x prog && exec ./prog "$@"', "prog", *args.args],
                                    {"prog": program}, [])
    job_started = []
    guest.on_ready = lambda name: guest.start_job(spec, sink)
    guest.on_job_started = lambda: job_started.append(time.monotonic())
    running = RunningGuest(guest)
    running.start()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job_started and running.running and time.monotonic() < deadline:
        time.sleep(0.01)
    if not job_started:
        return {"error": "the job did not start", **_finish(running, sink)}
    if args.after_output:
        sink.printed.wait(JOB_TIMEOUT_S)
    time.sleep(max(0.0, (time.monotonic() if args.after_output else job_started[0]) + args.after - time.monotonic()))
    if args.curve is not None:
        source_keys, destination_keys = _keys(args.curve)
        stream: CurveStream | SocketStream = curve.connect(zmq.Context.instance(), args.address,
                                                           destination_keys.public, source_keys)
    else:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(args.address)
        stream = SocketStream(connection)
    try:
        report = migrate_out(running, stream, Policy(max_downtime_s=args.max_downtime,
                                                     full_digest=args.digest == "full"))
    except MigrationError as exc:
        return {"migrated": False, "error": str(exc), **_finish(running, sink)}
    finally:
        stream.close()
    guest.machine.close()
    return {"migrated": True, **dataclasses.asdict(report)}


def destination(args: argparse.Namespace) -> dict:
    sink = FileSink(args.out)
    if args.curve is not None:
        source_keys, destination_keys = _keys(args.curve)
        stream: CurveStream | SocketStream
        stream, address = curve.listen(zmq.Context.instance(), args.address, destination_keys, source_keys.public)
        print(json.dumps({"listening": address}), flush=True)
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.address)
        listener.listen(1)
        print(json.dumps({"listening": args.address}), flush=True)
        stream = SocketStream(listener.accept()[0])
    try:
        arrival = migrate_in(stream, sink)
    except MigrationError as exc:
        stream.close()
        return {"arrived": False, "error": str(exc)}
    running = RunningGuest(arrival.guest)
    running.start()
    arrival.started(running.started_ns)
    verified = True
    try:
        arrival.verify()
    except MigrationError as exc:
        verified, reason = False, str(exc)
        running.on_machine_thread(lambda: arrival.guest.fail(reason))
    stream.close()
    return {"arrived": True, "verified": verified, "rounds": arrival.rounds,
            "bytes_received": arrival.bytes_received, **_finish(running, sink)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conode.testing.migration")
    parser.add_argument("--mem", type=int, default=128)
    parser.add_argument("--max-downtime", type=float, default=Policy.max_downtime_s)
    parser.add_argument("--digest", choices=("full", "final"), default="final",
                        help="check all the final RAM while the guest is down, or the pages the last round sent "
                             "(and all RAM after the hand-over)")
    parser.add_argument("--curve", type=Path, metavar="KEYDIR",
                        help="over ZeroMQ CURVE (ADDRESS: a ZeroMQ endpoint) with the key pairs 'source' and "
                             "'destination' in KEYDIR, instead of a Unix socket (ADDRESS: its path)")
    roles = parser.add_subparsers(dest="role", required=True)
    dst = roles.add_parser("destination")
    dst.add_argument("address")
    dst.add_argument("out", type=Path)
    src = roles.add_parser("source")
    src.add_argument("address")
    src.add_argument("out", type=Path)
    src.add_argument("program", type=Path)
    src.add_argument("after", type=float)
    src.add_argument("--after-output", action="store_true", help="count AFTER from the job's first output")
    src.add_argument("args", nargs="*")
    args = parser.parse_args(argv)
    result = source(args) if args.role == "source" else destination(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
