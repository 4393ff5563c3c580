"""TrainService over gRPC: decodes requests, queues work on the engine, streams results back."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc

from bios import types
from bios.errors import FailedPreconditionError, InvalidArgumentError, status_of
from bios.server.auth import current_tenant
from bios.v1 import train_pb2, train_pb2_grpc
from render_service.tokenizers import get_tokenizer
from train_service import sampler as sampling
from train_service import metrics
from train_service.engine import Engine
from train_service.sessions import RESULT_WINDOW, SessionManager, TrainingModel

_DONE = object()
EXPORT_CHUNK_BYTES = 1 << 20


def _lora(pb) -> types.LoraConfig:
    return types.LoraConfig(rank=pb.rank or 32, alpha=pb.alpha if pb.HasField("alpha") else None, seed=pb.seed,
                            train_attn=pb.train_attn, train_mlp=pb.train_mlp, train_unembed=pb.train_unembed)


def _model_info(model: TrainingModel) -> train_pb2.ModelInfo:
    entry = model.base.entry
    return train_pb2.ModelInfo(model_id=model.model_id, base_model=entry.name, lora_rank=model.lora.rank,
                               step=model.step, tokenizer=entry.name, renderer=entry.renderer,
                               vocab_size=model.base.vocab_size)


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
        tenant = current_tenant()
        self.sessions.session(request.session_id, tenant)
        await self._run("control", lambda: self.sessions.close_session(request.session_id, tenant))
        return train_pb2.CloseSessionResponse()

    async def CreateModel(self, request, context):
        lora, tenant = _lora(request.lora), current_tenant()
        model = await self._run("control", lambda: self.sessions.create_model(
            request.session_id, tenant, request.base_model, lora, request.from_state, request.load_optimizer))
        return _model_info(model)

    async def CreateSampler(self, request, context):
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgumentError("source: give base_model or model_path")
        tenant = current_tenant()
        sampler = await self._run("control", lambda: self.sessions.create_sampler(
            request.session_id, tenant, request.base_model, request.model_path))
        return train_pb2.SamplerInfo(sampler_id=sampler.sampler_id, base_model=sampler.base.entry.name,
                                     model_path=sampler.model_path, tokenizer=sampler.base.entry.name,
                                     renderer=sampler.base.entry.renderer)

    async def GetInfo(self, request, context):
        return _model_info(self.sessions.model(request.model_id, current_tenant()))

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
                if path.name in ("optimizer.pt", "meta.json") or not path.is_file():
                    continue
                with open(path, "rb") as f:
                    offset = 0
                    while chunk := f.read(EXPORT_CHUNK_BYTES):
                        yield train_pb2.FileChunk(name=path.name, offset=offset, data=chunk)
                        offset += len(chunk)

    async def GetTokenizer(self, request, context):
        def files() -> dict[str, bytes]:
            tokenizer = get_tokenizer(request.name)
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer.save_pretrained(tmp)
                return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

        return train_pb2.TokenizerFiles(name=request.name, files=await asyncio.to_thread(files))

    # ---- the ordered operation stream -------------------------------------------------------------

    def _operation(self, model: TrainingModel, request: train_pb2.OperationRequest) -> Callable[[], Any]:
        kind = request.WhichOneof("op")
        event = lambda **kw: train_pb2.OperationEvent(seq=request.seq, **kw)  # noqa: E731
        ops = {
            "forward": lambda: event(forward_backward=model.forward_backward(request.forward, backward=False)),
            "forward_backward": lambda: event(
                forward_backward=model.forward_backward(request.forward_backward, backward=True)),
            "optim_step": lambda: event(optim_step=model.optim_step(request.optim_step)),
            "save_state": lambda: event(checkpoint=model.save_state(request.save_state)),
            "save_weights_for_sampler": lambda: event(
                checkpoint=model.save_weights_for_sampler(request.save_weights_for_sampler)),
            "load_state": lambda: event(load_state=train_pb2.LoadStateResponse(
                step=model.load_state(request.load_state.path, request.load_state.load_optimizer))),
        }
        if kind not in ops:
            raise InvalidArgumentError(f"op: request seq {request.seq} names no operation")
        return metrics_wrapped(kind, request, ops[kind])

    async def _answer(self, seq: int, future: asyncio.Future) -> train_pb2.OperationEvent:
        try:
            # Shielded: a dropped stream must not cancel the operation; a resubmission picks its result up.
            return await asyncio.shield(future)
        except Exception as exc:  # noqa: BLE001 - one failed operation answers with its status
            code, message = status_of(exc)
            return train_pb2.OperationEvent(seq=seq, error=train_pb2.OperationError(code=code.value[0], message=message))

    def _submit(self, model: TrainingModel, request: train_pb2.OperationRequest) -> asyncio.Future:
        """The future of this sequence number's event: the original one when the number was seen before."""
        if request.seq in model.results:
            return model.results[request.seq]
        loop = asyncio.get_running_loop()
        if request.seq <= model.max_seq:
            future = loop.create_future()
            future.set_exception(FailedPreconditionError(
                f"seq: {request.seq} is not after {model.max_seq} and is no longer remembered"))
            return future
        try:
            work = self._operation(model, request)
            future = asyncio.wrap_future(self.engine.submit(model.model_id, work))
        except Exception as exc:  # noqa: BLE001
            future = loop.create_future()
            future.set_exception(exc)
        model.max_seq = request.seq
        model.results[request.seq] = future
        while len(model.results) > RESULT_WINDOW:
            model.results.popitem(last=False)
        return future

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
                    await pending.put((request.seq, self._submit(model, request)))
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
        if target == "model_id":
            model = self.sessions.model(request.model_id, tenant)
            base, adapter, key = model.base, model.adapter, model.model_id
        elif target == "sampler_id":
            sampler = self.sessions.sampler(request.sampler_id, tenant)
            base, adapter, key = sampler.base, sampler.adapter, sampler.sampler_id
        else:
            raise InvalidArgumentError("target: give sampler_id or model_id")
        prompt = [t for c in request.prompt.chunks for t in c.encoded_text.tokens]
        params = request.sampling_params
        num_samples = request.num_samples or 1
        max_context = getattr(base.model.config, "max_position_embeddings", 1 << 30)
        sampling.validate(prompt, params, num_samples, base.vocab_size, max_context)

        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(step: list[tuple[int, int, float]]) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, step)

        def job():
            return sampling.sample_steps(base.causal_lm, base.tokenizer, prompt, params, num_samples, emit,
                                         cancelled, prepare=lambda: base.activate(adapter))

        future = self.engine.submit(key, job)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(deltas.put_nowait, _DONE))
        try:
            finished = False
            while not finished:
                # Everything produced since the last send goes out as one message: the number of messages
                # adapts to how fast the client reads, not to num_samples x tokens.
                steps = [await deltas.get()]
                while not deltas.empty():
                    steps.append(deltas.get_nowait())
                finished = steps[-1] is _DONE
                event = _coalesce([s for s in steps if s is not _DONE])
                if event.deltas:
                    yield train_pb2.SampleEvent(deltas=event)
            seqs = future.result()
            metrics.TOKENS.labels("sample").inc(sum(len(s.tokens) for s in seqs))
            response = train_pb2.SampleResponse(sequences=[
                train_pb2.SampledSequence(tokens=s.tokens, logprobs=s.logprobs, stop_reason=s.stop_reason)
                for s in seqs])
            if request.include_prompt_logprobs:
                def score():
                    base.activate(adapter)
                    return sampling.prompt_logprobs(base.causal_lm, prompt)

                response.prompt_logprobs.extend(await self._run(key, score))
            yield train_pb2.SampleEvent(result=response)
        finally:
            cancelled.set()


