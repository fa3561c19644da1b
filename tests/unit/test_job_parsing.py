# SPDX-License-Identifier: GPL-2.0-or-later
"""Job descriptions, inputs, arrays and launches as the client and the coordinator read and build them: what a
job.toml may say, where inputs land, how $(item)/$(index) are replaced, and the sh prologue that gives a command
its environment, stdin and modes (run here by a real /bin/sh)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import msgpack
import pytest

from conode import limits
from conode.cluster import protocol
from conode.cluster.protocol import PROTOCOL_VERSION, ProtocolError
from conode.errors import ConodeError
from conode.vm import output_globs
from coordinator import arrays, launch
from coordinator.inputs import collect, placed_name
from coordinator.jobfile import JobDescription, parse_env, read_description, read_items
from coordinator.pending import Request, never_fits, why_waiting
from coordinator.placement import NodeView
from coordinator.store import Task


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- job.toml ----------------------------------------------------------------------------------------------
def test_a_full_description_is_read_with_paths_relative_to_its_file(tmp_path):
    job = write(tmp_path / "sweep" / "job.toml", '''
command = "python3 run.py --alpha '$(item) x'"
inputs = ["run.py", "data/"]
outputs = ["out-$(index).csv"]
stdin = "in.txt"
memory = 256
guests = 2
time_limit = 90.5
image = "debian"
disk_budget = 100
network = "lab"
queue = 3
[environment]
ALPHA = "$(item)"
''')
    d = read_description(job)
    assert d.command == ["python3", "run.py", "--alpha", "$(item) x"]
    assert d.inputs == [("run.py", tmp_path / "sweep" / "run.py"), ("data/", tmp_path / "sweep" / "data/")]
    assert (d.stdin, d.mem_mib, d.guests, d.time_limit_s) == (tmp_path / "sweep" / "in.txt", 256, 2, 90.5)
    assert (d.image, d.disk_mib, d.network, d.items, d.env) == ("debian", 100, "lab", ["0", "1", "2"],
                                                                {"ALPHA": "$(item)"})


@pytest.mark.parametrize("text,says", [
    ("comand = ['true']", "unknown setting 'comand'; did you mean 'command'?"),
    ("memory = '128'", "memory must be an integer from 48 to 768"),
    ("memory = 4096", "memory must be an integer from 48 to 768"),
    ("queue = 0", "queue must be an integer from 1 to 10000"),
    ("queue = []", "queue: an array needs at least one item"),
    ("queue = [1, 2]", "queue must be a list of strings"),
    ("inputs = 'a.txt'", "inputs must be a list of strings"),
    ("time_limit = true", "time_limit must be a number"),
    ("[environment]\n'1BAD' = 'x'", "environment must be a table of variable names"),
    ("command = \"echo 'unclosed\"", "cannot be split as a shell would"),
])
def test_mistakes_in_a_description_name_the_key_and_the_file(tmp_path, text, says):
    job = write(tmp_path / "job.toml", text)
    with pytest.raises(ConodeError, match=f"{re.escape(str(job))}.*{re.escape(says)}"):
        read_description(job)


def test_the_command_line_adds_to_and_overrides_the_description():
    base = JobDescription(command=["a"], inputs=[("x", Path("x"))], env={"A": "1", "B": "2"}, mem_mib=256,
                          items=["p"])
    merged = base.merged(JobDescription(inputs=[("y", Path("y"))], env={"B": "3"}, time_limit_s=5.0))
    assert merged.command == ["a"] and [i[0] for i in merged.inputs] == ["x", "y"]
    assert merged.env == {"A": "1", "B": "3"} and merged.mem_mib == 256 and merged.time_limit_s == 5.0
    assert base.merged(JobDescription(command=["b"])).command == ["b"]


def test_a_job_without_a_command_is_refused_before_anything_is_sent():
    with pytest.raises(ConodeError, match="no command"):
        JobDescription().message()


def test_env_pairs_and_items_files(tmp_path):
    assert parse_env(["A=x=y", "B_2=", "_c=$(item)"]) == {"A": "x=y", "B_2": "", "_c": "$(item)"}
    for bad in ("NOEQUALS", "1A=x", "A-B=x", "=x"):
        with pytest.raises(ConodeError, match="is not NAME=VALUE"):
            parse_env([bad])
    assert read_items(write(tmp_path / "items", "a b\n\n  c\n")) == ["a b", "  c"]
    with pytest.raises(ConodeError, match="at least one item"):
        read_items(write(tmp_path / "empty", "\n"))


# --- inputs ------------------------------------------------------------------------------------------------
def test_inputs_keep_their_relative_paths_and_modes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "a" / "x.txt", "A")
    write(tmp_path / "b" / "x.txt", "B")
    os.chmod(write(tmp_path / "tools" / "run.sh", "#!/bin/sh\n"), 0o750)
    write(tmp_path / "tree" / "sub" / "deep.txt", "D")
    contents, modes = collect([(t, Path(t)) for t in ("a/x.txt", "./b/x.txt", "tools", "tree/")])
    assert contents == {"a/x.txt": b"A", "b/x.txt": b"B", "tools/run.sh": b"#!/bin/sh\n",
                        "tree/sub/deep.txt": b"D"}
    assert modes == {"tools/run.sh": 0o750}


def test_inputs_given_from_outside_go_under_their_own_name_and_collisions_are_refused(tmp_path):
    assert [placed_name(p) for p in ("/abs/dir/f.txt", "../up/f.txt", "a/../f.txt", ".", "d/")] == \
        ["f.txt", "f.txt", "f.txt", "", "d"]
    one, two = write(tmp_path / "1" / "f.txt", "1"), write(tmp_path / "2" / "f.txt", "2")
    with pytest.raises(ConodeError, match="would both be placed at f.txt"):
        collect([(str(one), one), (str(two), two)])
    assert collect([(str(one), one), (str(one), one)])[0] == {"f.txt": b"1"}  # the same file twice is once


def test_too_many_input_files_are_refused(tmp_path):
    for i in range(limits.MAX_FILES + 1):
        write(tmp_path / "many" / f"{i}.txt", "")
    with pytest.raises(ConodeError, match=f"at most {limits.MAX_FILES}"):
        collect([("many", tmp_path / "many")])


# --- arrays ------------------------------------------------------------------------------------------------
def test_substitution_is_one_pass_and_leaves_other_shell_substitutions_alone():
    assert arrays.substitute("$(item)-$(index)-$(date)", "$(index)", 7) == "$(index)-7-$(date)"
    tasks = arrays.expand(Task(["echo", "$(item)"], {"N": "$(index)"}, ["r-$(index).txt"]), ["a", "b"])
    assert tasks == [Task(["echo", "a"], {"N": "0"}, ["r-0.txt"]), Task(["echo", "b"], {"N": "1"}, ["r-1.txt"])]


# --- the launch prologue, run by a real shell --------------------------------------------------------------
def run_prologue(directory: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=directory, capture_output=True, env={"PATH": os.environ["PATH"]}, check=False)


def test_a_plain_command_is_not_wrapped():
    assert launch.guest_argv(["echo", "hi"], {}, {"a": 0o644}, False) == ["echo", "hi"]


def test_the_prologue_exports_values_verbatim_feeds_stdin_and_applies_modes(tmp_path):
    (tmp_path / launch.STDIN_INPUT).write_bytes(b"from stdin\n")
    write(tmp_path / "my prog.sh", "#!/bin/sh\necho \"prog: $1\"\n")
    odd = "it's \"$HOME\" `x` $(y) \\ \n; *"
    argv = launch.guest_argv(["sh", "-c", './"my prog.sh" "$1"; printf "%s|" "$ODD" "$EMPTY"; cat; ls -a', "sh",
                              "$(item)"], {"ODD": odd, "EMPTY": ""}, {"my prog.sh": 0o755}, True)
    result = run_prologue(tmp_path, argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"prog: $(item)\n{odd}||from stdin\n.\n..\nmy prog.sh\n"
    assert os.stat(tmp_path / "my prog.sh").st_mode & 0o777 == 0o755


def test_the_prologue_keeps_the_commands_status_and_a_missing_command_is_127(tmp_path):
    assert run_prologue(tmp_path, launch.guest_argv(["sh", "-c", "exit 7"], {"A": "1"}, {}, False)).returncode == 7
    assert run_prologue(tmp_path, launch.guest_argv(["no-such-program"], {"A": "1"}, {}, False)).returncode == 127


# --- output globs ------------------------------------------------------------------------------------------
def expand_here(directory: Path, patterns: list[str]) -> tuple[list[str], list[str]]:
    result: list = []
    expansion = output_globs.Expansion(patterns, lambda matched, problems: result.extend([matched, problems]))
    run = subprocess.run(output_globs.expand_argv(patterns), cwd=directory, capture_output=True, check=True)
    expansion.on_output("stdout", run.stdout)
    expansion.on_exit(0)
    return result[0], result[1]


def test_globs_expand_to_regular_files_and_say_which_matched_nothing(tmp_path):
    for name in ("out/a.csv", "out/b.csv", "out/c.txt", "with space.csv"):
        write(tmp_path / name, "x")
    (tmp_path / "out" / "dir.csv").mkdir()
    matched, problems = expand_here(tmp_path, ["out/*.csv", "*.csv", "none/*"])
    assert matched == ["out/a.csv", "out/b.csv", "with space.csv"]
    assert problems == ["none/*: no file matches"]


def test_a_guests_listing_is_bounded_and_its_unsafe_names_dropped():
    got: list = []
    expansion = output_globs.Expansion(["*"], lambda matched, problems: got.extend([matched, problems]))
    expansion.on_output("stdout", b"../etc/passwd\0/abs\0ok\0ok\0")
    expansion.on_output("stdout", b"x" * output_globs.MAX_LISTING)
    expansion.on_exit(0)
    assert got[0] == ["ok"] and "more than" in got[1][0]


# --- why a job waits, and what is refused ------------------------------------------------------------------
def node(name: str, mem: int = 128, cores: int = 1, running: int = 0, state: str = "Unclaimed",
         drained: bool = False) -> NodeView:
    return NodeView(name, state, cores, mem, running, 60.0, drained)


def test_a_request_beyond_every_known_node_is_refused_with_the_numbers():
    known = [(1, 128), (2, 256)]
    assert never_fits(Request(512), known) == ("the job asks for 512 MiB of guest memory; the largest node offers "
                                               "256 MiB (ask for less with --mem)")
    assert "offer 2 such guest(s)" in never_fits(Request(200, guests=3), known)
    assert never_fits(Request(200, guests=2), known) is None and never_fits(Request(768), []) is None


@pytest.mark.parametrize("nodes,request_,says", [
    ([], Request(128), "no node is connected"),
    ([node("a", mem=128)], Request(256), "largest node offers 128 MiB"),
    ([node("a", state="Owner")], Request(128), "no node is idle"),
    ([node("a", drained=True)], Request(128), "every node that fits is drained"),
    ([node("a", running=1)], Request(128), "every idle node is busy"),
    ([node("a"), node("b", running=1)], Request(128, guests=2), "needs 2 guests at once; 1 free"),
    ([node("a")], Request(128, guests=2), "needs 2 guests; the connected nodes offer 1"),
    ([node("a")], Request(128), "earlier jobs go first"),
])
def test_why_a_job_waits(nodes, request_, says):
    assert why_waiting(request_, nodes) == says


# --- the protocol's new fields -----------------------------------------------------------------------------
def submit_frame(**changes) -> bytes:
    fields = {"argv": ["true"], "inputs": {"a": b""}, "outputs": [], "mem_mib": 128, **changes}
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": "submit", **fields}, use_bin_type=True)


@pytest.mark.parametrize("changes,says", [
    ({"env": {"1A": "x"}}, "not a variable name"),
    ({"env": {"A": "x\0y"}}, "without NUL"),
    ({"env": {f"V{i}": "" for i in range(limits.MAX_ENV_VARS + 1)}}, f"at most {limits.MAX_ENV_VARS}"),
    ({"env": {"A": 1}}, "must be text"),
    ({"modes": {"a": 0o1777}}, "permission bits"),
    ({"modes": {"../a": 0o755}}, "not a relative path"),
    ({"timeout_s": 0.5}, "from 1 to"),
    ({"timeout_s": float(limits.MAX_JOB_TIMEOUT_S + 1)}, "from 1 to"),
    ({"items": ["x"] * (limits.MAX_ARRAY_TASKS + 1)}, f"at most {limits.MAX_ARRAY_TASKS}"),
    ({"items": ["x" * 4000] * 300}, "bytes"),
    ({"stdin": "text"}, "must be bytes"),
])
def test_the_protocol_refuses_malformed_launch_fields(changes, says):
    with pytest.raises(ProtocolError, match=says):
        protocol.decode(submit_frame(**changes))
