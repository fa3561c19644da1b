"""The agent's part in moves (conode/agent/moves.py), in-process: the coordinator's move messages relayed to the
right worker, the workers' answers reported with the move's epoch, stale epochs ignored, a job held while it
arrives and given up when the move is called off. Fake clock, link and workers (test_agent_daemon.Agent)."""

import pytest
from test_agent_daemon import Agent

from conode.agent.moves import AgentMoves, MoveSettings
from conode.cluster.protocol import PROTOCOL_VERSION

NET = {"mac": bytes.fromhex("02c0de000007"), "ip": "10.213.0.7", "prefix": 16, "hostname": "job7",
       "hosts": [["job7", "10.213.0.7"]], "rank": 0, "size": 1, "network": "job-7"}


@pytest.fixture
def agent(tmp_path):
    agent = Agent(tmp_path)
    guests = agent.daemon.guests
    guests.mover = AgentMoves(guests, agent.daemon.link, MoveSettings(str(tmp_path / "keys"), "desk1-key",
                                                                      "tcp://10.0.0.2:*", 2 << 20))
    return agent


def test_a_destination_gives_a_free_worker_the_guest_and_reports_it_arrived(agent):
    w0, w1 = agent.join()
    agent.run_job(1)  # w0 is busy
    agent.coordinator.deliver("move_in", job=7, epoch=3, source_key="src-key", mem_mib=128, net=NET)
    agent.step()
    (receive,) = w1.of_type("receive")
    assert receive["peer"] == "src-key" and receive["bind"] == "tcp://10.0.0.2:*" and receive["job"] == 7
    assert 7 in agent.daemon.held_jobs()  # a restarted coordinator hears it is coming here
    agent.run_job(8)
    assert not w1.of_type("run")  # the receiving worker takes nothing else
    w1.emit("listening", job=7, endpoint="tcp://10.0.0.2:4100")
    agent.step()
    assert agent.sent("move_listening") == [{"v": PROTOCOL_VERSION, "type": "move_listening", "job": 7, "epoch": 3,
                                             "endpoint": "tcp://10.0.0.2:4100", "key": "desk1-key"}]
    w1.emit("moved_in", job=7, rounds=2, bytes=12 << 20)
    agent.step()
    assert agent.sent("move_arrived")[0]["epoch"] == 3
    w1.emit("output", job=7, stream="stdout", data=b"go on\n")  # its output is the job's, from here
    agent.step()
    assert agent.sent("job_output", job=7)[0]["data"] == b"go on\n"
    agent.coordinator.deliver("checkpoint_start", job=7, interval_s=30.0, seq=4, stdout=120, stderr=3)
    agent.step()  # and its checkpoints go on from here, a full piece first
    [start] = w1.of_type("checkpoint_start")
    assert (start["job"], start["checkpoint"]["seq"], start["checkpoint"]["interval_s"], start["outputs"]) == \
        (7, 4, 30.0, {"stdout": 120, "stderr": 3})
    agent.coordinator.deliver("checkpoint_start", job=9, interval_s=30.0, seq=4, stdout=0, stderr=0)
    agent.step()  # a job not here: nothing starts
    assert not w0.of_type("checkpoint_start") and len(w1.of_type("checkpoint_start")) == 1


def test_a_move_called_off_at_the_destination_lets_the_job_be_placed_there_later(agent):
    w0, _ = agent.join()
    agent.coordinator.deliver("move_in", job=7, epoch=1, source_key="src-key", mem_mib=128, net=NET)
    agent.step()
    agent.coordinator.deliver("move_abort", job=7, epoch=2, reason="stale")  # another move's: ignored
    agent.step()
    assert 7 in agent.daemon.held_jobs() and not w0.of_type("move_abort")
    agent.coordinator.deliver("move_abort", job=7, epoch=1, reason="the source node was lost")
    agent.step()
    assert w0.of_type("move_abort") and 7 not in agent.daemon.held_jobs()
    w0.emit("move_failed", job=7, reason="the move was called off", handed_over=False)
    agent.step()
    agent.run_job(7)  # requeued, and placed here: it starts afresh
    assert w0.of_type("run")[0]["job"] == 7


def test_a_source_relays_ready_and_go_and_lets_go_of_the_job_once_it_left(agent):
    w0, _ = agent.join()
    agent.run_job(5)
    agent.coordinator.deliver("move_out", job=5, epoch=2, endpoint="tcp://10.0.0.3:4100", key="dst-key")
    agent.step()
    (migrate,) = w0.of_type("migrate")
    assert migrate["peer"] == "dst-key" and migrate["max_bytes_per_s"] == 2 << 20
    w0.emit("move_ready", job=5)
    agent.step()
    assert agent.sent("move_ready") == [{"v": PROTOCOL_VERSION, "type": "move_ready", "job": 5, "epoch": 2}]
    agent.coordinator.deliver("move_go", job=5, epoch=1)  # stale
    agent.coordinator.deliver("move_go", job=5, epoch=2)
    agent.step()
    assert len(w0.of_type("move_go")) == 1
    w0.emit("moved_out", job=5, downtime_s=0.05, total_s=0.8, paused_s=0.04, bytes=12 << 20, rounds=1)
    agent.step()
    assert agent.sent("move_sent")[0]["downtime_s"] == 0.05
    assert 5 not in agent.daemon.held_jobs()
    agent.run_job(6)  # the worker is free again
    assert w0.of_type("run")[-1]["job"] == 6


def test_a_source_whose_move_failed_keeps_the_job(agent):
    w0, _ = agent.join()
    agent.run_job(5)
    agent.coordinator.deliver("move_out", job=5, epoch=1, endpoint="tcp://10.0.0.3:4100", key="dst-key")
    agent.step()
    w0.emit("move_failed", job=5, reason="timed out", handed_over=False)
    agent.step()
    assert agent.sent("move_failed")[0]["epoch"] == 1 and 5 in agent.daemon.held_jobs()
    w0.finish(5)
    agent.step()
    assert agent.sent("job_finished", job=5)
