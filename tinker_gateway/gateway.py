"""The Tinker API on our TrainService: each Tinker call becomes bios calls, each answer a Tinker answer.

Sessions, models and samplers keep our ids (placed ids: they name the train pod, bios.placement). A model
made by loading a checkpoint also answers to the id the SDK computes for it, `<session>:train:<n>`. Long
work (creating a model, training operations, sampling) answers with a future that the SDK polls.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Coroutine

from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb
from tinker.types.try_again_response import TryAgainResponse  # not exported by tinker.types

from bios import types
from bios import wire as bios_wire
from bios.errors import BiosError
from bios.v1 import train_pb2
from tinker_gateway import SUPPORTED_SDK_VERSIONS, wire
from tinker_gateway.backend import Backend
from tinker_gateway.state import PROTO, Call, Futures, Model, Reply, Sampler, Session, json_reply, log
from tinker_gateway.wire import GatewayError, bad
from train_service import checkpoint_layout as layout

TTL_RANGE = (3600, 10 * 365 * 86400)  # Tinker's: one hour to ten years


@dataclass(frozen=True)
class Caller:
    tenant: str
    api_key: str | None  # forwarded to the train service, which checks it again


def _not_found(field: str, value: str) -> GatewayError:
    return GatewayError(404, f"{field}: unknown {field.removesuffix('_id').replace('_', ' ')} {value!r}")


def _ttl(ttl_seconds: int | None) -> float | None:
    if ttl_seconds is None:
        return None
    if not TTL_RANGE[0] <= ttl_seconds <= TTL_RANGE[1]:
        raise bad(
            f"ttl_seconds: must be between {TTL_RANGE[0]} (1 hour) and {TTL_RANGE[1]} (10 years), got {ttl_seconds}"
        )
    return time.time() + ttl_seconds


class Gateway:
    def __init__(
        self,
        backend: Backend,
        poll_seconds: float = 30.0,
        session_timeout: float = 600.0,
        compress_fwdbwd: bool = False,
    ):
        self.backend = backend
        self.poll_seconds = poll_seconds  # retrieve_future holds a poll this long before try_again
        self.session_timeout = session_timeout  # a session without heartbeat this long is closed
        self.compress_fwdbwd = compress_fwdbwd
        self.futures = Futures()
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}  # by our id and by the SDK's id
        self.samplers: dict[str, Sampler] = {}

    # ---- lookups: another tenant's object is as unknown as one that does not exist --------------------

    def _session(self, caller: Caller, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != caller.tenant:
            raise _not_found("session_id", session_id)
        if session.finished:
            raise GatewayError(400, f"session_id: session {session_id} has finished")
        session.last_seen = time.monotonic()
        return session

    def _model(self, caller: Caller, model_id: str) -> Model:
        model = self.models.get(model_id)
        if model is None or model.tenant != caller.tenant:
            raise _not_found("model_id", model_id)
        self._session(caller, model.session_id)
        return model

    def _sampler(self, caller: Caller, sampler_id: str) -> Sampler:
        sampler = self.samplers.get(sampler_id)
        if sampler is None or sampler.tenant != caller.tenant:
            raise _not_found("sampling_session_id", sampler_id)
        return sampler

    def _future(
        self, caller: Caller, request_id: str, work: Callable[[], Awaitable[Reply]], **extra: Any
    ) -> dict[str, Any]:
        self.futures.start(request_id, caller.tenant, work)
        return tt.UntypedAPIFuture(request_id=request_id, **extra).model_dump(mode="json", exclude_none=True)

    # ---- client config and sessions ------------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        # API keys only (no JWT exchange); custom losses run on the client; per-request sample polling.
        return tt.ClientConfigResponse(
            pjwt_auth_enabled=False,
            credential_default_source="api_key",
            proto_compress_fwdbwd=self.compress_fwdbwd,
            custom_loss_server_side=False,
            sample_use_retrieve_futures=False,
            sample_join_sampling_session=False,
        ).model_dump(mode="json")

    async def create_session(self, caller: Caller, request: tt.CreateSessionRequest) -> dict[str, Any]:
        tags = {str(k): str(v) for k, v in (request.user_metadata or {}).items()}
        tags.update({f"tinker.tag.{t}": "" for t in request.tags})
        if request.display_name:
            tags["tinker.display_name"] = request.display_name
        created = await self.backend.call(
            "CreateSession",
            train_pb2.CreateSessionRequest(tags=tags, client_version=f"tinker-python/{request.sdk_version}"),
            caller.api_key,
        )
        self.sessions[created.session_id] = Session(created.session_id, caller.tenant, caller.api_key)
        supported = ", ".join(SUPPORTED_SDK_VERSIONS)
        info: str | None = None
        warning: str | None = None
        if request.sdk_version in SUPPORTED_SDK_VERSIONS:
            info = f"bios Tinker gateway; session {created.session_id} (tinker SDK {supported})"
        else:
            warning = (
                f"bios Tinker gateway supports tinker SDK {supported}; this client is "
                f"{request.sdk_version}, which may use endpoints or fields it lacks"
            )
        return tt.CreateSessionResponse(
            session_id=created.session_id, info_message=info, warning_message=warning
        ).model_dump(mode="json")

    def heartbeat(self, caller: Caller, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != caller.tenant:
            raise _not_found("session_id", session_id)
        if session.finished:
            raise GatewayError(410, f"session_id: session {session_id} has finished")
        session.last_seen = time.monotonic()
        return tt.SessionHeartbeatResponse().model_dump(mode="json")

    async def finish_session(self, caller: Caller, session_id: str) -> dict[str, Any]:
        session = self.sessions.get(session_id)
        if session is None or session.tenant != caller.tenant:
            raise _not_found("session_id", session_id)
        if not session.finished:  # first finish wins, as Tinker's
            await self._close(session)
        return {}

    async def _close(self, session: Session) -> None:
        session.finished = True
        gone = GatewayError(400, f"session_id: session {session.session_id} has finished")
        for key in list(session.model_ids):
            model = self.models.pop(key, None)
            if model is not None:
                model.abandon(gone)
        for key in session.sampler_ids:
            self.samplers.pop(key, None)
        try:
            await self.backend.call(
                "CloseSession", train_pb2.CloseSessionRequest(session_id=session.session_id), session.api_key
            )
        except BiosError as exc:  # e.g. the train service restarted and forgot it
            log.warning("closing session %s: %s", session.session_id, exc)

    async def reap(self) -> None:
        """Close sessions whose client stopped sending heartbeats; forget old futures and sessions."""
        self.futures.sweep()
        now = time.monotonic()
        for session in list(self.sessions.values()):
            idle = now - session.last_seen
            if not session.finished and idle > self.session_timeout:
                log.info("session %s: no heartbeat for %.0f s, closing it", session.session_id, idle)
                await self._close(session)
            elif session.finished and idle > self.futures.keep_seconds:
                del self.sessions[session.session_id]

    # ---- models --------------------------------------------------------------------------------

    def _register(
        self,
        session: Session,
        caller: Caller,
        info: train_pb2.ModelInfo,
        tinker_id: str,
        user_metadata: dict[str, Any] | None,
    ) -> Model:
        model = Model(
            info.model_id,
            tinker_id,
            session.session_id,
            caller.tenant,
            info.base_model,
            info.tokenizer,
            info.lora_rank,
            {str(k): str(v) for k, v in (user_metadata or {}).items()},
            self.backend.operations(info.model_id, caller.api_key),
        )
        for key in {info.model_id, tinker_id}:
            self.models[key] = model
            session.model_ids.add(key)
        return model

    def create_model(self, caller: Caller, request: tt.CreateModelRequest) -> dict[str, Any]:
        session = self._session(caller, request.session_id)
        if request.optimizer_config.type != "adamw":
            raise bad(f"optimizer_config.type: only adamw is supported, got {request.optimizer_config.type!r}")
        lora = request.lora_config or tt.LoraConfig(rank=32)
        pb = bios_wire.lora_config_to_pb(
            types.LoraConfig(
                rank=lora.rank,
                seed=secrets.randbelow(2**31) if lora.seed is None else lora.seed,
                train_attn=lora.train_attn,
                train_mlp=lora.train_mlp,
                train_unembed=lora.train_unembed,
            )
        )

        async def work() -> Reply:
            info = await self.backend.call(
                "CreateModel",
                train_pb2.CreateModelRequest(session_id=session.session_id, base_model=request.base_model, lora=pb),
                caller.api_key,
            )
            self._register(session, caller, info, info.model_id, request.user_metadata)
            return json_reply(tt.CreateModelResponse(model_id=info.model_id))

        return self._future(caller, f"{session.session_id}:create_model:{request.model_seq_id}", work)

    def get_info(self, caller: Caller, request: tt.GetInfoRequest) -> dict[str, Any]:
        model = self._model(caller, request.model_id)
        return tt.GetInfoResponse(
            model_id=request.model_id,
            is_lora=True,
            lora_rank=model.lora_rank,
            model_name=model.base_model,
            model_data=tt.ModelData(arch="lora", model_name=model.base_model, tokenizer_id=model.tokenizer),
        ).model_dump(mode="json")

    def load_weights(self, caller: Caller, request: tt.LoadWeightsRequest) -> dict[str, Any]:
        path = wire.to_bios_path(request.path)
        if request.session_id is None:  # the older form: load into an existing model, in sequence
            if request.model_id is None or request.seq_id is None:
                raise bad("load_weights: give session_id and model_seq_id, or model_id and seq_id")
            op = train_pb2.LoadStateRequest(path=path, load_optimizer=request.optimizer)
            return self._sequenced(
                caller,
                request.model_id,
                request.seq_id,
                {"load_state": op},
                lambda model, event: json_reply(tt.LoadWeightsResponse(path=request.path)),
            )
        session = self._session(caller, request.session_id)
        if request.model_seq_id is None:
            raise bad("model_seq_id: required with session_id")
        if request.optimizer_config is not None and request.optimizer_config.type != "adamw":
            raise bad(f"optimizer_config.type: only adamw is supported, got {request.optimizer_config.type!r}")
        tinker_id = f"{session.session_id}:train:{request.model_seq_id}"  # the id the SDK computes

        async def work() -> Reply:
            info = await self.backend.call(
                "CreateModel",
                train_pb2.CreateModelRequest(
                    session_id=session.session_id,
                    base_model=request.base_model or "",
                    from_state=path,
                    load_optimizer=request.optimizer,
                ),
                caller.api_key,
            )
            self._register(session, caller, info, tinker_id, request.user_metadata)
            return json_reply(tt.LoadWeightsResponse(path=request.path, model_id=tinker_id))

        return self._future(caller, f"{session.session_id}:load_weights:{request.model_seq_id}", work)

    # ---- operations in sequence order ------------------------------------------------------------

    def _sequenced(
        self,
        caller: Caller,
        model_id: str,
        seq_id: int | None,
        op: dict[str, Any] | None,
        finish: Callable[[Model, train_pb2.OperationEvent], Reply | Coroutine[Any, Any, Reply]],
        refused: GatewayError | None = None,
    ) -> dict[str, Any]:
        """Queue one operation under the caller's seq_id. `refused`: the request was invalid; its number is
        still spent so the model's later operations go on, and the caller gets the error."""
        model = self._model(caller, model_id)
        if seq_id is None:
            raise bad("seq_id: required")
        request_id = f"{model.model_id}:op:{seq_id}"
        if self.futures.get(request_id, caller.tenant) is not None:  # a resubmission: its first answer
            return tt.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump(
                mode="json", exclude_none=True
            )
        if refused is not None or op is None:
            model.enqueue(seq_id, None)
            raise refused or bad("op: no operation")
        sent = model.enqueue(seq_id, lambda: model.stream.submit(**op))

        async def work() -> Reply:
            event = await asyncio.wrap_future(await sent)
            reply = finish(model, event)
            return await reply if asyncio.iscoroutine(reply) else reply

        return self._future(caller, request_id, work, model_id=model_id)

    def forward_backward(self, caller: Caller, msg: tpb.ForwardBackwardRequest) -> dict[str, Any]:
        op, refused = None, None
        try:
            op = {"forward" if msg.forward_only else "forward_backward": wire.forward_backward_input(msg)}
        except GatewayError as exc:
            refused = exc
        return self._sequenced(
            caller,
            msg.model_id,
            msg.seq_id,
            op,
            lambda model, event: Reply(wire.forward_backward_output(event.forward_backward), PROTO),
            refused,
        )

    def optim_step(self, caller: Caller, request: tt.OptimStepRequest) -> dict[str, Any]:
        op, refused = None, None
        try:
            op = {"optim_step": train_pb2.OptimStepRequest(adam_params=wire.adam_params(request.optim_params))}
        except GatewayError as exc:
            refused = exc
        return self._sequenced(
            caller,
            request.model_id,
            request.seq_id,
            op,
            lambda model, event: json_reply(tt.OptimStepResponse(metrics=wire.optim_step_metrics(event.optim_step))),
            refused,
        )

    @staticmethod
    def _checkpoint_metadata(model: Model, user_metadata: dict[str, str] | None, expires: float | None) -> str:
        """Stored with the checkpoint, so a run's metadata outlives its session (resume reads it back)."""
        return json.dumps(
            {
                "tinker": {
                    "user_metadata": user_metadata or {},
                    "expires_unix": expires,
                    "run_user_metadata": model.user_metadata,
                    "lora_rank": model.lora_rank,
                }
            }
        )

    def save_weights(self, caller: Caller, request: tt.SaveWeightsRequest) -> dict[str, Any]:
        model = self._model(caller, request.model_id)
        op, refused = None, None
        try:
            metadata = self._checkpoint_metadata(model, request.user_metadata, _ttl(request.ttl_seconds))
            op = {
                "save_state": train_pb2.SaveStateRequest(
                    name=request.path or f"seq-{request.seq_id}",
                    metadata_json=metadata,
                    fail_if_exists=not request.overwrite,
                )
            }
        except GatewayError as exc:
            refused = exc
        return self._sequenced(
            caller,
            request.model_id,
            request.seq_id,
            op,
            lambda model, event: json_reply(tt.SaveWeightsResponse(path=wire.to_tinker_path(event.checkpoint.path))),
            refused,
        )

    def save_weights_for_sampler(self, caller: Caller, request: tt.SaveWeightsForSamplerRequest) -> dict[str, Any]:
        model = self._model(caller, request.model_id)
        op, refused, ephemeral = None, None, request.path is None
        try:
            if ephemeral and request.sampling_session_seq_id is None:
                raise bad("save_weights_for_sampler: give path, or sampling_session_seq_id for ephemeral weights")
            if request.kind not in ("snapshot", "inflight"):
                raise bad(f"kind: {request.kind!r} is not supported (snapshot or inflight)")
            name = f"ephemeral-{request.sampling_session_seq_id}" if ephemeral else request.path
            metadata = self._checkpoint_metadata(model, request.user_metadata, _ttl(request.ttl_seconds))
            op = {"save_weights_for_sampler": train_pb2.SaveWeightsForSamplerRequest(name=name, metadata_json=metadata)}
        except GatewayError as exc:
            refused = exc

        async def finish(model: Model, event: train_pb2.OperationEvent) -> Reply:
            path = event.checkpoint.path
            if not ephemeral:
                return json_reply(tt.SaveWeightsForSamplerResponseInternal(path=wire.to_tinker_path(path)))
            # Ephemeral weights: a sampler holds them in memory, so the files are removed at once. An
            # inflight sampler keeps these weights too: Tinker lets it lag behind newer ones.
            session = self.sessions[model.session_id]
            sampler = await self._new_sampler(
                caller, session, train_pb2.CreateSamplerRequest(session_id=session.session_id, model_path=path), None
            )
            await self.backend.call("DeleteCheckpoint", train_pb2.DeleteCheckpointRequest(path=path), caller.api_key)
            return json_reply(tt.SaveWeightsForSamplerResponseInternal(sampling_session_id=sampler.sampler_id))

        return self._sequenced(caller, request.model_id, request.seq_id, op, finish, refused)

    # ---- sampling --------------------------------------------------------------------------------

    async def _new_sampler(
        self, caller: Caller, session: Session, request: train_pb2.CreateSamplerRequest, tinker_path: str | None
    ) -> Sampler:
        info = await self.backend.call("CreateSampler", request, caller.api_key)
        sampler = Sampler(
            info.sampler_id, session.session_id, caller.tenant, info.base_model, tinker_path, list(info.eos_token_ids)
        )
        self.samplers[sampler.sampler_id] = sampler
        session.sampler_ids.add(sampler.sampler_id)
        return sampler

    async def create_sampling_session(self, caller: Caller, request: tt.CreateSamplingSessionRequest) -> dict[str, Any]:
        session = self._session(caller, request.session_id)
        pb = train_pb2.CreateSamplerRequest(session_id=session.session_id)
        if request.model_path:
            pb.model_path = wire.to_bios_path(request.model_path, "model_path")
        elif request.base_model:
            pb.base_model = request.base_model
        else:
            raise bad("create_sampling_session: give model_path or base_model")
        # A retried request (same seq id) gets the sampler of the first one.
        task = session.sampling_sessions.get(request.sampling_session_seq_id)
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.get_running_loop().create_task(self._new_sampler(caller, session, pb, request.model_path))
            session.sampling_sessions[request.sampling_session_seq_id] = task
        sampler = await asyncio.shield(task)
        return tt.CreateSamplingSessionResponse(sampling_session_id=sampler.sampler_id).model_dump(mode="json")

    def get_sampler(self, caller: Caller, sampler_id: str) -> dict[str, Any]:
        sampler = self._sampler(caller, sampler_id)
        return tt.GetSamplerResponse(
            sampler_id=sampler.sampler_id, base_model=sampler.base_model, model_path=sampler.model_path
        ).model_dump(mode="json")

    def asample(self, caller: Caller, request: tt.SampleRequest) -> dict[str, Any]:
        if request.sampling_session_id is None or request.seq_id is None:
            raise bad("sampling_session_id and seq_id: required (create a sampling session first)")
        sampler = self._sampler(caller, request.sampling_session_id)
        request_id = f"{sampler.sampler_id}:sample:{request.seq_id}"
        sequence_ids = [f"{request_id}:{i}" for i in range(request.num_samples)]
        if self.futures.get(request_id, caller.tenant) is None:
            wire.check_sample_request(request)
            pb = train_pb2.SampleRequest(
                sampler_id=sampler.sampler_id,
                prompt=wire.model_input(request.prompt),
                sampling_params=wire.sampling_params(request.sampling_params, sampler.eos_token_ids),
                num_samples=request.num_samples,
                include_prompt_logprobs=bool(request.prompt_logprobs),
            )

            async def work() -> Reply:
                result = await self.backend.sample(pb, caller.api_key)
                return Reply(wire.sample_response(result, request.prompt_logprobs_last_n), PROTO)

            self.futures.start(request_id, caller.tenant, work)
        return tt.UntypedAPIFuture(request_id=request_id, sample_sequence_ids=sequence_ids).model_dump(
            mode="json", exclude_none=True
        )

    def cancel(self, caller: Caller, request_id: str) -> dict[str, Any]:
        call = self.futures.get(request_id, caller.tenant)
        if call is not None and ":sample:" in request_id:  # only sampling stops early, as Tinker's
            call.task.cancel()
        return {}

    # ---- futures ---------------------------------------------------------------------------------

    async def retrieve(self, caller: Caller, request: tt.FutureRetrieveRequest) -> Reply:
        call: Call | None = self.futures.get(request.request_id, caller.tenant)
        if call is None:
            raise _not_found("request_id", request.request_id)
        reply = await self.futures.wait(call, self.poll_seconds)
        if reply is None:
            return json_reply(TryAgainResponse(request_id=request.request_id, queue_state="active"))
        return reply

    # ---- training runs and checkpoints (REST) -----------------------------------------------------

    def _run_id(self, caller: Caller, run_id: str) -> str:
        model = self.models.get(run_id)
        return model.model_id if model is not None and model.tenant == caller.tenant else run_id

    async def _checkpoints(self, caller: Caller, model_id: str = "") -> list[train_pb2.Checkpoint]:
        """The caller's checkpoints (of one run), expired ones deleted on the way (TTL)."""
        response = await self.backend.call(
            "ListCheckpoints", train_pb2.ListCheckpointsRequest(model_id=model_id), caller.api_key
        )
        kept = []
        for checkpoint in response.checkpoints:
            expires = _tinker_meta(checkpoint).get("expires_unix")
            if expires is not None and expires < time.time():
                await self.backend.call(
                    "DeleteCheckpoint", train_pb2.DeleteCheckpointRequest(path=checkpoint.path), caller.api_key
                )
            elif checkpoint.kind in wire.CHECKPOINT_TYPES:
                kept.append(checkpoint)
        return kept

    async def checkpoints(self, caller: Caller, run_id: str) -> dict[str, Any]:
        found = await self._checkpoints(caller, self._run_id(caller, run_id))
        return tt.CheckpointsListResponse(checkpoints=[_checkpoint(c) for c in found]).model_dump(mode="json")

    async def user_checkpoints(self, caller: Caller, limit: int, offset: int) -> dict[str, Any]:
        found = sorted(await self._checkpoints(caller), key=lambda c: -c.created_unix_ms)
        return tt.CheckpointsListResponse(
            checkpoints=[_checkpoint(c) for c in found[offset : offset + limit]],
            cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(found)),
        ).model_dump(mode="json")

    async def delete_checkpoint(self, caller: Caller, run_id: str, checkpoint_id: str) -> dict[str, Any]:
        path = wire.to_bios_path(f"tinker://{self._run_id(caller, run_id)}/{checkpoint_id}", "checkpoint_id")
        await self.backend.call("DeleteCheckpoint", train_pb2.DeleteCheckpointRequest(path=path), caller.api_key)
        return {}

    async def _training_run(
        self, caller: Caller, model_id: str, found: list[train_pb2.Checkpoint]
    ) -> tt.TrainingRun | None:
        model = self.models.get(model_id)
        live = model if model is not None and model.tenant == caller.tenant else None
        if live is None and not found:
            return None
        meta = _tinker_meta(found[-1]) if found else {}
        latest = {
            kind: max((c for c in found if c.kind == kind), key=lambda c: c.created_unix_ms, default=None)
            for kind in wire.CHECKPOINT_TYPES
        }
        last_ms = max([c.created_unix_ms for c in found], default=0)
        return tt.TrainingRun(
            training_run_id=model_id,
            base_model=live.base_model if live else found[-1].base_model,
            model_owner=caller.tenant,
            is_lora=True,
            lora_rank=live.lora_rank if live else meta.get("lora_rank"),
            last_request_time=datetime.now(timezone.utc) if live else _time(last_ms),
            last_checkpoint=_checkpoint(latest["state"]) if latest["state"] else None,
            last_sampler_checkpoint=_checkpoint(latest["sampler"]) if latest["sampler"] else None,
            user_metadata=live.user_metadata if live else meta.get("run_user_metadata") or None,
        )

    async def training_run(self, caller: Caller, run_id: str) -> dict[str, Any]:
        model_id = self._run_id(caller, run_id)
        run = await self._training_run(caller, model_id, await self._checkpoints(caller, model_id))
        if run is None:
            raise _not_found("training_run_id", run_id)
        return run.model_dump(mode="json")

    async def training_runs(self, caller: Caller, limit: int, offset: int) -> dict[str, Any]:
        by_model: dict[str, list[train_pb2.Checkpoint]] = {}
        for checkpoint in await self._checkpoints(caller):
            by_model.setdefault(checkpoint.model_id, []).append(checkpoint)
        for model in self.models.values():
            if model.tenant == caller.tenant:
                by_model.setdefault(model.model_id, [])
        runs = [await self._training_run(caller, m, by_model[m]) for m in sorted(by_model)]
        return tt.TrainingRunsResponse(
            training_runs=[r for r in runs[offset : offset + limit] if r is not None],
            cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(runs)),
        ).model_dump(mode="json")

    async def weights_info(self, caller: Caller, tinker_path: str) -> dict[str, Any]:
        path = wire.to_bios_path(tinker_path, "tinker_path")
        model_id = layout.split(path)[0]
        found = [c for c in await self._checkpoints(caller, model_id) if c.path == path]
        if not found:
            raise GatewayError(404, f"tinker_path: no checkpoint at {tinker_path}")
        return tt.WeightsInfoResponse(
            base_model=found[0].base_model, is_lora=True, lora_rank=_tinker_meta(found[0]).get("lora_rank")
        ).model_dump(mode="json")


def _tinker_meta(checkpoint: train_pb2.Checkpoint) -> dict[str, Any]:
    try:
        meta = json.loads(checkpoint.metadata_json or "{}")
    except json.JSONDecodeError:
        return {}
    return meta.get("tinker", {}) if isinstance(meta, dict) else {}


def _time(unix_ms: int) -> datetime:
    return datetime.fromtimestamp(unix_ms / 1000, timezone.utc)


def _checkpoint(c: train_pb2.Checkpoint) -> tt.Checkpoint:
    meta = _tinker_meta(c)
    expires = meta.get("expires_unix")
    return tt.Checkpoint(
        checkpoint_id=wire.checkpoint_id(c),
        checkpoint_type=wire.CHECKPOINT_TYPES[c.kind],
        time=_time(c.created_unix_ms),
        tinker_path=wire.to_tinker_path(c.path),
        size_bytes=c.size_bytes,
        user_metadata=meta.get("user_metadata") or None,
        expires_at=datetime.fromtimestamp(expires, timezone.utc) if expires else None,
    )
