"""Keeping the other ranks in step with rank 0 (train_service.distributed).

Rank 0 decides everything: which pass runs, which tokens are sampled, which adapters exist. Before it changes
an adapter or runs a unit of engine work it sends a message (`Mirror.send`, on the engine thread), and every
other rank (`Follower.run`) does the same thing on its replicas, with the same code: a replica training model is a
`TrainingModel`, a replica pass goes through `worker.run_plan`, a replica decode group is a `DecodeGroup` that
takes rank 0's tokens. Every pass ends with the same gathered results on every rank, so the replicas make the same
decisions (refused parts, rolled-back gradients, optimizer steps) without being told.

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

import logging
from typing import Any

from bios.errors import BiosError
from train_service.distributed import Ranks, RanksFailed

log = logging.getLogger("bios.replay")


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
            parts.append((work.wid, work.model.model_id, first, last, len(work.rows), rows, work.loss_name,
                          work.config))
        self.send("pass", plan.backward, parts)

    def group(self, group: Any) -> None:
        if self.ranks is not None:
            self.send("group", group.gid, [(m.work.key, m.request.prompt, m.request.params, m.request.num_samples)
                                           for m in group.members])

    def step(self, group: Any) -> None:
        self.send("step", group.gid)


class Follower:
    """A rank other than 0: replicas of every base, adapter and optimizer, driven by rank 0's messages."""

    def __init__(self, ranks: Ranks, device: Any):
        from train_service.models import BaseModelPool

        self.ranks = ranks
        self.pool = BaseModelPool(device, ranks)
        self.models: dict[str, Any] = {}  # model_id -> TrainingModel replica
        self.adapters: dict[str, Any] = {}  # model or sampler id -> its Adapter (None: the plain base)
        self.bases: dict[str, Any] = {}  # model or sampler id -> its BaseModel
        self.works: dict[int, Any] = {}  # forward requests split over several passes, by rank 0's id
        self.groups: dict[int, Any] = {}

    def run(self) -> None:
        """Until rank 0 says stop, or the group breaks (then the process must exit and the group restart)."""
        while True:
            message = self.ranks.broadcast(None)
            kind, args = message[0], message[1:]
            if kind == "stop":
                return
            try:
                getattr(self, f"_{kind}")(*args)
            except RanksFailed:
                raise
            except BiosError as exc:  # a refusal rank 0 met the same way (validation is the same code)
                log.debug("replica %s refused: %s", kind, exc)

    def _noop(self) -> None:
        pass

    def _base(self, entry: Any) -> None:
        self.pool.get(entry)

    def _model(self, model_id: str, entry: Any, lora: Any, config: Any) -> None:
        from train_service.sessions import TrainingModel

        base = self.pool.get(entry)
        adapter = base.new_adapter(model_id, config, lora.seed)
        self.models[model_id] = TrainingModel(model_id, "", "", entry, base, lora, adapter, None)
        self.adapters[model_id], self.bases[model_id] = adapter, base

    def _load(self, model_id: str, state: dict, saved_optimizer: dict | None) -> None:
        self.models[model_id].apply_state(state, saved_optimizer, "load_state.path")

    def _sampler(self, sampler_id: str, entry: Any, config: Any, state: dict | None) -> None:
        base = self.pool.get(entry)
        adapter = None
        if config is not None:
            adapter = base.new_adapter(sampler_id, config, field="model_path")
            adapter.load_state_dict(state, "model_path")
            for p in adapter.parameters():
                p.requires_grad_(False)
        self.adapters[sampler_id], self.bases[sampler_id] = adapter, base

    def _optim_step(self, model_id: str, request: bytes) -> None:
        from bios.v1 import train_pb2

        self.models[model_id].optim_step(train_pb2.OptimStepRequest.FromString(request))

    def _drop(self, ids: list[str]) -> None:
        for key in ids:
            self.models.pop(key, None)
            self.adapters.pop(key, None)
            self.bases.pop(key, None)

    def _pass(self, backward: bool, parts: list) -> None:
        from train_service import worker
        from train_service.losses import get_loss
        from train_service.passes import Rows
        from train_service.scheduler import ForwardWork, PassPlan

        plan = PassPlan(backward)
        for wid, model_id, first, last, n_rows, (ids, targets, inputs), loss_fn, config in parts:
            work = self.works.get(wid)
            if work is None:
                loss, _ = get_loss(loss_fn, config)
                rows = Rows([None] * n_rows, [None] * n_rows, [None] * n_rows)
                work = ForwardWork(self.models[model_id], rows, loss, config, backward, _nothing, loss_fn, wid=wid)
                self.works[wid] = work
            work.rows.ids[first:last], work.rows.targets[first:last], work.rows.inputs[first:last] = ids, targets, inputs
            plan.parts.append((work, first, last))
        for work in worker.run_plan(plan):
            self.works.pop(work.wid, None)

    def _group(self, gid: int, members: list) -> None:
        from train_service.sampler import DecodeGroup, SampleRequest
        from train_service.scheduler import SampleWork

        works = []
        for key, prompt, options, num_samples in members:
            request = SampleRequest(prompt, options, num_samples, self.adapters.get(key), None)
            works.append(SampleWork(self.bases[key], request))
            works[-1].key = key
        self.groups[gid] = DecodeGroup(works[0].base, works, gid=gid)

    def _step(self, gid: int) -> None:
        group = self.groups[gid]
        group.step()
        if not group.active:
            del self.groups[gid]


def _nothing(work: Any) -> None:
    """A replica's requests answer nobody."""


def follow(ranks: Ranks, device: Any) -> None:
    """Run a follower rank until rank 0 stops; then leave the process group."""
    try:
        Follower(ranks, device).run()
    finally:
        ranks.close()
