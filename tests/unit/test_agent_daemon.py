"""The agent's decisions, in-process: a fake clock, an in-memory coordinator link and fake workers; no sleeps."""

import json
import logging
import math
import os

import pytest

from conode.agent.conet import ConetSwitch
from conode.agent.daemon import AgentDaemon
from conode.agent.settings import AgentConfig
from conode.agent.supervisor import RESTART_BACKOFF_S
from conode.cluster.protocol import HEARTBEAT_INTERVAL_S, HEARTBEAT_LIVENESS, RECONNECT_INITIAL_S
from conode.idle.policy import OwnerState, PolicyConfig
from conode.limits import MAX_JOB_OUTPUT_BYTES, MAX_STREAM_BYTES, OUTPUT_CHUNK_BYTES
from conode.output_cap import DOWNSTREAM_LIMIT, TRUNCATION_NOTE
from conode.testing.clock import FakeClock
from conode.testing.link import MemoryTransport
from conode.testing.owner import SettableIdle
from conode.testing.worker import FakeWorkers

POLICY = PolicyConfig()


class Agent:
    """One agent on a state directory, with every outside part replaced by a test double."""

    def __init__(self, state_dir, cores=2, clock=None, wall=None, while_owner="pause", chunks=None,
                 image_cache_mib=16384):
        self.clock = clock or FakeClock(1000.0)
        self.wall = wall or FakeClock(1.7e9)
        self.coordinator = MemoryTransport()
        self.workers = FakeWorkers()
        self.idle = SettableIdle(math.inf)
        config = AgentConfig(state_dir=state_dir, name="desk1", coordinator="tcp://127.0.0.1:1",
                             coordinator_key="", cores=cores, mem_mib=128, policy=POLICY, while_owner=while_owner,
                             image_cache_mib=image_cache_mib)
        self.daemon = AgentDaemon(config, clock=self.clock, wall=self.wall, transport=self.coordinator,
                                  start_worker=self.workers, sources=[self.idle], chunks=chunks)

    def step(self, times=1, advance=0.0):
        for _ in range(times):
            self.clock.advance(advance)
            self.wall.advance(advance)
            self.daemon.step()

    def join(self):
        """Owner away, hello answered, every guest up and ready."""
        self.step(2)
        assert self.coordinator.of_type("hello")
        self.coordinator.welcome()
        self.step()
        for worker in self.workers.started:
            worker.ready()
        self.step()
        return self.workers.started

    def pass_time(self, seconds):
        """Let *seconds* go by with the coordinator alive (its connection up: ZeroMQ's heartbeats answered)."""
        for _ in range(int(seconds / HEARTBEAT_INTERVAL_S)):
            self.step(advance=HEARTBEAT_INTERVAL_S)

    def run_job(self, job, argv=("echo", "hi"), inputs=None, outputs=(), mem_mib=128):
        self.coordinator.deliver("run_job", job=job, argv=list(argv), inputs=inputs or {}, outputs=list(outputs),
                                 mem_mib=mem_mib)
        self.step()

    def sent(self, kind, job=None):
        return [m for m in self.coordinator.of_type(kind) if job is None or m.get("job") == job]


@pytest.fixture
def agent(tmp_path):
    return Agent(tmp_path)


def test_jobs_go_to_free_workers_and_wait_in_the_backlog_when_all_are_busy(agent):
    w0, w1 = agent.join()
    for job in (1, 2, 3):
        agent.run_job(job)
    assert [m["job"] for m in w0.of_type("run")] == [1] and [m["job"] for m in w1.of_type("run")] == [2]
    assert [m["job"] for m in agent.daemon.guests.backlog] == [3]
    assert 3 in agent.daemon.held_jobs()
    w0.finish(1, status=0, outputs={"out.txt": b"done"})
    agent.step()
    assert [m["job"] for m in w0.of_type("run")] == [1, 3]  # the freed guest takes the waiting job
    [finished] = agent.sent("job_finished", 1)
    assert finished["outputs"] == {"out.txt": b"done"} and finished["status"] == 0


