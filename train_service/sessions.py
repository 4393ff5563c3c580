"""Sessions, training models and samplers: the train service's state, and the operations on it.

A training model owns its adapter (train_service.lora), its optimizer and its gradient; the base model
it runs on is shared and never changes. Operation methods run on the engine thread; everything else
runs on the event loop. A failed operation raises before touching state where it can (validation
first), so a bad request never corrupts a session.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from peft import PeftModel

from bios import placement, types, wire
from bios.errors import BiosError, FailedPreconditionError, InvalidArgumentError, NotFoundError
from bios.v1 import train_pb2
from render_service.model_registry import ModelEntry, resolve
from render_service.tokenizers import load_tokenizer
from train_service import checkpoint_layout as layout
from train_service import checkpoints, data, optimizer
from train_service.checkpoint_layout import validate_name
from train_service.checkpoints import CheckpointStore
from train_service.engine import Engine
from train_service.lora import Adapter, target_names
from train_service.losses import get_loss
from train_service.metrics import CHECKPOINT_BYTES, record_operation
from train_service.models import BaseModel, BaseModelPool, load_weights
from train_service.replay import Mirror
from train_service.scheduler import ForwardWork, Limits

RESULT_WINDOW = 4096  # answered operations remembered per model, for resubmitted sequence numbers


@dataclass
class TrainingModel:
    model_id: str
    session_id: str
    tenant: str
    entry: ModelEntry  # this model's own name, tokenizer and renderer (the base weights may be shared)
    base: BaseModel
    lora: types.LoraConfig
    adapter: Adapter
    store: CheckpointStore | None  # None on the ranks that follow rank 0: they have no checkpoint disk
    step: int = 0
    has_gradient: bool = False  # a forward_backward since the last optim_step
    optimizer: torch.optim.AdamW = field(init=False)  # made in __post_init__
    results: OrderedDict[int, Any] = field(default_factory=OrderedDict)  # seq -> asyncio future of the event
    max_seq: int = -1
    mirror: Mirror = field(default_factory=Mirror)  # what this model does, sent to the other ranks

    def __post_init__(self) -> None:
        self._params = self.adapter.parameters()
        self.optimizer = optimizer.new_optimizer(self._params)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    # ---- sequence numbers: a resubmitted number answers with its original result ----------------------

    def submit_once(self, seq: int, submit: Callable[[], Any], failed: Callable[[Exception], Any]) -> Any:
        """The future of `seq`'s event: the original one when the number was seen before."""
        if seq in self.results:
            return self.results[seq]
        if seq <= self.max_seq:
            return failed(
                FailedPreconditionError(f"seq: {seq} is not after {self.max_seq} and is no longer remembered")
            )
        try:
            future = submit()
        except Exception as exc:  # noqa: BLE001 - answered as this operation's error
            future = failed(exc)
        self.max_seq = seq
        self.results[seq] = future
        while len(self.results) > RESULT_WINDOW:
            self.results.popitem(last=False)
        return future

    def is_new(self, seq: int) -> bool:
        return seq not in self.results and seq > self.max_seq

    # ---- forward / forward_backward: validated here, computed in passes by the engine -----------------

    def forward_work(self, request: train_pb2.ForwardBackwardInput, backward: bool, limits: Limits) -> ForwardWork:
        name = request.loss_fn or "cross_entropy"
        config = dict(request.loss_fn_config)
        loss, needed = get_loss(name, config)
        rows = data.decode_data(list(request.data), self.base.vocab_size, needed, self.base.max_context, limits)
        return ForwardWork(self, rows, loss, config, backward, _forward_output, name)

    def operation(self, request: train_pb2.OperationRequest, kind: str | None) -> Callable[[], Any]:
        """The engine call of an operation other than forward / forward_backward, answering its event."""
        event = lambda **kw: train_pb2.OperationEvent(seq=request.seq, **kw)  # noqa: E731
        ops = {
            "optim_step": lambda: event(optim_step=self.optim_step(request.optim_step)),
            "save_state": lambda: event(checkpoint=self.save_state(request.save_state)),
            "save_weights_for_sampler": lambda: event(
                checkpoint=self.save_weights_for_sampler(request.save_weights_for_sampler)
            ),
            "load_state": lambda: event(
                load_state=train_pb2.LoadStateResponse(
                    step=self.load_state(request.load_state.path, request.load_state.load_optimizer)
                )
            ),
        }
        if kind not in ops:
            raise InvalidArgumentError(f"op: request seq {request.seq} names no operation")
        return ops[kind]

    # ---- operations (engine thread) -------------------------------------------------------------------

    def optim_step(self, request: train_pb2.OptimStepRequest) -> train_pb2.OptimStepResponse:
        optimizer.validate_adam(request.adam_params)
        if not self.has_gradient:
            raise FailedPreconditionError("optim_step: no gradient since the last step (call forward_backward first)")
        self.mirror.send("optim_step", self.model_id, request.SerializeToString())
        self.has_gradient = False  # consumed whether the step is taken or refused
        metrics = optimizer.adam_step(self.optimizer, self._params, request.adam_params)
        self.step += 1
        return train_pb2.OptimStepResponse(metrics={**metrics, "step": float(self.step)}, step=self.step)

    def _store(self) -> CheckpointStore:
        assert self.store is not None, "only rank 0 reads and writes checkpoints"
        return self.store

    def _meta(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return {"base_model": self.entry.name, "step": self.step, "metadata": metadata, "lora": self.lora.model_dump()}

    def _write_adapter(self, directory: Path) -> None:
        checkpoints.write_adapter(directory, self.adapter.config, self.adapter.state_dict())

    def save_state(self, request: train_pb2.SaveStateRequest) -> train_pb2.Checkpoint:
        validate_name(request.name, "save_state.name")
        metadata = wire.json_object(request.metadata_json, "save_state.metadata_json") if request.metadata_json else {}

        def fill(directory: Path) -> None:
            self._write_adapter(directory)
            checkpoints.write_optimizer(directory, self.optimizer, self.step)

        checkpoint = self._store().write(
            self.model_id,
            self.tenant,
            layout.STATE,
            request.name,
            self._meta(metadata),
            fill,
            replace=not request.fail_if_exists,
        )
        CHECKPOINT_BYTES.inc(checkpoint.size_bytes)
        return checkpoint

    def save_weights_for_sampler(self, request: train_pb2.SaveWeightsForSamplerRequest) -> train_pb2.Checkpoint:
        validate_name(request.name, "save_weights_for_sampler.name")
        metadata = (
            wire.json_object(request.metadata_json, "save_weights_for_sampler.metadata_json")
            if request.metadata_json
            else {}
        )
        checkpoint = self._store().write(
            self.model_id, self.tenant, layout.SAMPLER, request.name, self._meta(metadata), self._write_adapter
        )
        CHECKPOINT_BYTES.inc(checkpoint.size_bytes)
        return checkpoint

    def load_state(self, path: str, load_optimizer: bool, field_name: str = "load_state.path") -> int:
        directory, meta = self._store().locate(path, self.tenant, field_name)
        saved_base = meta.get("base_model")
        if saved_base != self.entry.name and _weights_of(saved_base) != self.base.weights:
            raise FailedPreconditionError(
                f"{field_name}: checkpoint is for base model {saved_base!r}, this model is {self.entry.name!r}"
            )
        config, state = checkpoints.read_adapter(directory, field_name)
        mine = self.adapter.config
        theirs = (config.r, float(config.lora_alpha), sorted(config.target_modules or []))
        ours = (mine.r, float(mine.lora_alpha), sorted(target_names(mine)))
        if theirs != ours:
            raise InvalidArgumentError(
                f"{field_name}: the checkpoint's LoRA (rank {theirs[0]}, alpha {theirs[1]:g}, target modules "
                f"{theirs[2]}) differs from this model's (rank {ours[0]}, alpha {ours[1]:g}, target modules {ours[2]})"
            )
        saved_optimizer = checkpoints.read_optimizer(directory, field_name) if load_optimizer else None
        self.mirror.send("load", self.model_id, state, saved_optimizer)  # the other ranks have no checkpoint disk
        return self.apply_state(state, saved_optimizer, field_name)

    def apply_state(self, state: dict[str, torch.Tensor], saved_optimizer: dict | None, field_name: str) -> int:
        """Adapter weights (and optimizer state and step) read from a checkpoint, in place of this model's."""
        self.adapter.load_state_dict(state, field_name)  # validates every tensor before copying any
        self.optimizer = optimizer.new_optimizer(self._params)
        if saved_optimizer is not None:
            self.optimizer.load_state_dict(saved_optimizer["optimizer"])
            self.step = int(saved_optimizer["step"])
        for p in self._params:
            p.grad = None
        self.has_gradient = False
        return self.step


def _weights_of(name: str | None) -> str | None:
    try:
        return resolve(name).weights if name else None
    except Exception:  # noqa: BLE001 - a name that no longer resolves matches nothing
        return None


def _forward_output(work: ForwardWork) -> train_pb2.ForwardBackwardOutput:
    """The answer of a forward / forward_backward, from the parts computed in one or more passes."""
    logprobs = [lp for r in work.results for lp in r.logprobs]
    losses = [el for r in work.results for el in r.losses]
    outputs = [
        train_pb2.LossFnOutput(
            tensors={"logprobs": wire.array_to_tensor(lp), "elementwise_loss": wire.array_to_tensor(el)}
        )
        for lp, el in zip(logprobs, losses)
    ]
    total = float(np.sum([r.loss for r in work.results]))
    return train_pb2.ForwardBackwardOutput(
        loss_fn_outputs=outputs, metrics={"loss:sum": total, "tokens:sum": float(work.rows.tokens)}
    )


@dataclass
class Sampler:
    sampler_id: str
    session_id: str
    tenant: str
    entry: ModelEntry
    base: BaseModel
    adapter: Adapter | None  # None: the plain base model
    model_path: str = ""


@dataclass
class Session:
    session_id: str
    tenant: str
    tags: dict[str, str]
    model_ids: set[str] = field(default_factory=set)
    sampler_ids: set[str] = field(default_factory=set)


class SessionManager:
    """All sessions, models and samplers of this process, under one lock."""

    def __init__(
        self,
        store: CheckpointStore,
        pool: BaseModelPool | None = None,
        pod: int | None = None,
        allow_local_paths: bool = True,
        mirror: Mirror | None = None,
    ):
        """`pod`: this replica's StatefulSet ordinal, written into every id it issues (bios.placement);
        `allow_local_paths`: may callers name base models by server directory (model_registry.resolve)?"""
        self.store = store
        self.pod = pod
        self.allow_local_paths = allow_local_paths
        self.pool = pool or BaseModelPool()
        self.mirror = mirror or Mirror()  # creations sent to the other ranks (train_service.replay)
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.lock = threading.Lock()

    def _new_id(self, prefix: str) -> str:
        return placement.new_id(prefix, self.pod)

    # Lookups answer NOT_FOUND for another tenant's objects too, so nothing about them leaks.
    def create_session(self, tags: dict[str, str], tenant: str) -> Session:
        session = Session(self._new_id("session"), tenant, dict(tags))
        with self.lock:
            self.sessions[session.session_id] = session
        return session

    def session(self, session_id: str, tenant: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != tenant:
            raise NotFoundError(f"session_id: unknown session {session_id!r}")
        return session

    def model(self, model_id: str, tenant: str) -> TrainingModel:
        model = self.models.get(model_id)
        if model is None or model.tenant != tenant:
            raise NotFoundError(f"model_id: unknown model {model_id!r}")
        return model

    def sampler(self, sampler_id: str, tenant: str) -> Sampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant != tenant:
            raise NotFoundError(f"sampler_id: unknown sampler {sampler_id!r}")
        return sampler

    def entry(self, base_model: str) -> ModelEntry:
        try:
            return resolve(base_model, self.allow_local_paths)
        except BiosError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed registry file, a bad path
            raise InvalidArgumentError(f"base_model: {exc}") from None

    # ---- creation: `prepare_*` loads weights (any thread), `create_*` adds the adapter (engine thread) ----

    def prepare_model(
        self, session_id: str, tenant: str, base_model: str, lora: types.LoraConfig, from_state: str
    ) -> tuple[ModelEntry, BaseModel | None, types.LoraConfig]:
        self.session(session_id, tenant)
        if from_state:
            _, meta = self.store.locate(from_state, tenant, "from_state")
            base_model = base_model or meta["base_model"]
            lora = types.LoraConfig(**meta.get("lora", {}))
        entry = self.entry(base_model)
        return entry, self.pool.preload(entry), lora

    def create_model(
        self,
        session_id: str,
        tenant: str,
        entry: ModelEntry,
        base: BaseModel | None,
        lora: types.LoraConfig,
        from_state: str,
        load_optimizer: bool,
    ) -> TrainingModel:
        session = self.session(session_id, tenant)
        model_id = self._new_id("model")
        base = base or self.pool.get(entry)
        config = base.peft_config(lora, entry.lora_target_modules)
        self.mirror.send("model", model_id, entry, lora, config)
        adapter = base.new_adapter(model_id, config, lora.seed)
        model = TrainingModel(model_id, session_id, tenant, entry, base, lora, adapter, self.store, mirror=self.mirror)
        if from_state:
            try:
                model.load_state(from_state, load_optimizer, "from_state")
            except BaseException:
                self.mirror.send("drop", [model_id])
                raise
        with self.lock:
            self.models[model.model_id] = model
            session.model_ids.add(model.model_id)
        return model

    def prepare_sampler(
        self, session_id: str, tenant: str, base_model: str, model_path: str
    ) -> tuple[ModelEntry, BaseModel | None, Any]:
        self.session(session_id, tenant)
        saved = None
        if model_path:
            directory, meta = self.store.locate(model_path, tenant, "model_path")
            base_model = meta["base_model"]
            saved = checkpoints.read_adapter(directory, "model_path")
        entry = self.entry(base_model)
        return entry, self.pool.preload(entry), saved

    def create_sampler(
        self, session_id: str, tenant: str, entry: ModelEntry, base: BaseModel | None, saved: Any, model_path: str
    ) -> Sampler:
        session = self.session(session_id, tenant)
        sampler_id = self._new_id("sampler")
        base = base or self.pool.get(entry)
        self.mirror.send("sampler", sampler_id, entry, *(saved if saved is not None else (None, None)))
        adapter = None
        if saved is not None:
            config, state = saved
            adapter = base.new_adapter(sampler_id, config, field="model_path")
            adapter.load_state_dict(state, "model_path")
            for p in adapter.parameters():
                p.requires_grad_(False)
        sampler = Sampler(sampler_id, session_id, tenant, entry, base, adapter, model_path)
        with self.lock:
            self.samplers[sampler_id] = sampler
            session.sampler_ids.add(sampler_id)
        return sampler

    def tokenizer(self, entry: ModelEntry) -> Any:
        return load_tokenizer(entry.tokenizer)

    def checkpoint_all(self) -> list[str]:
        """Save every open model's state as `drain-step<N>` (engine thread; used by graceful shutdown)."""
        paths = []
        for model in list(self.models.values()):
            request = train_pb2.SaveStateRequest(
                name=f"drain-step{model.step}", metadata_json=json.dumps({"reason": "server shutdown"})
            )
            paths.append(model.save_state(request).path)
        return paths

    def export_merged(self, directory: Path, meta: dict[str, Any], out: Path) -> None:
        """The base model with a checkpoint's adapter merged in, as a complete HF model directory.

        Works on a fresh fp32 CPU copy of the base weights: the shared copy keeps serving other sessions."""
        entry = self.entry(meta["base_model"])
        merged = PeftModel.from_pretrained(load_weights(entry.weights), str(directory)).merge_and_unload()
        merged.save_pretrained(str(out))
        self.tokenizer(entry).save_pretrained(str(out))

    # ---- the ordered operation stream (event loop) -----------------------------------------------------

    async def submit_operation(
        self, model: TrainingModel, request: train_pb2.OperationRequest, engine: Engine
    ) -> asyncio.Future:
        """The future of this sequence number's event (the original one when the number was seen before)."""
        loop = asyncio.get_running_loop()
        kind = request.WhichOneof("op")
        started = time.perf_counter()

        def failed(exc: Exception) -> asyncio.Future:
            future = loop.create_future()
            future.set_exception(exc)
            return future

        prepared: Any = None
        if kind in ("forward", "forward_backward") and model.is_new(request.seq):
            try:  # validation and decoding off the event loop: a request may hold 10^5 datums
                prepared = await asyncio.to_thread(
                    model.forward_work, getattr(request, kind), kind == "forward_backward", engine.limits
                )
            except Exception as exc:  # noqa: BLE001 - answered as this operation's error
                prepared = exc

        def submit() -> asyncio.Future:
            if self.models.get(model.model_id) is not model:  # deleted (or its session closed) meanwhile
                raise NotFoundError(f"model_id: model {model.model_id} was deleted")
            if isinstance(prepared, Exception):
                raise prepared
            if prepared is not None:
                output = prepared.finish
                prepared.finish = lambda work: train_pb2.OperationEvent(seq=request.seq, forward_backward=output(work))
                work = prepared
            else:
                work = model.operation(request, kind)
            future = asyncio.wrap_future(engine.submit(model.model_id, work))
            future.add_done_callback(lambda f: record_operation(kind, started, f))
            return future

        return model.submit_once(request.seq, submit, failed)

    # ---- removal: nothing on the shared base changes, so this needs no engine turn ----------------------

    def delete_model(self, model_id: str, tenant: str) -> TrainingModel:
        model = self.model(model_id, tenant)
        with self.lock:
            self.models.pop(model_id, None)
            session = self.sessions.get(model.session_id)
            if session is not None:
                session.model_ids.discard(model_id)
        return model

    def close_session(self, session_id: str, tenant: str) -> list[str]:
        """Forget a session and everything in it; returns the ids of its models and samplers."""
        session = self.session(session_id, tenant)
        with self.lock:
            del self.sessions[session_id]
            for model_id in session.model_ids:
                self.models.pop(model_id, None)
            for sampler_id in session.sampler_ids:
                self.samplers.pop(sampler_id, None)
        return [*session.model_ids, *session.sampler_ids]