def _coalesce(steps: list[list[tuple[int, int, float]]]) -> train_pb2.SampleDeltas:
    merged: dict[int, train_pb2.SampleDelta] = {}
    for step in steps:
        for index, token, logprob in step:
            delta = merged.setdefault(index, train_pb2.SampleDelta(sequence_index=index))
            delta.tokens.append(token)
            delta.logprobs.append(logprob)
    return train_pb2.SampleDeltas(deltas=[merged[i] for i in sorted(merged)])


def metrics_wrapped(kind: str, request: train_pb2.OperationRequest, work: Callable[[], Any]) -> Callable[[], Any]:
    """Time the operation on the engine and count what it processed."""

    def run() -> Any:
        with metrics.OPERATION_SECONDS.labels(kind).time():
            result = work()
        if kind in ("forward", "forward_backward"):
            metrics.TOKENS.labels(kind).inc(result.forward_backward.metrics["tokens:sum"])
        elif kind == "optim_step":
            metrics.OPTIMIZER_STEPS.inc()
        return result

    return run


def add_to_server(sessions: SessionManager, engine: Engine) -> Callable[[grpc.aio.Server], list[str]]:
    def add(server: grpc.aio.Server) -> list[str]:
        train_pb2_grpc.add_TrainServiceServicer_to_server(TrainServicer(sessions, engine), server)
        return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]

    return add
