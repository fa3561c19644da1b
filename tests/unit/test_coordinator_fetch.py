# SPDX-License-Identifier: GPL-2.0-or-later
"""`coordinator fetch` writes a job's outputs without following or replacing links already in the target."""

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

from conode.errors import ConodeError
from coordinator.outputs import write_outputs


def test_outputs_are_written_with_their_directories(tmp_path):
    target = tmp_path / "new" / "results"
    written = write_outputs(target, {"b.txt": b"bee", "sub/dir/a.bin": b"\0\1", "sub/c": b""})
    assert written == [(target / "b.txt", 3), (target / "sub/c", 0), (target / "sub/dir/a.bin", 2)]
    assert (target / "sub/dir/a.bin").read_bytes() == b"\0\1" and (target / "b.txt").read_text() == "bee"
    assert sorted(p.name for p in target.iterdir()) == ["b.txt", "sub"]  # no temporary left behind


def test_an_existing_regular_file_is_replaced(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    write_outputs(tmp_path, {"out.txt": b"new"})
    assert (tmp_path / "out.txt").read_text() == "new"


def test_a_symlink_in_place_of_a_file_is_neither_followed_nor_replaced(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "target"
    target.mkdir()
    (target / "out.txt").symlink_to(victim)
    (target / "dangling").symlink_to(tmp_path / "nowhere")
    for name in ("out.txt", "dangling"):
        with pytest.raises(ConodeError, match=f"refusing to write {target / name}: a symbolic link is there"):
            write_outputs(target, {name: b"evil"})
    assert victim.read_text() == "precious" and (target / "out.txt").is_symlink()
    assert not (tmp_path / "nowhere").exists()


def test_a_symlinked_directory_on_the_way_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "sub").symlink_to(elsewhere)
    with pytest.raises(ConodeError, match=f"refusing to write {target / 'sub'}: it is a symbolic link"):
        write_outputs(target, {"sub/x": b"evil"})
    assert list(elsewhere.iterdir()) == []


def test_a_file_where_a_directory_is_needed_is_refused(tmp_path):
    (tmp_path / "sub").write_text("a file")
    with pytest.raises(ConodeError, match="not a directory"):
        write_outputs(tmp_path, {"sub/x": b"data"})


def test_an_unsafe_name_from_the_coordinator_is_refused(tmp_path):
    with pytest.raises(ConodeError, match="unsafe output path"):
        write_outputs(tmp_path / "t", {"../escape": b"x"})
    assert not (tmp_path / "escape").exists()


@contextlib.contextmanager
def unprivileged():
    """Run as an ordinary user: root could write into a read-only directory."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)  # nobody
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unwritable_target_gives_one_clear_error():
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        target = Path(scratch) / "locked"
        target.mkdir(mode=0o555)
        with unprivileged():
            with pytest.raises(ConodeError) as caught:
                write_outputs(target, {"out.txt": b"x"})
            with pytest.raises(ConodeError) as below:
                write_outputs(target / "new", {"out.txt": b"x"})
        assert str(caught.value) == f"cannot write {target / 'out.txt'}: Permission denied"
        assert str(below.value) == f"cannot write {target / 'new'}: Permission denied"
        assert list(target.iterdir()) == []
