"""Sessions, training models and samplers: the train service's state, and the operations on it.

Operation methods run on the engine thread (never two at once); everything else runs on the event
loop. A failed operation raises before touching state where it can (validation first), so a bad
request never corrupts a session.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from bios import placement, types, wire
from bios.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from bios.v1 import train_pb2
from render_service.model_registry import ModelEntry, resolve
from train_service import compute
from train_service.checkpoints import CheckpointStore, validate_name
from train_service.metrics import CHECKPOINT_BYTES
from train_service.models import BaseModel, BaseModelPool

RESULT_WINDOW = 4096  # answered operations remembered per model, for resubmitted sequence numbers


@dataclass
class TrainingModel:
    model_id: str
    session_id: str
    tenant: str
    base: BaseModel
    lora: types.LoraConfig
    store: CheckpointStore
    step: int = 0
    optimizer: torch.optim.AdamW | None = None
    results: OrderedDict[int, Any] = field(default_factory=OrderedDict)  # seq -> asyncio future of the event
    max_seq: int = -1

    @property
    def adapter(self) -> str:
        return self.model_id.replace("-", "_")

    def params(self) -> list[torch.nn.Parameter]:
        return self.base.adapter_parameters(self.adapter)

    def make_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params(), lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    # ---- operations (engine thread) ---------------------------------------------------------------

    def forward_backward(self, request: train_pb2.ForwardBackwardInput, backward: bool) -> train_pb2.ForwardBackwardOutput:
        from train_service.losses import get_loss

        config = dict(request.loss_fn_config)
        _, needed = get_loss(request.loss_fn or "cross_entropy", config)
        batch = compute.decode_batch(list(request.data), self.base.vocab_size, needed)
        self.base.activate(self.adapter)
        result = compute.forward_backward(self.base.causal_lm, batch, request.loss_fn or "cross_entropy", config,
                                          backward)
        outputs = [train_pb2.LossFnOutput(tensors={"logprobs": wire.array_to_tensor(lp),
                                                   "elementwise_loss": wire.array_to_tensor(el)})
                   for lp, el in zip(result.logprobs, result.losses)]
        tokens = float(sum(batch.lengths))
        return train_pb2.ForwardBackwardOutput(loss_fn_outputs=outputs,
                                               metrics={"loss:sum": result.loss, "tokens:sum": tokens})

    def optim_step(self, request: train_pb2.OptimStepRequest) -> train_pb2.OptimStepResponse:
        metrics = compute.adam_step(self.optimizer, self.params(), request.adam_params)
        self.step += 1
        return train_pb2.OptimStepResponse(metrics={**metrics, "step": float(self.step)}, step=self.step)

    def _adapter_files(self, directory: Path) -> None:
        state = get_peft_model_state_dict(self.base.model, adapter_name=self.adapter)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, directory / "adapter_model.safetensors")
        config = self.base.model.peft_config[self.adapter]
        config.save_pretrained(str(directory))

    def _meta(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return {"base_model": self.base.entry.name, "step": self.step, "metadata": metadata,
                "lora": self.lora.model_dump()}

    def save_state(self, request: train_pb2.SaveStateRequest) -> train_pb2.Checkpoint:
        validate_name(request.name, "save_state.name")
        try:
            metadata = json.loads(request.metadata_json) if request.metadata_json else {}
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"save_state.metadata_json: not JSON: {exc}") from None

        def fill(directory: Path) -> None:
            self._adapter_files(directory)
            torch.save({"optimizer": self.optimizer.state_dict(), "step": self.step}, directory / "optimizer.pt")

        checkpoint = self.store.write(self.model_id, self.tenant, "state", request.name, self._meta(metadata), fill)
        CHECKPOINT_BYTES.inc(checkpoint.size_bytes)
        return checkpoint

    def save_weights_for_sampler(self, request: train_pb2.SaveWeightsForSamplerRequest) -> train_pb2.Checkpoint:
        validate_name(request.name, "save_weights_for_sampler.name")
        checkpoint = self.store.write(self.model_id, self.tenant, "sampler", request.name, self._meta({}),
                                      self._adapter_files)
        CHECKPOINT_BYTES.inc(checkpoint.size_bytes)
        return checkpoint

    def load_state(self, path: str, load_optimizer: bool, field_name: str = "load_state.path") -> int:
        directory, meta = self.store.locate(path, self.tenant, field_name)
        if meta.get("base_model") != self.base.entry.name and resolve(meta["base_model"]).weights != self.base.entry.weights:
            raise FailedPreconditionError(f"{field_name}: checkpoint is for base model {meta.get('base_model')!r}, "
                                          f"this model is {self.base.entry.name!r}")
        if load_optimizer and not (directory / "optimizer.pt").is_file():
            raise FailedPreconditionError(f"{field_name}: {path} holds no optimizer state (a sampler checkpoint?)")
        weights = load_file(str(directory / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(self.base.model, weights, adapter_name=self.adapter)
        if getattr(result, "unexpected_keys", None):
            raise FailedPreconditionError(f"{field_name}: adapter shapes do not match this model's LoRA config")
        self.make_optimizer()
        if load_optimizer:
            saved = torch.load(directory / "optimizer.pt", weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.step = int(saved["step"])
        return self.step


@dataclass
class Sampler:
    sampler_id: str
    session_id: str
    tenant: str
    base: BaseModel
    adapter: str | None  # None: the plain base model
    model_path: str = ""


@dataclass
class Session:
    session_id: str
    tenant: str
    tags: dict[str, str]
    model_ids: set[str] = field(default_factory=set)
    sampler_ids: set[str] = field(default_factory=set)


class SessionManager:
    """All sessions, models and samplers of this process. Mutations happen on the engine thread or
    under the lock, so the gRPC handlers and the engine see a consistent picture."""

    def __init__(self, store: CheckpointStore, pool: BaseModelPool | None = None, pod: int | None = None):
        """`pod`: this replica's StatefulSet ordinal, written into every id it issues (bios.placement)."""
        self.store = store
        self.pod = pod
        self.pool = pool or BaseModelPool()
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
            return resolve(base_model)
        except NotFoundError:
            raise
        except Exception as exc:  # a malformed registry file, a bad path
            raise InvalidArgumentError(f"base_model: {exc}") from None

    # engine thread: these load weights and change the shared peft model
    def create_model(self, session_id: str, tenant: str, base_model: str, lora: types.LoraConfig, from_state: str,
                     load_optimizer: bool) -> TrainingModel:
        session = self.session(session_id, tenant)
        if from_state:
            _, meta = self.store.locate(from_state, tenant, "from_state")
            base_model = base_model or meta["base_model"]
            lora = types.LoraConfig(**meta.get("lora", {}))
        base = self.pool.get(self.entry(base_model))
        model = TrainingModel(self._new_id("model"), session_id, tenant, base, lora, self.store)
        base.add_adapter(model.adapter, lora)
        try:
            model.make_optimizer()
            if from_state:
                model.load_state(from_state, load_optimizer, "from_state")
        except BaseException:
            base.remove_adapter(model.adapter)
            raise
        with self.lock:
            self.models[model.model_id] = model
            session.model_ids.add(model.model_id)
        return model

    def create_sampler(self, session_id: str, tenant: str, base_model: str, model_path: str) -> Sampler:
        session = self.session(session_id, tenant)
        adapter = None
        if model_path:
            directory, meta = self.store.locate(model_path, tenant, "model_path")
            base = self.pool.get(self.entry(meta["base_model"]))
            sampler_id = self._new_id("sampler")
            adapter = sampler_id.replace("-", "_")
            config = PeftLoraConfig.from_pretrained(str(directory))
            base.add_adapter_config(adapter, config)
            set_peft_model_state_dict(base.model, load_file(str(directory / "adapter_model.safetensors")),
                                      adapter_name=adapter)
        else:
            base = self.pool.get(self.entry(base_model))
            sampler_id = self._new_id("sampler")
        sampler = Sampler(sampler_id, session_id, tenant, base, adapter, model_path)
        with self.lock:
            self.samplers[sampler_id] = sampler
            session.sampler_ids.add(sampler_id)
        return sampler

    def checkpoint_all(self) -> list[str]:
        """Save every open model's state as `drain-step<N>` (engine thread; used by graceful shutdown)."""
        paths = []
        for model in list(self.models.values()):
            request = train_pb2.SaveStateRequest(name=f"drain-step{model.step}",
                                                 metadata_json=json.dumps({"reason": "server shutdown"}))
            paths.append(model.save_state(request).path)
        return paths

    def export_merged(self, directory: Path, meta: dict[str, Any], out: Path) -> None:
        """The base model with a checkpoint's adapter merged in, as a complete HF model directory.

        Works on a fresh copy of the base weights: the shared copy keeps serving other sessions."""
        from peft import PeftModel

        from train_service.models import load_weights

        entry = self.entry(meta["base_model"])
        merged = PeftModel.from_pretrained(load_weights(entry.weights), str(directory)).merge_and_unload()
        merged.save_pretrained(str(out))
        self.pool.get(entry).tokenizer.save_pretrained(str(out))

    def close_session(self, session_id: str, tenant: str) -> None:
        session = self.session(session_id, tenant)
        with self.lock:
            del self.sessions[session_id]
        for model_id in session.model_ids:
            model = self.models.pop(model_id)
            model.base.remove_adapter(model.adapter)
        for sampler_id in session.sampler_ids:
            sampler = self.samplers.pop(sampler_id)
            if sampler.adapter:
                sampler.base.remove_adapter(sampler.adapter)
