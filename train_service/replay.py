"""Keeping the other ranks in step with rank 0 (train_service.distributed).

Rank 0 decides everything: which pass runs, which tokens are sampled, which adapters exist. Before it changes
an adapter or runs a unit of engine work it sends a message (`Mirror.send`, on the engine thread), and every
other rank (train_service.follower) does the same thing on its replicas, with the same code: a replica training
model is a `TrainingModel`, a replica pass goes through `worker.run_plan`, a replica decode group is a
`DecodeGroup` that takes rank 0's tokens. Every pass ends with the same gathered results on every rank, so the
replicas make the same decisions (refused parts, rolled-back gradients, optimizer steps) without being told.

Messages, in the order rank 0 sends them:
    ("base", entry)                                    load and shard a base model
    ("model", model_id, entry, lora, peft_config)      a training model's fresh adapter (drawn from lora.seed)
    ("load", model_id, adapter_state, optimizer_state) load_state / from_state (rank 0 read the checkpoint)
    ("sampler", sampler_id, entry, peft_config, state) a sampler (config and state None: the plain base)
    ("optim_step", model_id, OptimStepRequest bytes)
    ("pass", backward, [(wid, model_id, first, last, n_rows, rows, loss_fn, config), ...])
    ("group", gid, [(key, prompt, options, num_samples), ...]) then ("step", gid) per decode step
    ("drop", [ids]), ("noop",) when idle (a heartbeat both ways), ("stop",)
"""

from __future__ import annotations

from typing import Any

from train_service.distributed import Ranks


class Mirror:
    """Rank 0's sender; with one rank (no `ranks`) it sends nothing."""

    def __init__(self, ranks: Ranks | None = None):
        self.ranks = ranks

    @property
    def active(self) -> bool:
        return self.ranks is not None

    def send(self, *message: Any) -> None:
        if self.ranks is not None:
            self.ranks.broadcast(message)

    def pass_plan(self, plan: Any) -> None:
        if self.ranks is None:
            return
        parts = []
        for work, first, last in plan.parts:
            rows = (work.rows.ids[first:last], work.rows.targets[first:last], work.rows.inputs[first:last])
            parts.append(
                (work.wid, work.model.model_id, first, last, len(work.rows), rows, work.loss_name, work.config)
            )
        self.send("pass", plan.backward, parts)

    def group(self, group: Any) -> None:
        if self.ranks is not None:
            self.send(
                "group",
                group.gid,
                [(m.work.key, m.request.prompt, m.request.params, m.request.num_samples) for m in group.members],
            )

    def step(self, group: Any) -> None:
        self.send("step", group.gid)