def test_a_duplicate_placement_is_ignored(agent):
    w0, w1 = agent.join()
    agent.run_job(1)
    agent.run_job(1)
    assert len(w0.of_type("run")) + len(w1.of_type("run")) == 1


def test_a_job_the_guests_cannot_hold_fails_without_retry(agent):
    w0, w1 = agent.join()
    agent.run_job(5, mem_mib=512)
    [failed] = agent.sent("job_failed", 5)
    assert not failed["retry"] and "512 MiB" in failed["reason"]
    assert not w0.of_type("run") and not w1.of_type("run")


def test_cancel_stops_a_running_job_and_drops_a_waiting_one(agent):
    w0, _ = agent.join()
    for job in (1, 2, 3):
        agent.run_job(job)
    agent.coordinator.deliver("cancel_job", job=3)
    agent.coordinator.deliver("cancel_job", job=1)
    agent.step()
    assert w0.of_type("cancel") == [{"type": "cancel", "job": 1}]
    w0.finish(1, status=137)  # the cancelled job's last words
    agent.step()
    assert not agent.sent("job_finished") and 3 not in agent.daemon.held_jobs()
    assert len(w0.of_type("run")) == 1  # job 3 was not dispatched to the freed guest


def test_a_crashed_worker_fails_its_job_for_a_retry_and_restarts_with_back_off(agent):
    w0, _ = agent.join()
    agent.run_job(1)
    w0.crash(code=-11, last_words="worker: Segmentation fault")
    agent.step()
    [failed] = agent.sent("job_failed", 1)
    assert failed["retry"] and "Segmentation fault" in failed["reason"]
    assert agent.daemon.held_jobs() == [1]  # its failure, until the coordinator acknowledges it
    agent.step(advance=RESTART_BACKOFF_S[0] / 2)
    assert agent.workers.current(0) is w0  # not yet
    agent.step(advance=RESTART_BACKOFF_S[0] / 2)
    again = agent.workers.current(0)
    assert again is not w0 and again.boot_snapshot is not None
    again.crash()  # before it was ever ready: the back-off grows
    agent.step()
    agent.step(advance=RESTART_BACKOFF_S[1] - 0.01)
    assert agent.workers.current(0) is again
    agent.step(advance=0.01)
    third = agent.workers.current(0)
    assert third is not again
    third.ready()
    agent.step()
    assert agent.daemon.guests.slots[0].crashes == 0  # up again: the back-off starts over


@pytest.mark.parametrize("bad", [
    {"type": "finished", "job": 1, "status": "zero", "outputs": {}, "missing": [], "runtime_s": 1.0},
    {"type": "finished", "job": 1, "status": 0, "outputs": {"../../etc/passwd": b"x"}, "missing": [],
     "runtime_s": 1.0},
    {"type": "output", "job": 1, "stream": "stdin", "data": b"x"},
    {"type": "ready", "guest": "g", "speed": math.nan},
    {"type": "launch_missiles"},
    ["not", "a", "map"],
])
def test_a_worker_that_sends_an_invalid_message_is_treated_as_crashed(agent, bad, caplog):
    w0, _ = agent.join()
    agent.run_job(1)
    w0.emit_raw(bad)
    agent.step()
    assert w0.code is not None  # discarded
    agent.step()
    [failed] = agent.sent("job_failed", 1)
    assert failed["retry"] and "invalid message" in failed["reason"]
    agent.step(advance=RESTART_BACKOFF_S[0])
    assert agent.workers.current(0) is not w0
    assert "invalid message" in caplog.text


def test_a_broken_pipe_is_treated_as_a_crash(agent):
    w0, _ = agent.join()
    agent.run_job(1)
    w0.send_garbage()
    agent.step(2)
    [failed] = agent.sent("job_failed", 1)
    assert failed["retry"] and "undecodable" in failed["reason"]


