"""`conode vm run` and `conode vm resume` against the real guest kernel, as a user runs them."""

import gzip


LOOP = ("i=0; s=0; while [ $i -lt {n} ]; do s=$(( (s*31 + i) % 1000003 )); i=$((i+1)); done; "
        "echo sum=$s")
LOOP_ITERATIONS = {"fast": 40000, "stock": 6000}  # a few seconds of guest time on each engine


def assert_clean_error(result, *needles):
    err = result.stderr.decode()
    assert result.returncode == 125, err
    assert "Traceback" not in err
    assert "conode: error:" in err
    for needle in needles:
        assert needle in err


def test_uname_reports_an_i386_family_machine(conode):
    result = conode("vm", "run", "--", "uname", "-m")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() in {"i386", "i486", "i586", "i686"}


def test_output_and_exit_status_of_the_command(conode):
    result = conode("vm", "run", "--", "sh", "-c", "echo $((6*7)); echo to-stderr >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout == b"42\n"  # progress lines never mix into the command's stdout
    err = result.stderr.decode()
    assert "to-stderr" in err and "guest ready" in err


def test_command_not_found_in_guest(conode):
    result = conode("vm", "run", "-q", "--", "no-such-program", "x")
    assert result.returncode == 127
    assert b"no-such-program" in result.stderr and b"not found" in result.stderr
    assert b"Traceback" not in result.stderr


def test_large_output_streams_intact_and_memory_option(conode):
    result = conode("vm", "run", "-q", "--mem", "64", "--", "sh", "-c",
                    "i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); done")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == [f"line-{i}" for i in range(3000)]


def test_snapshot_mid_computation_resumes_in_a_new_process(conode, tmp_path):
    loop = LOOP.format(n=LOOP_ITERATIONS[conode.engine])
    straight = conode("vm", "run", "-q", "--", "sh", "-c", loop)
    assert straight.returncode == 0 and straight.stdout.startswith(b"sum=")
    snap = tmp_path / "mid.snap"
    first = conode("vm", "run", "--snapshot-after", "0.5", "--snapshot-to", str(snap), "--",
                   "sh", "-c", "echo started; " + loop)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == b"started\n"  # stopped in the middle: the result is not printed yet
    assert snap.stat().st_size > 0
    second = conode("vm", "resume", str(snap))
    assert second.returncode == 0, second.stderr.decode()
    assert second.stdout == straight.stdout
    again = conode("vm", "resume", "-q", str(snap))  # a snapshot can be resumed more than once
    assert again.stdout == straight.stdout


def test_corrupt_snapshot_is_refused(conode, tmp_path):
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"CONODE\x00S" + b"\x01\x00\x00\x00" + b"\xff" * 100)
    assert_clean_error(conode("vm", "resume", str(bad)), "bad.snap")
    assert_clean_error(conode("vm", "resume", str(tmp_path / "missing.snap")), "missing.snap")


def test_bad_images_and_memory_give_one_line_errors(conode, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 8192)
    assert_clean_error(conode("vm", "run", "--kernel", str(junk), "--", "true"), "not a Linux bzImage")
    assert_clean_error(conode("vm", "run", "--initrd", str(junk), "--", "true"), "initramfs")
    assert_clean_error(conode("vm", "run", "--mem", "16", "--", "true"), "between 48 and 768")


def test_guest_kernel_panic_is_reported(conode, tmp_path):
    # An initramfs with nothing in it: the kernel finds no init and panics.
    trailer = b"070701" + b"0" * 8 * 11 + b"0000000B" + b"0" * 8 + b"TRAILER!!!\0"
    initrd = tmp_path / "empty.cpio.gz"
    initrd.write_bytes(gzip.compress(trailer + b"\0" * (-len(trailer) % 4)))
    result = conode("vm", "run", "--initrd", str(initrd), "--", "true")
    assert_clean_error(result, "kernel panic")


def test_command_that_hangs_hits_the_timeout(conode):
    result = conode("vm", "run", "--timeout", "6", "--", "sleep", "100")
    assert_clean_error(result, "did not finish within 6 s")


def test_guest_randomness_is_seeded_by_the_host_at_boot(conode):
    # Without the host's seed the guest's first read of /dev/urandom waits seconds for entropy.
    script = "head -c 16 /dev/urandom | od -An -tx1; dmesg | grep 'crng init done'"
    first, second = (conode("vm", "run", "-q", "--", "sh", "-c", script) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0
    assert b"[    0.000000] random: crng init done" in first.stdout
    assert first.stdout.splitlines()[0] != second.stdout.splitlines()[0]  # each boot gets its own seed


def test_append_reaches_the_kernel_command_line(conode):
    result = conode("vm", "run", "-q", "--append", "conode.test=appended", "--", "cat", "/proc/cmdline")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split()[-1] == "conode.test=appended"


def test_a_kernel_that_cannot_start_init_says_why(conode):
    result = conode("vm", "run", "-q", "--append", "rdinit=/no/such/init", "--", "true")
    assert_clean_error(result, "kernel panic")


def test_timeout_zero_is_refused(conode):
    assert_clean_error(conode("vm", "run", "-q", "--timeout", "0", "--", "true"), "--timeout")


def test_resume_refuses_a_fifo_without_blocking(conode, tmp_path):
    import os

    fifo = tmp_path / "guest.snap"
    os.mkfifo(fifo)
    assert_clean_error(conode("vm", "resume", str(fifo)), str(fifo))
