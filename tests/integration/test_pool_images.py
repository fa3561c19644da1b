"""Images in the pool end to end: a real coordinator and agent as processes. An image (an ext2 root file system
made of the packaged initramfs's files) is added in chunks, a job boots from it, a chunk damaged in the agent's
cache is fetched again, the cache budget evicts the least recently used image, and an image in use is not removed.
"""

import hashlib
import json
import re
import shutil
import threading

import pytest
from pool import Pool

from conode.testing.root_image import root_image

pytestmark = [pytest.mark.guest, pytest.mark.skipif(shutil.which("mke2fs") is None or shutil.which("cpio") is None,
                                                    reason="needs e2fsprogs (mke2fs) and cpio")]

MIB = 1 << 20


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    pool = Pool(tmp_path_factory.mktemp("pool"))
    pool.start_coordinator()
    pool.add_agent("node-a", "--owner", "away", "--image-cache", "60")  # room for two 24 MiB images, not three
    try:
        pool.wait_until("a ready node", lambda: len(pool.ready_nodes()) == 1, timeout=180)
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three root images, each with a file only it has."""
    made = {}
    for name in ("one", "two", "three"):
        where = tmp_path_factory.mktemp(name)
        made[name] = root_image(where, {"only-here.txt": f"this is image {name}\n"})
    return made


def cached(pool, sha256):
    return pool.root / "node-a" / "images" / f"{sha256}.img"


def run_on(pool, image, *command, timeout=240):
    job = int(pool.cli("submit", "--image", image, "--", *command).stdout.strip())
    result = pool.cli("wait", str(job), "--timeout", str(timeout), check=False, timeout=timeout + 60)
    return job, result


def test_an_image_is_added_in_chunks_and_listed(pool, images):
    added = pool.cli("image", "add", "one", str(images["one"]), timeout=120)
    assert added.stdout.decode().strip() == "image one added"
    sent = re.search(r"sent (\d+) chunks the coordinator lacked \(\d+ MiB; the image has 24, (\d+) distinct\)",
                     added.stderr.decode())
    assert sent and sent[1] == sent[2], added.stderr.decode()  # each distinct chunk once (an empty ext2 repeats)
    again = pool.cli("image", "add", "one", str(images["one"]))  # nothing left to send
    assert "sent 0 chunks the coordinator lacked" in again.stderr.decode()
    assert again.stdout.decode().strip() == "image one is there already"
    (listed,) = json.loads(pool.cli("image", "list", "--json").stdout)
    assert listed["name"] == "one" and listed["size"] == 24 * MIB and listed["chunks"] == 24
    assert listed["sha256"] == hashlib.sha256(images["one"].read_bytes()).hexdigest()
    bad = pool.cli("image", "add", "../x", str(images["one"]), check=False)
    assert bad.returncode != 0 and "image name '../x' is not valid" in bad.stderr.decode()


def test_a_job_runs_on_its_image(pool, images, tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("input on the disk\n")
    job = int(pool.cli("submit", "--image", "one", "--input", str(data), "--output", "out.txt", "--",
                       "sh", "-c", "cat /only-here.txt; grep ' / ' /proc/mounts | cut -d' ' -f1-3; "
                                   "tr a-z A-Z < in.txt > out.txt; exit 7").stdout.strip())
    result = pool.cli("wait", str(job), "--timeout", "240", check=False, timeout=300)
    assert result.returncode == 7, result.stderr.decode() + pool.log("node-a")[-3000:]
    assert pool.cli("logs", str(job)).stdout.decode() == "this is image one\n/dev/vda / ext2\n"
    pool.cli("fetch", str(job), str(tmp_path / "out"))
    assert (tmp_path / "out" / "out.txt").read_text() == "INPUT ON THE DISK\n"
    sha = hashlib.sha256(images["one"].read_bytes()).hexdigest()
    assert cached(pool, sha).read_bytes() == images["one"].read_bytes()
    assert re.search(r"fetched image one \(sha256 \w+, 24.0 MiB\): 24 chunks", pool.log("node-a"))
    # The default initramfs guest is still the default.
    plain = pool.submit("sh", "-c", "test -e /only-here.txt || echo initramfs")
    assert pool.cli("wait", str(plain), "--timeout", "120", check=False, timeout=180).returncode == 0
    assert pool.cli("logs", str(plain)).stdout == b"initramfs\n"


def test_a_chunk_damaged_in_the_agents_cache_is_fetched_again(pool, images):
    sha = hashlib.sha256(images["one"].read_bytes()).hexdigest()
    path = cached(pool, sha)
    with open(path, "r+b") as image:  # the test runs as root, or owns the file: a deliberate write
        image.seek(5 * MIB + 100)
        image.write(b"damage")
    job, result = run_on(pool, "one", "cat", "/only-here.txt")
    assert result.returncode == 0, result.stderr.decode()
    assert pool.cli("logs", str(job)).stdout == b"this is image one\n"
    assert re.search(r"fetched image one \(sha256 \w+, 24.0 MiB\): 1 chunks", pool.log("node-a"))
    assert path.read_bytes() == images["one"].read_bytes()


def test_the_cache_budget_evicts_the_least_recently_used_image(pool, images):
    for name in ("two", "three"):
        pool.cli("image", "add", name, str(images[name]), timeout=120)
    shas = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in images.items()}
    job, result = run_on(pool, "two", "cat", "/only-here.txt")
    assert result.returncode == 0 and pool.cli("logs", str(job)).stdout == b"this is image two\n"
    assert cached(pool, shas["one"]).exists() and cached(pool, shas["two"]).exists()
    job, result = run_on(pool, "three", "cat", "/only-here.txt")
    assert result.returncode == 0 and pool.cli("logs", str(job)).stdout == b"this is image three\n"
    assert not cached(pool, shas["one"]).exists()  # least recently used, and no guest used it
    assert cached(pool, shas["two"]).exists() and cached(pool, shas["three"]).exists()
    assert "removed image" in pool.log("node-a")


def test_an_image_in_use_is_not_removed(pool, images):
    pool.cli("drain", "node-a")
    try:
        job = int(pool.cli("submit", "--image", "two", "--", "true").stdout.strip())
        refused = pool.cli("image", "rm", "two", check=False)
        assert refused.returncode != 0 and f"used by jobs not yet ended ({job})" in refused.stderr.decode()
        pool.cli("cancel", str(job))
    finally:
        pool.cli("drain", "node-a", "--undo")
    assert pool.cli("image", "rm", "two").stdout.decode().strip() == "image two removed"
    assert [i["name"] for i in json.loads(pool.cli("image", "list", "--json").stdout)] == ["one", "three"]
    missing = pool.cli("submit", "--image", "two", "--", "true", check=False)
    assert missing.returncode != 0 and "no image named 'two'" in missing.stderr.decode()


def test_a_vacated_image_guest_resumes_with_its_disk_changes_after_its_image_is_fetched_again(tmp_path, images):
    from test_owner_cycle import TICKS, agent_status, start_owner_aware_agent

    pool = Pool(tmp_path)
    pool.start_coordinator()
    try:
        pool.cli("image", "add", "one", str(images["one"]), timeout=120)
        owner = start_owner_aware_agent(pool, "laptop", vacate_after_s=1.5)
        owner.left()
        pool.wait_until("a guest offered to the pool", lambda: "laptop" in pool.ready_nodes(), 120)
        job = int(pool.cli("submit", "--image", "one", "--", "sh", "-c",
                           f"echo written before > /state.txt; {TICKS}; cat /state.txt /only-here.txt").stdout)
        pool.wait_until("the job to produce output", lambda: b"tick-2" in pool.cli("logs", str(job)).stdout, 60)

        back = threading.Event()  # the owner works on, without a pause, until the saved guest's base is gone

        def typing():
            while not back.wait(0.1):
                owner.types()

        typist = threading.Thread(target=typing)
        owner.types()
        typist.start()
        try:
            pool.wait_until("the job to be vacated", lambda: pool.jobs()[job]["state"] == "vacated"
                            and agent_status(pool, "laptop")["guests"][0]["state"] == "stopped", 40, interval=0.2)
            sha = hashlib.sha256(images["one"].read_bytes()).hexdigest()
            (pool.root / "laptop" / "images" / f"{sha}.img").unlink()
            assert (pool.root / "laptop" / "vacated" / "worker-0.snap").exists()
        finally:
            back.set()
            typist.join()

        owner.left()
        result = pool.cli("wait", str(job), "--timeout", "120", check=False, timeout=150)
        assert result.returncode == 0, result.stderr.decode() + pool.log("laptop")[-3000:]
        assert pool.cli("logs", str(job)).stdout.endswith(b"finished\nwritten before\nthis is image one\n")
        assert pool.jobs()[job]["attempts"] == 1, pool.log("laptop")[-4000:]  # resumed, not run again
        assert len(re.findall(r"fetched image one", pool.log("laptop"))) == 2
    finally:
        pool.close()