def test_outputs_over_the_pool_limit_fail_the_job_not_the_agent_nor_the_worker(agent):
    w0, w1 = agent.join()
    agent.run_job(1)
    agent.run_job(2)
    quarter = b"x" * (25 << 20)
    w0.finish(1, outputs={f"part{i}": quarter for i in range(4)})  # 100 MB of outputs
    w1.finish(2, outputs={"big": b"y" * (MAX_JOB_OUTPUT_BYTES // 2 + 1)}, runtime_s=2.0)  # fits
    agent.step()
    [failed] = agent.sent("job_failed", 1)
    assert not failed["retry"] and "exceed" in failed["reason"]
    assert agent.sent("job_finished", 2)
    assert w0.code is None  # the worker did its part right
    agent.run_job(3)
    assert w0.of_type("run")[-1]["job"] == 3


def test_a_result_the_protocol_refuses_is_reported_as_a_failure(agent):
    agent.join()
    agent.daemon.link.result(9, "job_finished", status=0, outputs={"../escape": b"x"}, missing=[], runtime_s=1.0)
    [failed] = agent.sent("job_failed", 9)
    assert not failed["retry"] and "could not be reported" in failed["reason"]


def test_output_is_forwarded_in_chunks_up_to_the_stream_limit(agent):
    w0, _ = agent.join()
    agent.run_job(1)
    chunk = b"o" * (1 << 20)
    for _ in range(MAX_STREAM_BYTES // len(chunk) + 2):
        w0.emit("output", job=1, stream="stdout", data=chunk)
    agent.step()
    sent = agent.sent("job_output", 1)
    assert max(len(m["data"]) for m in sent) == OUTPUT_CHUNK_BYTES
    forwarded = b"".join(m["data"] for m in sent)  # a worker over the cap is cut by the agent too, with the note
    assert forwarded == b"o" * DOWNSTREAM_LIMIT + TRUNCATION_NOTE


def test_results_wait_in_the_outbox_until_acknowledged_across_reconnects(agent, tmp_path):
    w0, _ = agent.join()
    agent.run_job(1)
    agent.coordinator.up = False  # the coordinator goes away
    w0.emit("output", job=1, stream="stdout", data=b"hello\n")
    w0.finish(1, outputs={"r": b"42"})
    agent.step()
    assert (tmp_path / "outbox" / "1.msg").exists() and 1 in agent.daemon.held_jobs()
    # Silence: the agent gives up on the connection and says hello again once it is back.
    agent.step(advance=HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS + 0.1)
    agent.step(advance=RECONNECT_INITIAL_S)
    assert agent.coordinator.reconnects == 1
    agent.coordinator.up = True
    agent.coordinator.clear()
    agent.step()
    assert 1 in agent.sent("hello")[0]["running"]
    agent.coordinator.welcome()
    agent.step()
    kinds = [m["type"] for m in agent.coordinator.sent if m.get("job") == 1]
    assert kinds == ["job_output", "job_finished"]  # in order: buffered output first, then the result
    agent.coordinator.deliver("ack", job=1)
    agent.step()
    assert not (tmp_path / "outbox" / "1.msg").exists() and agent.daemon.held_jobs() == []


def test_a_welcomed_agent_stays_joined_while_its_connection_is_up_without_a_word_from_the_coordinator(agent):
    agent.join()
    agent.pass_time(10 * HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS)
    assert agent.coordinator.reconnects == 0 and agent.daemon.link.welcomed
    assert len(agent.sent("hello")) == 1


def test_a_dropped_connection_reconnects_at_once_and_unanswered_hellos_back_off_doubling(agent):
    agent.join()
    agent.coordinator.up = False  # ZeroMQ's heartbeats went unanswered (or the coordinator died): dropped
    agent.step()
    agent.coordinator.up = True  # connected again, but the coordinator never answers a hello
    delays = []
    for _ in range(4):
        before = agent.coordinator.reconnects
        waited = 0.0
        while agent.coordinator.reconnects == before:
            agent.step(advance=0.05)
            waited += 0.05
        delays.append(round(waited, 2))
    silence = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
    expected = [RECONNECT_INITIAL_S] + [silence + RECONNECT_INITIAL_S * 2 ** i for i in range(1, 4)]
    assert delays == [pytest.approx(d, abs=0.11) for d in expected]
    assert len(agent.sent("hello")) == 5
    agent.coordinator.welcome()
    agent.step()
    assert agent.daemon.link.welcomed and agent.daemon.link.liveness.backoff == RECONNECT_INITIAL_S


def test_heartbeats_while_connected_and_at_once_on_an_owner_change(agent):
    agent.join()
    beats = len(agent.sent("heartbeat"))
    agent.step(advance=HEARTBEAT_INTERVAL_S)
    assert len(agent.sent("heartbeat")) == beats + 1
    agent.idle.owner_back()
    agent.step()
    assert agent.sent("heartbeat")[-1]["state"] == OwnerState.OWNER.value


def test_the_owner_back_pauses_the_guests_and_away_resumes_them(agent):
    w0, w1 = agent.join()
    agent.run_job(1)
    agent.step(advance=0.5)
    agent.idle.owner_back()
    agent.step()
    assert agent.daemon.owner.policy.state is OwnerState.SUSPENDED
    assert w0.of_type("pause") and w1.of_type("pause")
    w0.emit("paused", at=agent.wall() + 0.004)
    agent.step()
    assert agent.daemon.guests.slots[0].paused
    assert list(agent.daemon.guests.yield_latencies) == [pytest.approx(0.004, abs=1e-6)]
    agent.step(advance=1.0)
    assert len(w0.of_type("pause")) == 1  # said once
    agent.idle.owner_away()
    agent.step()
    assert w0.of_type("resume") and w1.of_type("resume")


def test_suspended_too_long_the_guest_is_vacated_and_a_restarted_agent_resumes_it(agent, tmp_path):
    w0, w1 = agent.join()
    agent.run_job(1)
    agent.idle.owner_back()
    agent.step()
    agent.pass_time(POLICY.vacate_after_s)
    assert agent.daemon.owner.policy.state is OwnerState.VACATING
    [vacate] = w0.of_type("vacate")
    assert vacate["path"] == str(tmp_path / "vacated" / "worker-0.snap") and not w1.of_type("vacate")
    (tmp_path / "vacated" / "worker-0.snap").write_bytes(b"snapshot")  # what the worker saves
    carried = {"interval_s": 60.0, "seq": 5, "stdout": 120, "stderr": 3}  # where its checkpoints go on from
    w0.emit("vacated", path=vacate["path"], jobs=[1], checkpoint=carried)
    w0.exit(0)
    agent.step(2)
    assert agent.sent("job_vacated", 1) and not agent.sent("job_failed")
    assert agent.daemon.guests.slots[0].handle is None
    assert agent.daemon.owner.policy.state is OwnerState.OWNER
    agent.daemon.shutdown()

    restarted = Agent(tmp_path)  # the agent restarts on the same state directory
    restarted.step(2)
    assert 1 in restarted.sent("hello")[0]["running"]
    restarted.coordinator.welcome()
    restarted.step()
    resumed = restarted.workers.current(0)
    assert resumed.resume == tmp_path / "vacated" / "worker-0.snap"
    assert restarted.workers.current(1).resume is None
    resumed.ready()
    restarted.step()
    assert restarted.sent("job_resumed", 1) and not (tmp_path / "vacated" / "worker-0.snap").exists()
    [start] = resumed.of_type("checkpoint_start")
    assert (start["job"], start["checkpoint"]["seq"], start["checkpoint"]["interval_s"], start["outputs"]) == \
        (1, 5, 60.0, {"stdout": 120, "stderr": 3})
    resumed.finish(1)
    restarted.step()
    assert restarted.sent("job_finished", 1)


def piece(agent, job, seq, data, size=None):
    """A checkpoint piece a worker wrote for *job* and announces (its size said as *size*, if given)."""
    path = agent.daemon.checkpoints.out_dir / f"job-{job}-{seq}.ckpt"
    path.write_bytes(data)
    return {"job": job, "seq": seq, "base": -1, "path": str(path), "size": len(data) if size is None else size,
            "sha256": "ab" * 32, "pages": 1, "final_pages": 0, "stall_s": 0.001, "took_s": 0.1}


def test_a_gang_ranks_piece_that_cannot_be_taken_or_sent_is_said_at_once(agent):
    w0, _ = agent.join()
    agent.run_job(1)
    w0.emit("cut_taken", job=1, cut=3, seq=0)
    w0.emit("checkpoint", **piece(agent, 1, 0, b"piece"))  # sent whole: the cut goes on
    agent.step()
    assert [m["cut"] for m in agent.sent("cut_taken", 1)] == [3] and agent.sent("checkpoint_commit", 1)
    w0.emit("cut_taken", job=1, cut=4, seq=1)
    w0.emit("checkpoint", **piece(agent, 1, 1, b"piece", size=9))  # not what its worker said: not sent
    agent.step()
    [failed] = agent.sent("cut_failed", 1)
    assert failed["cut"] == 4 and "piece 1 not sent: it is not the size its worker said" in failed["reason"]
    assert w0.of_type("checkpoint_reset") and not agent.sent("checkpoint_commit", 1)[1:]
    w0.emit("checkpoint", **piece(agent, 1, 2, b"piece", size=9))  # of no cut: the worker's next piece is full
    w0.emit("cut_failed", job=1, cut=5, reason="piece 2 not taken: the final copy failed")  # the worker's own
    agent.step()
    assert [(m["cut"], m["reason"]) for m in agent.sent("cut_failed", 1)[1:]] == [
        (5, "piece 2 not taken: the final copy failed")]


def test_a_worker_that_dies_while_vacating_fails_its_job_for_a_retry(agent):
    w0, _ = agent.join()
    agent.run_job(1)
    agent.idle.owner_back()
    agent.step()
    agent.pass_time(POLICY.vacate_after_s)
    assert w0.of_type("vacate")
    w0.crash(last_words="cannot save: No space left on device")
    agent.step()
    [failed] = agent.sent("job_failed", 1)
    assert failed["retry"] and "No space left" in failed["reason"]
    assert not agent.daemon.guests.vacated


def test_idle_guests_quit_while_the_owner_works_if_so_configured(tmp_path):
    agent = Agent(tmp_path, while_owner="shutdown")
    w0, w1 = agent.join()
    agent.run_job(1)
    agent.idle.owner_back()
    agent.step()
    assert agent.daemon.owner.policy.state is OwnerState.SUSPENDED
    assert w0.of_type("pause") and not w1.of_type("quit")  # suspended with a job: paused, not shut down
    w0.finish(1)
    agent.step()
    assert agent.daemon.owner.policy.state is OwnerState.OWNER
    assert w1.of_type("quit") and w0.of_type("quit")
    w0.exit(0)
    w1.exit(0)
    agent.step(advance=60)
    assert len(agent.workers.started) == 2  # nothing restarts while the owner works
    agent.idle.owner_away()
    agent.step(2)
    assert len(agent.workers.started) == 4


def test_a_restarted_agent_reports_unacknowledged_results_in_its_hello(agent, tmp_path):
    w0, _ = agent.join()
    agent.run_job(7)
    w0.finish(7)
    agent.step()
    agent.daemon.shutdown()
    restarted = Agent(tmp_path)
    restarted.step(2)
    assert restarted.sent("hello")[0]["running"] == [7]
    restarted.coordinator.welcome()
    restarted.step()
    assert restarted.sent("job_finished", 7)  # sent again on the new connection


def test_a_full_state_directory_is_said_once_and_nothing_is_lost_while_running(tmp_path, caplog):
    agent = Agent(tmp_path)
    w0, _ = agent.join()
    # Every write now lands on a device with no space left.
    (tmp_path / "status.tmp").symlink_to("/dev/full")
    for job in (1, 2):
        os.symlink("/dev/full", tmp_path / "outbox" / f"{job}.tmp")
    caplog.set_level(logging.WARNING, "conode.agent")
    agent.run_job(1)
    w0.finish(1)
    agent.step(advance=1.0)
    agent.run_job(2)
    w0.finish(2)
    agent.step(3, advance=1.0)
    assert [m["job"] for m in agent.sent("job_finished")] == [1, 2]  # still reported, from memory
    assert agent.daemon.held_jobs() == [1, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("write a result to the outbox" in w for w in warnings) == 1
    assert sum("write status.json" in w for w in warnings) == 1
    assert "No space left" in agent.daemon.status()["disk_problems"]["write status.json"]
    agent.coordinator.deliver("ack", job=1)
    agent.step()
    assert agent.daemon.held_jobs() == [2]


def test_status_json_is_strict_json_even_with_infinite_and_unknown_readings(agent, tmp_path):
    agent.join()
    agent.idle.idle_s = math.nan
    agent.step(advance=1.0)
    text = (tmp_path / "status.json").read_text()

    def refuse(constant):
        raise AssertionError(f"{constant} in status.json")

    status = json.loads(text, parse_constant=refuse)
    assert status["idle_s"] is None and status["node"] == "desk1" and len(status["guests"]) == 2
    agent.idle.owner_away()
    agent.step(advance=1.0)
    status = json.loads((tmp_path / "status.json").read_text(), parse_constant=refuse)
    assert status["idle_s"] > 1e8  # "forever", as a number any reader can parse


def test_a_malformed_coordinator_message_is_logged_and_skipped(agent, caplog):
    w0, _ = agent.join()
    agent.coordinator.deliver_raw(b"\xc1 not msgpack")
    agent.run_job(1)
    assert w0.of_type("run") and "malformed message" in caplog.text


def test_a_refused_key_stops_the_agent_with_a_clear_error(agent):
    agent.join()
    agent.coordinator.refused = True
    with pytest.raises(Exception, match="refused this agent's key"):
        agent.step()


def test_a_vacated_guest_gets_its_conet_port_back_when_a_restarted_agent_resumes_it(tmp_path):
    def plugged(agent: Agent) -> ConetSwitch:
        """The agent with a switch (never started: the ports it would be given are what is checked)."""
        switch = ConetSwitch(tmp_path, "tcp://127.0.0.1:7704", "tcp://127.0.0.1:1", tmp_path / "keys",
                             agent.daemon.waker.signal, agent.clock)
        agent.daemon.conet = agent.daemon.guests._ports = switch
        return switch

    agent = Agent(tmp_path)
    switch = plugged(agent)
    w0, _ = agent.join()
    net = {"mac": bytes.fromhex("02c0de000001"), "ip": "10.213.0.7", "prefix": 16, "hostname": "job1",
           "hosts": [["job1", "10.213.0.7"]], "rank": 0, "size": 1, "network": "job-1"}
    agent.coordinator.deliver("run_job", job=1, argv=["true"], inputs={}, outputs=[], mem_mib=128, net=net)
    agent.step()
    first_token = w0.of_type("run")[0]["net"]["token"]
    agent.idle.owner_back()
    agent.step()
    agent.pass_time(POLICY.vacate_after_s)
    [vacate] = w0.of_type("vacate")
    (tmp_path / "vacated" / "worker-0.snap").write_bytes(b"snapshot")
    w0.emit("vacated", path=vacate["path"], jobs=[1])
    w0.exit(0)
    agent.step(2)
    assert switch.port_of(1) is None  # its guest is on disk: no port meanwhile
    agent.daemon.shutdown()

    restarted = Agent(tmp_path)
    switch = plugged(restarted)
    restarted.step(2)
    restarted.coordinator.welcome()
    restarted.step()
    resumed = restarted.workers.current(0)
    resumed.ready()
    restarted.step()
    [plug] = resumed.of_type("plug")
    assert plug["socket"] == str(switch.socket_path) and len(plug["token"]) == 16 and plug["token"] != first_token
    assert switch.port_of(1) == {"mac": net["mac"], "ip": net["ip"], "network": net["network"]}
    assert restarted.sent("job_resumed", 1)
    resumed.finish(1)
    restarted.step()
    assert switch.port_of(1) is None  # finished: its port is gone
