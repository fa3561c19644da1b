# SPDX-License-Identifier: GPL-2.0-or-later
"""The Ansible rollout (ansible/) on three test hosts, over SSH, as an admin runs it.

Each test host is a whole machine of the multi-host harness (testnet.py, ``Host.boot``): its own network
namespace and address, its own root (an overlay on this machine's, so the playbook's /etc, /opt, /var land in the
host alone), and systemd as its PID 1, which starts its sshd. The control node is a fourth host of the test
network (a plain namespace: this machine's files, its Python, ansible-playbook), so SSH is the only way in.

The control node of the test has no way out of the test network, so the test builds the wheelhouse itself
beforehand, with the role's own script (roles/conode_build/files/build-wheelhouse, which needs PyPI), and gives
it to the playbooks (conode_build_wheelhouse), as an admin whose control node is offline would; the fast engine
is still built (found already built) by the playbook's build play.

So the units are real here: systemd runs the coordinator and the agents with their sandboxing, restarts them,
and their logs go to each host's journal. What a test host is not: a desktop (no X server or logind seat, so
the agents are told the owner is away) and a machine with its own kernel.

One test, in order: site.yml turns the fresh hosts into a pool that runs a job; a second run changes nothing; the
upgrade playbook moves every host to a new build while a job runs; the removal playbook revokes one node, then
removes everything, leaving nothing behind.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testnet

from conode.cache import cache_dir

pytest_plugins = ["hostpool"]  # the fixture network

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
SOURCE = ANSIBLE.parent
AGENTS = ("pc1", "pc2")
COORDINATOR = "coord"
VENV = "/opt/conode/venv"
STATE = "/var/lib/conode"
CLIENT_CONFIG = f"{STATE}/coordinator/client.toml"
PLAYBOOK_TIMEOUT_S = 900
READY_TIMEOUT_S = 180
# Everything the roles create on a host; after removal none of it may be left.
INSTALLED_PATHS = ("/opt/conode", "/etc/conode", STATE, "/var/cache/conode", "/run/conode-idle",
                   "/etc/systemd/system/conode-agent.service", "/etc/systemd/system/conode-coordinator.service",
                   "/etc/tmpfiles.d/conode-idle.conf", "/etc/xdg/autostart/conode-idle-report.desktop")


def _missing() -> str | None:
    reason = testnet.unavailable()
    if reason:
        return reason
    needed = {"ansible-playbook": "pip install ansible-core", "sshd": "apt-get install openssh-server",
              "ssh": "apt-get install openssh-client", "ssh-keygen": "apt-get install openssh-client"}
    for tool, fix in needed.items():
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"the rollout test needs {tool} ({fix})"
    if not Path("/lib/systemd/systemd").exists():
        return "the rollout test boots systemd on its test hosts (apt-get install systemd)"
    return None


pytestmark = [pytest.mark.guest, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


class Fleet:
    """The control node, the three booted hosts and the inventory that names them."""

    def __init__(self, net: testnet.TestNetwork, root: Path) -> None:
        self.root = root
        self._runs = itertools.count(1)
        self.control = net.host("control")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "id")], check=True)
        self.hosts = {}
        for name in (COORDINATOR, *AGENTS):
            seed = root / "seed" / name
            (seed / "root/.ssh").mkdir(parents=True)
            (seed / "root/.ssh/authorized_keys").write_text((root / "id.pub").read_text())
            host = net.host(name)
            host.boot(seed)
            self.hosts[name] = host
        self.inventory = root / "hosts.json"
        self.inventory.write_text(json.dumps({"all": {
            "vars": {
                "ansible_user": "root", "ansible_ssh_private_key_file": str(root / "id"),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                "ansible_python_interpreter": "/usr/bin/python3",
                "conode_build_dir": str(root / "build"),
                "conode_build_wheelhouse": build_wheelhouse(SOURCE, root / "wheelhouse"),
                "conode_build_python": sys.executable,
                # the engine `conode engine build` made on this machine (.ci/run does): built once, not again
                "conode_build_cache": str(cache_dir()),
                # a test host has no desktop and no one at it
                "conode_agent_idle_source": "away",
            },
            "children": {
                "conode_coordinator": {"hosts": {COORDINATOR: {"ansible_host": self.hosts[COORDINATOR].address}}},
                "conode_agents": {"hosts": {name: {"ansible_host": self.hosts[name].address} for name in AGENTS}},
            }}}))

    def playbook(self, name: str, *args: str) -> str:
        """Run ansible-playbook on the control node; its output (the test fails with it if the play failed)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "PYTHONPATH"))}
        env.update(ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_SSH_CONTROL_PATH_DIR=str(self.root / "cp"), ANSIBLE_LOCAL_TEMP=str(self.root / "tmp"),
                   ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"))
        started = time.monotonic()
        log = self.root / f"ansible-{next(self._runs)}.log"
        with open(log, "w") as out:
            try:
                done = self.control.run(["ansible-playbook", "-i", str(self.inventory), name, *args], cwd=ANSIBLE,
                                        env=env, stdout=out, stderr=subprocess.STDOUT, timeout=PLAYBOOK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not finish in {PLAYBOOK_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
        print(f"{name} {' '.join(args)}: {time.monotonic() - started:.0f} s")
        output = log.read_text()
        assert done.returncode == 0, f"{name} failed:\n{output[-8000:]}"
        return output

    def on(self, name: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        done = self.hosts[name].inside(list(argv), capture_output=True, text=True, timeout=120)
        if check:
            assert done.returncode == 0, f"{' '.join(argv)} on {name}: {done.stdout}{done.stderr}"
        return done

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The admin CLI on the coordinator host, as the service account, as the playbooks run it."""
        return self.on(COORDINATOR, "runuser", "-u", "conode", "--", f"{VENV}/bin/coordinator", *args,
                       "--config", CLIENT_CONFIG, check=check)

    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in json.loads(self.admin("status", "--json").stdout)["nodes"]}

    def wait_until(self, what: str, predicate, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(1)

    def submit(self, script: str) -> int:
        return int(self.admin("submit", "--", "sh", "-c", script).stdout.strip())

    def service(self, host: str, unit: str, *properties: str) -> dict[str, str]:
        shown = self.on(host, "systemctl", "show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def build_wheelhouse(source: Path, wheelhouse: Path) -> str:
    """The wheelhouse of *source*, built here (with PyPI) by the build role's script."""
    script = ANSIBLE / "roles/conode_build/files/build-wheelhouse"
    done = subprocess.run([str(script), sys.executable, str(source), str(wheelhouse)], capture_output=True,
                          text=True, timeout=PLAYBOOK_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"building the wheelhouse failed: {done.stderr[-3000:]}"
    return str(wheelhouse)


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP's counters per host."""
    hosts = {}
    for line in output[output.rindex("PLAY RECAP"):].splitlines()[1:]:
        match = re.match(r"(\S+)\s+:\s+(.*)", line.strip())
        if match:
            hosts[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return hosts


def new_release(root: Path) -> tuple[Path, str]:
    """A copy of this checkout with a later version number: what an upgrade installs."""
    copy = root / "release"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                 ".pytest_cache", ".build", "ansible"))
    version = "0.1.0.post1"
    for name, pattern in (("pyproject.toml", r'^version = ".*"$'), ("conode/__init__.py", r'^__version__ = ".*"$')):
        path = copy / name
        text, count = re.subn(pattern, pattern.split(" = ")[0].lstrip("^") + f' = "{version}"', path.read_text(),
                              count=1, flags=re.MULTILINE)
        assert count == 1, f"no version line in {name}"
        path.write_text(text)
    return copy, version


@pytest.fixture
def fleet(network, tmp_path):
    started = time.monotonic()
    fleet = Fleet(network, tmp_path)
    print(f"fleet booted and wheelhouse built: {time.monotonic() - started:.0f} s")
    return fleet


def test_site_upgrade_and_removal_on_three_hosts_over_ssh(fleet):
    started = time.monotonic()
    # --- site.yml: fresh hosts become a pool --------------------------------------------------------------
    first = recap(fleet.playbook("site.yml"))
    assert set(first) == {"localhost", COORDINATOR, *AGENTS}
    assert all(counts["failed"] == 0 and counts["unreachable"] == 0 for counts in first.values())
    assert all(first[name]["changed"] > 0 for name in (COORDINATOR, *AGENTS))
    fleet.wait_until("both agents ready in the pool",
                     lambda: {n for n, node in fleet.nodes().items() if node["state"] == "Unclaimed"} == set(AGENTS))
    nodes = fleet.nodes()
    assert all(nodes[name]["software"] == "conode 0.1.0" for name in AGENTS)
    enrolled = fleet.on(COORDINATOR, "runuser", "-u", "conode", "--", f"{VENV}/bin/coordinator", "keys", "list",
                        "--state-dir", f"{STATE}/coordinator").stdout
    for name in AGENTS:  # each agent's own key, read on its host, enrolled on the coordinator
        assert fleet.on(name, "cat", f"{STATE}/agent/keys/agent.public").stdout.strip() in enrolled
        coordinator_key = fleet.on(COORDINATOR, "cat", f"{STATE}/coordinator/keys/coordinator.public").stdout.strip()
        assert f'coordinator_key = "{coordinator_key}"' in fleet.on(name, "cat", "/etc/conode/agent.toml").stdout

    print(f"pool ready: {time.monotonic() - started:.0f} s")
    job = fleet.submit("echo hello from the pool; uname -m")
    assert fleet.admin("wait", str(job), "--timeout", "120").returncode == 0
    assert fleet.admin("logs", str(job)).stdout.split() == ["hello", "from", "the", "pool", "i686"]

    # --- the units: systemd runs them as the role says -----------------------------------------------------
    for name in AGENTS:
        agent = fleet.service(name, "conode-agent.service", "MainPID", "ActiveState", "NRestarts")
        assert agent["ActiveState"] == "active"
        user, policy = fleet.on(name, "ps", "-o", "user=,cls=", "-p", agent["MainPID"]).stdout.split()
        nice = fleet.on(name, "cat", f"/proc/{agent['MainPID']}/stat").stdout.rsplit(")", 1)[1].split()[16]
        assert (user, policy, nice) == ("conode", "IDL", "19")  # the service account, idle CPU priority
        assert "idle" in fleet.on(name, "ionice", "-p", agent["MainPID"]).stdout  # and idle I/O priority
        sandboxed = fleet.on(name, "nsenter", "-t", agent["MainPID"], "-m", "-r", "--", "sh", "-c",
                             "touch /usr/conode-probe; touch /var/lib/conode/agent/probe && echo writable",
                             check=False)
        assert "Read-only file system" in sandboxed.stderr and sandboxed.stdout.strip() == "writable"
        journal = fleet.on(name, "journalctl", "-u", "conode-agent.service", "-o", "cat", "--no-pager").stdout
        assert re.search(r"^conode\.agent INFO engine: fast", journal, re.MULTILINE), journal[-3000:]
        assert not re.search(r"^\d{4}-\d\d-\d\d ", journal, re.MULTILINE)  # the journal's timestamp only
        assert not fleet.on(name, "journalctl", "-u", "conode-agent.service", "-p", "warning", "-o", "cat",
                            "--no-pager").stdout.strip()  # priorities reach the journal: no warning logged
    # restart on failure: the agent killed outright comes back by itself and rejoins
    before = fleet.service("pc1", "conode-agent.service", "MainPID")["MainPID"]
    fleet.on("pc1", "kill", "-KILL", before)
    fleet.wait_until("systemd to restart the killed agent", lambda: fleet.service(
        "pc1", "conode-agent.service", "NRestarts", "ActiveState") == {"NRestarts": "1", "ActiveState": "active"})
    fleet.wait_until("the restarted agent back in the pool", lambda: "pc1" in fleet.nodes())
    coordinator = fleet.service(COORDINATOR, "conode-coordinator.service", "ActiveState", "User")
    assert coordinator == {"ActiveState": "active", "User": "conode"}

    # --- a second run changes nothing ----------------------------------------------------------------------
    second = recap(fleet.playbook("site.yml"))
    assert {name: counts["changed"] for name, counts in second.items()} == dict.fromkeys(second, 0)

    # --- a rolling upgrade while a job runs --------------------------------------------------------------
    fleet.wait_until("both agents ready again", lambda: all(
        fleet.nodes().get(name, {}).get("state") == "Unclaimed" for name in AGENTS))
    release, version = new_release(fleet.root)
    long_job = fleet.submit("sleep 15; echo survived")
    fleet.wait_until("the long job running", lambda: any(
        long_job in node["jobs"] for node in fleet.nodes().values()), timeout=60)
    wheelhouse = build_wheelhouse(release, fleet.root / "wheelhouse-upgrade")
    upgraded = fleet.playbook("upgrade.yml", "-e", f"conode_build_wheelhouse={wheelhouse}")
    assert upgraded.count("Drain or undrain the node on the coordinator: drain]") == len(AGENTS)
    assert upgraded.count("Drain or undrain the node on the coordinator: undrain]") == len(AGENTS)
    nodes = fleet.nodes()
    assert {nodes[name]["software"] for name in AGENTS} == {f"conode {version}"}
    assert not any(node["drained"] for node in nodes.values())
    assert fleet.admin("wait", str(long_job), "--timeout", "120").returncode == 0
    assert fleet.admin("logs", str(long_job)).stdout.strip() == "survived"
    assert fleet.on(COORDINATOR, f"{VENV}/bin/python", "-c", "import conode; print(conode.__version__)"
                    ).stdout.strip() == version

    # --- removal: one node revoked, then everything gone -------------------------------------------------
    uids = {name: fleet.on(name, "id", "-u", "conode").stdout.strip() for name in fleet.hosts}
    fleet.playbook("remove.yml", "--limit", "pc2")
    keys = fleet.on(COORDINATOR, "runuser", "-u", "conode", "--", f"{VENV}/bin/coordinator", "keys", "list",
                    "--state-dir", f"{STATE}/coordinator").stdout
    assert "pc1" in keys and "pc2" not in keys
    fleet.wait_until("pc2 gone from the pool", lambda: "pc2" not in fleet.nodes(), timeout=60)
    fleet.playbook("remove.yml", "-e", "conode_remove_coordinator=true")
    for name in fleet.hosts:
        left = [path for path in INSTALLED_PATHS if fleet.on(name, "test", "-e", path, check=False).returncode == 0]
        assert left == [], f"{name} still has {left}"
        assert fleet.on(name, "id", "conode", check=False).returncode != 0
        assert fleet.on(name, "pgrep", "-U", uids[name], check=False).returncode == 1  # no process of conode's
    print(f"rollout test: {time.monotonic() - started:.0f} s")
