"""TrainService over gRPC: decodes requests, queues work on the engine, streams results back."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc

from bios import wire
from bios.errors import InvalidArgumentError, NotFoundError, status_of
from bios.v1 import train_pb2, train_pb2_grpc
from bios_server.auth import current_tenant
from render_service.tokenizers import get_tokenizer
from train_service import metrics
from train_service import sampler as sampling
from train_service.checkpoint_layout import NOT_EXPORTED
from train_service.engine import Engine
from train_service.lora import Adapter
from train_service.scheduler import Limits, SampleWork
from train_service.sessions import SessionManager, TrainingModel

_DONE = object()
_STOP_REASONS = {"stop": train_pb2.STOP_REASON_STOP, "length": train_pb2.STOP_REASON_LENGTH}
EXPORT_CHUNK_BYTES = 1 << 20


def _model_info(model: TrainingModel, limits: Limits) -> train_pb2.ModelInfo:
    entry, base = model.entry, model.base
    memory = base.memory()
    return train_pb2.ModelInfo(
        model_id=model.model_id,
        base_model=entry.name,
        lora_rank=model.lora.rank,
        step=model.step,
        tokenizer=entry.name,
        renderer=entry.renderer,
        vocab_size=base.vocab_size,
        device=base.device.describe(),
        dtype=base.device.dtype_name,
        max_request_tokens=limits.max_request_tokens,
        max_pass_tokens=limits.max_pass_tokens,
        max_context=min(base.max_context, 2**31 - 1),
        device_memory_allocated_bytes=memory["allocated"],
        device_memory_peak_bytes=memory["peak"],
        lora_parameters=model.adapter.num_parameters(),
    )


class TrainServicer(train_pb2_grpc.TrainServiceServicer):
    def __init__(self, sessions: SessionManager, engine: Engine):
        self.sessions = sessions
        self.engine = engine

    async def _run(self, key: str, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.engine.submit(key, fn))

    # ---- sessions and models ----------------------------------------------------------------------

    async def CreateSession(self, request, context):
        session = self.sessions.create_session(dict(request.tags), current_tenant())
        return train_pb2.CreateSessionResponse(session_id=session.session_id)

    async def CloseSession(self, request, context):
        keys = self.sessions.close_session(request.session_id, current_tenant())
        for key in keys:
            self.engine.drop(key, NotFoundError(f"{key}: its session {request.session_id} was closed"))
        self._drop_replicas(keys)
        return train_pb2.CloseSessionResponse()

    def _drop_replicas(self, keys: list[str]) -> None:
        """On several ranks, the other ranks free their replicas too (in the engine's order of work)."""
        if keys and self.sessions.mirror.active:
            self.engine.submit("control", lambda: self.sessions.mirror.send("drop", keys))

    async def CreateModel(self, request, context):
        lora, tenant = wire.lora_config_from_pb(request.lora), current_tenant()
        # Loading weights can take minutes for a real model: off the engine, which keeps serving others.
        entry, base, lora = await asyncio.to_thread(
            self.sessions.prepare_model, request.session_id, tenant, request.base_model, lora, request.from_state
        )
        model = await self._run(
            "control",
            lambda: self.sessions.create_model(
                request.session_id, tenant, entry, base, lora, request.from_state, request.load_optimizer
            ),
        )
        return _model_info(model, self.engine.limits)

    async def DeleteModel(self, request, context):
        model = self.sessions.delete_model(request.model_id, current_tenant())
        self.engine.drop(model.model_id, NotFoundError(f"model_id: model {model.model_id} was deleted"))
        self._drop_replicas([model.model_id])
        return train_pb2.DeleteModelResponse()

    async def CreateSampler(self, request, context):
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgumentError("source: give base_model or model_path")
        tenant = current_tenant()
        entry, base, saved = await asyncio.to_thread(
            self.sessions.prepare_sampler, request.session_id, tenant, request.base_model, request.model_path
        )
        sampler = await self._run(
            "control",
            lambda: self.sessions.create_sampler(request.session_id, tenant, entry, base, saved, request.model_path),
        )
        eos = (await asyncio.to_thread(self.sessions.tokenizer, entry)).eos_token_id
        return train_pb2.SamplerInfo(
            sampler_id=sampler.sampler_id,
            base_model=entry.name,
            model_path=sampler.model_path,
            tokenizer=entry.name,
            renderer=entry.renderer,
            eos_token_ids=[] if eos is None else [eos],
        )

    async def GetInfo(self, request, context):
        return _model_info(self.sessions.model(request.model_id, current_tenant()), self.engine.limits)

    async def ListCheckpoints(self, request, context):
        ids = {request.model_id} if request.model_id else None
        return train_pb2.ListCheckpointsResponse(checkpoints=self.sessions.store.list(current_tenant(), ids))

    async def DeleteCheckpoint(self, request, context):
        self.sessions.store.delete(request.path, current_tenant())
        return train_pb2.DeleteCheckpointResponse()

    async def ExportWeights(self, request, context):
        directory, meta = self.sessions.store.locate(request.path, current_tenant())
        with tempfile.TemporaryDirectory() as tmp:
            if request.merged:
                await asyncio.to_thread(self.sessions.export_merged, directory, meta, Path(tmp))
                directory = Path(tmp)
            for path in sorted(directory.iterdir()):
                if path.name in NOT_EXPORTED or not path.is_file():
                    continue
                with open(path, "rb") as f:
                    offset = 0
                    while chunk := f.read(EXPORT_CHUNK_BYTES):
                        yield train_pb2.FileChunk(name=path.name, offset=offset, data=chunk)
                        offset += len(chunk)

    async def GetTokenizer(self, request, context):
        def files() -> dict[str, bytes]:
            tokenizer = get_tokenizer(request.name, self.sessions.allow_local_paths, "name")
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

        return train_pb2.TokenizerFiles(name=request.name, files=await asyncio.to_thread(files))

    # ---- the ordered operation stream -------------------------------------------------------------

    async def _answer(self, seq: int, future: asyncio.Future) -> train_pb2.OperationEvent:
        try:
            # Shielded: a dropped stream must not cancel the operation; a resubmission picks its result up.
            return await asyncio.shield(future)
        except Exception as exc:  # noqa: BLE001 - one failed operation answers with its status
            code, message = status_of(exc)
            return train_pb2.OperationEvent(
                seq=seq, error=train_pb2.OperationError(code=code.value[0], message=message)
            )

    async def Operate(self, request_iterator, context) -> AsyncIterator[train_pb2.OperationEvent]:
        pending: asyncio.Queue = asyncio.Queue()
        tenant = current_tenant()

        async def read() -> None:
            model = None
            try:
                async for request in request_iterator:
                    if model is None:
                        model = self.sessions.model(request.model_id, tenant)
                    elif request.model_id and request.model_id != model.model_id:
                        raise InvalidArgumentError(f"model_id: this stream is for {model.model_id}")
                    await pending.put((request.seq, await self.sessions.submit_operation(model, request, self.engine)))
                await pending.put(_DONE)
            except Exception as exc:  # noqa: BLE001 - ends the stream with a status
                await pending.put(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await pending.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                seq, future = item
                yield await self._answer(seq, future)
        finally:
            reader.cancel()

    # ---- sampling ------------------------------------------------------------------------------

    async def Sample(self, request, context) -> AsyncIterator[train_pb2.SampleEvent]:
        target, tenant = request.WhichOneof("target"), current_tenant()
        adapter: Adapter | None  # None: the plain base model
        if target == "model_id":
            model = self.sessions.model(request.model_id, tenant)
            base, adapter, key, entry = model.base, model.adapter, model.model_id, model.entry
        elif target == "sampler_id":
            sampler = self.sessions.sampler(request.sampler_id, tenant)
            base, adapter, key, entry = sampler.base, sampler.adapter, sampler.sampler_id, sampler.entry
        else:
            raise InvalidArgumentError("target: give sampler_id or model_id")
        prompt = []
        for chunk in request.prompt.chunks:
            if not chunk.HasField("encoded_text"):
                raise InvalidArgumentError("prompt: image chunks are not supported by this model")
            prompt += chunk.encoded_text.tokens
        params = sampling.SamplingOptions.from_pb(request.sampling_params)
        num_samples = request.num_samples or 1
        sampling.validate(
            prompt, params, num_samples, base.vocab_size, base.max_context, self.engine.limits.max_pass_tokens
        )

        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        job = sampling.SampleRequest(
            prompt,
            params,
            num_samples,
            adapter,
            self.sessions.tokenizer(entry),
            request.include_prompt_logprobs,
            emit=lambda step: loop.call_soon_threadsafe(deltas.put_nowait, step),
        )
        future = self.engine.submit(key, SampleWork(base, job))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, _DONE))
        try:
            finished = False
            while not finished:
                # Everything produced since the last send goes out as one message: the number of messages
                # adapts to how fast the client reads, not to num_samples x tokens.
                steps = [await deltas.get()]
                while not deltas.empty():
                    steps.append(deltas.get_nowait())
                finished = any(s is _DONE for s in steps)  # the answer can arrive before the last tokens
                event = _coalesce([s for s in steps if s is not _DONE])
                if event.deltas:
                    yield train_pb2.SampleEvent(deltas=event)
            result: sampling.SampleResult = future.result()
            metrics.TOKENS.labels("sample").inc(sum(len(s.tokens) for s in result.sequences))
            response = train_pb2.SampleResponse(
                sequences=[
                    train_pb2.SampledSequence(
                        tokens=s.tokens, logprobs=s.logprobs, stop_reason=_STOP_REASONS[s.stop_reason]
                    )
                    for s in result.sequences
                ],
                prompt_logprobs=result.prompt_logprobs,
            )
            yield train_pb2.SampleEvent(result=response)
        finally:
            job.cancelled.set()


def _coalesce(steps: list[list[tuple[int, int, float]]]) -> train_pb2.SampleDeltas:
    merged: dict[int, train_pb2.SampleDelta] = {}
    for step in steps:
        for index, token, logprob in step:
            delta = merged.setdefault(index, train_pb2.SampleDelta(sequence_index=index))
            delta.tokens.append(token)
            delta.logprobs.append(logprob)
    return train_pb2.SampleDeltas(deltas=[merged[i] for i in sorted(merged)])


def add_to_server(sessions: SessionManager, engine: Engine) -> Callable[[grpc.aio.Server], list[str]]:
    def add(server: grpc.aio.Server) -> list[str]:
        train_pb2_grpc.add_TrainServiceServicer_to_server(TrainServicer(sessions, engine), server)
        return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]

    return add
