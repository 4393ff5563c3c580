"""kill -9 of the train service while it writes checkpoints (kill_drill.py): nothing corrupt or half-listed,
leftovers removed at the restart, resume reproduces the loss."""

from __future__ import annotations

import kill_drill


def test_kill_9_during_checkpoint_writes():
    report = kill_drill.drill(trials=10, seed=0, cuts=5, max_trials=24)
    assert report.problems == []
    assert report.trials >= 10
    assert report.kills_inside_a_write >= 5  # the drill did cut writes short (else it proves little)
    assert report.leftovers_removed >= report.kills_inside_a_write
    assert report.checkpoints_verified >= 20 and len({step for step, _ in report.loss_checks}) >= 10
