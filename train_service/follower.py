"""A rank other than 0: replicas of rank 0's bases, adapters and optimizers, driven by its messages
(train_service.replay lists them). The same code as rank 0's runs each one."""

from __future__ import annotations

import logging
import signal
from typing import Any

from bios.errors import BiosError
from bios.v1 import train_pb2
from train_service import worker
from train_service.distributed import Ranks, RanksFailed
from train_service.losses import get_loss
from train_service.models import BaseModelPool
from train_service.passes import Rows
from train_service.sampler import DecodeGroup, SampleRequest
from train_service.scheduler import ForwardWork, PassPlan, SampleWork
from train_service.sessions import TrainingModel

log = logging.getLogger("bios.follower")


class Follower:
    """A rank other than 0: replicas of every base, adapter and optimizer, driven by rank 0's messages."""

    def __init__(self, ranks: Ranks, device: Any):
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
        base = self.pool.get(entry)
        adapter = base.new_adapter(model_id, config, lora.seed)
        self.models[model_id] = TrainingModel(model_id, "", "", entry, base, lora, adapter, None)  # no checkpoints
        self.adapters[model_id], self.bases[model_id] = adapter, base

    def _load(self, model_id: str, state: dict, saved_optimizer: dict | None) -> None:
        self.models[model_id].apply_state(state, saved_optimizer, "load_state.path")

    def _sampler(self, sampler_id: str, entry: Any, config: Any, state: dict | None) -> None:
        base = self.pool.get(entry)
        adapter = None
        if config is not None:
            assert state is not None  # rank 0 sends a config with its adapter's state
            adapter = base.new_adapter(sampler_id, config, field="model_path")
            adapter.load_state_dict(state, "model_path")
            for p in adapter.parameters():
                p.requires_grad_(False)
        self.adapters[sampler_id], self.bases[sampler_id] = adapter, base

    def _optim_step(self, model_id: str, request: bytes) -> None:
        self.models[model_id].optim_step(train_pb2.OptimStepRequest.FromString(request))

    def _drop(self, ids: list[str]) -> None:
        for key in ids:
            self.models.pop(key, None)
            self.adapters.pop(key, None)
            self.bases.pop(key, None)

    def _pass(self, backward: bool, parts: list) -> None:
        plan = PassPlan(backward)
        for wid, model_id, first, last, n_rows, (ids, targets, inputs), loss_fn, config in parts:
            work = self.works.get(wid)
            if work is None:
                loss, _ = get_loss(loss_fn, config)
                rows = Rows(_unfilled(n_rows), _unfilled(n_rows), _unfilled(n_rows))
                work = ForwardWork(self.models[model_id], rows, loss, config, backward, _nothing, loss_fn, wid=wid)
                self.works[wid] = work
            work.rows.ids[first:last], work.rows.targets[first:last], work.rows.inputs[first:last] = (
                ids,
                targets,
                inputs,
            )
            plan.parts.append((work, first, last))
        for work in worker.run_plan(plan):
            self.works.pop(work.wid, None)

    def _group(self, gid: int, members: list) -> None:
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
    """Run a follower rank until rank 0 stops; then leave the process group.

    SIGTERM (torchrun forwards the kubelet's to every rank) is left to rank 0: it drains, checkpoints and then
    tells the others to stop. A follower that died on it would break the group in the middle of the drain."""

    def leave_it_to_rank_0(signum: int, frame: Any) -> None:
        log.info("rank %d: %s received; rank 0 drains the group and stops it", ranks.rank, signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, leave_it_to_rank_0)
    signal.signal(signal.SIGINT, leave_it_to_rank_0)
    try:
        Follower(ranks, device).run()
    finally:
        ranks.close()


def _unfilled(n: int) -> list[Any]:
    """n empty rows (None) of a request split over several passes: each pass's part fills its own."""
    return [None] * n
