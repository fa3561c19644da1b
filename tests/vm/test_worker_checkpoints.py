# SPDX-License-Identifier: GPL-2.0-or-later
"""A real guest worker's checkpoints of its job, as the agent asks for them."""

from test_conet import WorkerProcess

from conode.vm.checkpoint import FULL


def test_after_a_refused_piece_the_next_one_starts_a_new_chain(tmp_path):
    """The coordinator refused a piece (checkpoint_reset): the next piece holds every page and rests on nothing,
    not on the piece the coordinator does not have."""
    worker = WorkerProcess(tmp_path / "boot.snap")
    try:
        worker.receive("ready")
        worker.send({"type": "run", "job": 1, "argv": ["sh", "-c", "sleep 20"], "inputs": {}, "outputs": [],
                     "checkpoint": {"dir": str(tmp_path), "interval_s": 1.0, "seq": 0}})
        first = worker.receive("checkpoint")
        second = worker.receive("checkpoint")
        assert (first["base"], second["base"]) == (FULL, first["seq"])
        worker.send({"type": "checkpoint_reset", "job": 1})
        after = worker.receive("checkpoint")
        if after["pages"] < first["pages"]:  # taken as the reset arrived: the one after it is full
            after = worker.receive("checkpoint")
        assert after["pages"] == first["pages"] and after["base"] == FULL
    finally:
        worker.close()
