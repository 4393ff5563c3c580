"""ServiceClient: the entry point. Connects to both services (or starts the embedded default)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import logging
import os
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import grpc

from bios import lifecycle, placement, types, wire
from bios.channel import open_channel
from bios.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, from_status
from bios.futures import LoopThread
from bios.render_client import RenderClient
from bios.sampling_client import SamplingClient
from bios.tokenizer import load as load_tokenizer
from bios.training_client import TrainingClient
from bios.v1 import render_pb2_grpc, train_pb2, train_pb2_grpc

DEFAULT_TIMEOUT = 600.0
UNARY_RETRIES = 12  # backoff 0.1 s doubling, capped at 2 s: about 17 s in all
log = logging.getLogger("bios")


class ServiceClient:
    """`bios.ServiceClient()` talks to $BIOS_RENDER_ADDRESS / $BIOS_TRAIN_ADDRESS, or to services it starts
    in this process when no address is set (the embedded default). Nothing is contacted or started until a
    call needs it, so a bad address or API key shows at the first call.

    With several train replicas, `train_address` is the placement address (any pod) and `train_pod_address`
    ($BIOS_TRAIN_POD_ADDRESS) a template naming one pod by `{pod}`: the session opens on whichever pod answers,
    or on the pod of the checkpoint it resumes from, and every later train call goes to that pod
    (bios.placement)."""

    def __init__(
        self,
        train_address: str | None = None,
        render_address: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        tls_ca: str | None = None,
        train_pod_address: str | None = None,
    ):
        # None: the embedded service, started when first needed (a client that only renders never starts the
        # train service and its torch models; one that only trains never starts a render service).
        self._addresses = {
            "train": train_address or os.environ.get("BIOS_TRAIN_ADDRESS"),
            "render": render_address or os.environ.get("BIOS_RENDER_ADDRESS"),
        }
        api_key = api_key or os.environ.get("BIOS_API_KEY")
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.tls_ca = tls_ca
        self._loop = LoopThread.named("bios-client")
        self._lock = threading.Lock()
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: dict[str, Any] = {}
        self._session_id: str | None = None
        self._pod_template = train_pod_address or os.environ.get("BIOS_TRAIN_POD_ADDRESS")
        if self._pod_template:
            placement.pod_address(self._pod_template, 0)  # a template without {pod} fails here, not later
        self._pod: int | None = None  # the train pod this client is pinned to
        self._inflight: set[concurrent.futures.Future] = set()  # submitted, not yet answered (close() waits)
        self._inflight_lock = threading.Lock()  # its own: done-callbacks take it on the loop thread
        self._streams: weakref.WeakSet = weakref.WeakSet()  # training clients' operation streams
        self._closed = False
        lifecycle.opened(self)

    @property
    def train_address(self) -> str:
        return self._address("train")

    @property
    def render_address(self) -> str:
        return self._address("render")

    def _address(self, service: str) -> str:
        with self._lock:
            address = self._addresses[service]
            if address is None:
                if self._closed:
                    raise FailedPreconditionError("this ServiceClient is closed; open another one")
                address = self._addresses[service] = lifecycle.embedded_address(service, self)
            return address

    def _track(self, future: concurrent.futures.Future) -> concurrent.futures.Future:
        """Remember a submitted call until it is answered, so that close() (and interpreter exit) wait for it."""
        with self._inflight_lock:
            self._inflight.add(future)
        future.add_done_callback(self._untrack)
        return future

    def _untrack(self, future: concurrent.futures.Future) -> None:
        with self._inflight_lock:
            self._inflight.discard(future)

    def wait_for_operations(self, timeout: float | None = None) -> int:
        """Wait until every call submitted through this client is answered (or `timeout` seconds pass); returns
        how many are still unanswered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._inflight_lock:
                pending = [f for f in self._inflight if not f.done()]
            if not pending:
                return 0
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return len(pending)
            concurrent.futures.wait(pending, left)  # answers may submit more (a custom loss's second half)

    def _stub(self, service: str) -> Any:
        """The service's stub, its channel opened on first use (channels belong to the client's loop)."""
        stub = self._stubs.get(service)
        if stub is None:
            address = self._address(service)
            with self._lock:
                if service not in self._stubs:
                    on_loop = threading.current_thread() is self._loop.thread
                    self._stubs[service] = (
                        self._open(service, address) if on_loop else self._loop.run(self._open_async(service, address))
                    )
                stub = self._stubs[service]
        return stub

    def _open(self, service: str, address: str) -> Any:
        channel = open_channel(address, self.tls_ca)
        self._channels.append(channel)
        return (train_pb2_grpc.TrainServiceStub if service == "train" else render_pb2_grpc.RenderServiceStub)(channel)

    async def _open_async(self, service: str, address: str) -> Any:
        return self._open(service, address)

    @property
    def _train(self) -> train_pb2_grpc.TrainServiceStub:
        return self._stub("train")

    @property
    def _render(self) -> render_pb2_grpc.RenderServiceStub:
        return self._stub("render")

    @property
    def session_id(self) -> str:
        """This client's session on the train service, opened on first use."""
        if self._session_id is None:
            session = self._unary("CreateSession", train_pb2.CreateSessionRequest(client_version="bios-python/0.1"))
            with self._lock:
                if self._session_id is None:
                    self._session_id = session.session_id
            self._pin(placement.pod_of(self._session_id))
        return self._session_id

    def _pin(self, pod: int | None) -> None:
        """Send every later train call to this pod (with a pod address template and a placed id)."""
        if pod is None or not self._pod_template:
            return
        with self._lock:
            if self._pod is None:
                self._pod = pod
                address = placement.pod_address(self._pod_template, pod)
                if address != self._addresses["train"]:
                    self._addresses["train"] = address
                    self._stubs.pop("train", None)  # the placement channel stays open until close()

    def _place_for(self, path: str, field: str) -> None:
        """Before a call that loads a checkpoint: the session must live on the checkpoint's pod."""
        pod = placement.pod_of(path)
        if pod is None or not self._pod_template:
            return
        if self._session_id is None:
            self._pin(pod)  # the session will open on the pod that holds the checkpoint
        if self._pod is not None and self._pod != pod:
            raise FailedPreconditionError(
                f"{field}: {path!r} is on train pod {pod}, and this client's session is on pod {self._pod}; "
                f"open another ServiceClient to load it"
            )

    # ---- unary calls with retries on UNAVAILABLE --------------------------------------------------

    async def _call(self, stub: Any, method: str, request: Any) -> Any:
        for attempt in range(UNARY_RETRIES + 1):
            try:
                return await getattr(stub, method)(request, metadata=self._metadata, timeout=self.timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == UNARY_RETRIES:
                    raise from_status(err.code(), err.details() or "") from None
                await _sleep(min(2.0, 0.1 * 2**attempt))

    def _unary(self, method: str, request: Any) -> Any:
        return self._loop.run(self._call(self._train, method, request))

    def _render_call(self, method: str, request: Any) -> Any:
        return self._loop.run(self._call(self._render, method, request))

    def _render_submit(self, method: str, request: Any) -> concurrent.futures.Future:
        """Start a render call and return at once; `.result()` gives the reply or raises the mapped error."""
        return self._track(self._loop.submit(self._call(self._render, method, request)))

    # ---- training and sampling clients -----------------------------------------------------------

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = False,
        alpha: float | None = None,
    ):
        lora = types.LoraConfig(
            rank=rank,
            alpha=alpha,
            seed=seed or 0,
            train_attn=train_attn,
            train_mlp=train_mlp,
            train_unembed=train_unembed,
        )
        info = self._unary(
            "CreateModel",
            train_pb2.CreateModelRequest(
                session_id=self.session_id, base_model=base_model, lora=wire.lora_config_to_pb(lora)
            ),
        )
        return TrainingClient(self, wire.model_info_from_pb(info))

    async def create_lora_training_client_async(self, *args: Any, **kwargs: Any):
        return await asyncio.to_thread(self.create_lora_training_client, *args, **kwargs)

    def create_training_client_from_state(self, path: str, with_optimizer: bool = False):
        self._place_for(path, "path")
        info = self._unary(
            "CreateModel",
            train_pb2.CreateModelRequest(session_id=self.session_id, from_state=path, load_optimizer=with_optimizer),
        )
        return TrainingClient(self, wire.model_info_from_pb(info))

    def create_training_client_from_state_with_optimizer(self, path: str):
        return self.create_training_client_from_state(path, with_optimizer=True)

    async def create_training_client_from_state_async(self, path: str, with_optimizer: bool = False):
        return await asyncio.to_thread(self.create_training_client_from_state, path, with_optimizer)

    def create_sampling_client(self, base_model: str | None = None, model_path: str | None = None):
        if bool(base_model) == bool(model_path):
            raise InvalidArgumentError("create_sampling_client: give exactly one of base_model or model_path")
        if model_path:
            self._place_for(model_path, "model_path")
        request = train_pb2.CreateSamplerRequest(session_id=self.session_id)
        if base_model:
            request.base_model = base_model
        elif model_path:  # exactly one of the two is given (checked above)
            request.model_path = model_path
        info = self._unary("CreateSampler", request)
        return SamplingClient(
            self,
            sampler_id=info.sampler_id,
            base_model=info.base_model,
            model_path=info.model_path,
            tokenizer=info.tokenizer,
            renderer=info.renderer,
        )

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any):
        return await asyncio.to_thread(self.create_sampling_client, *args, **kwargs)

    # ---- checkpoints, info, tokenizers -----------------------------------------------------------

    def list_checkpoints(self, model_id: str = "") -> list[types.Checkpoint]:
        response = self._unary("ListCheckpoints", train_pb2.ListCheckpointsRequest(model_id=model_id))
        return [wire.checkpoint_from_pb(c) for c in response.checkpoints]

    def delete_checkpoint(self, path: str) -> None:
        self._unary("DeleteCheckpoint", train_pb2.DeleteCheckpointRequest(path=path))

    def export_weights(self, path: str, directory: str | os.PathLike, merged: bool = False) -> Path:
        """Download a checkpoint: the adapter in PEFT format (`peft.PeftModel.from_pretrained(base, directory)`
        loads it) or, with merged=True, the base model with the adapter merged in (a full HF model directory)."""

        async def download() -> None:
            out = Path(directory)
            out.mkdir(parents=True, exist_ok=True)
            call = self._train.ExportWeights(
                train_pb2.ExportWeightsRequest(path=path, merged=merged), metadata=self._metadata, timeout=self.timeout
            )
            try:
                async for chunk in call:
                    target = out / Path(chunk.name).name
                    with open(target, "r+b" if chunk.offset else "wb") as f:
                        f.seek(chunk.offset)
                        f.write(chunk.data)
            except grpc.aio.AioRpcError as err:
                raise from_status(err.code(), err.details() or "") from None

        self._loop.run(download())
        return Path(directory)

    def _get_info(self, model_id: str) -> types.ModelInfo:
        return wire.model_info_from_pb(self._unary("GetInfo", train_pb2.GetInfoRequest(model_id=model_id)))

    def get_tokenizer(self, name: str) -> Any:
        """The tokenizer of a model: resolved on this machine by the full install (bios_cookbook, found by name:
        the light client lacks it), else from the files the train service sends (bios.tokenizer)."""
        if importlib.util.find_spec("bios_cookbook") is not None:
            try:
                return importlib.import_module("bios_cookbook.tokenizer_utils").get_tokenizer(name)
            except NotFoundError:
                pass
        files = self._unary("GetTokenizer", train_pb2.GetTokenizerRequest(name=name)).files
        directory = Path(tempfile.mkdtemp(prefix="bios-tokenizer-"))
        for file_name, content in files.items():
            (directory / Path(file_name).name).write_bytes(content)
        return load_tokenizer(directory)

    def render_client(self, renderer: str, tokenizer: str, **options: Any):
        return RenderClient(self, renderer, tokenizer, **options)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Wait for every operation submitted through this client (unless `wait=False`; at most `timeout`
        seconds, reported if exceeded), close the session and the channels. The embedded services stop when
        the last client using them closes (at interpreter exit at the latest, see bios.lifecycle)."""
        self._shutdown(wait, timeout, retry=True)

    def _shutdown(self, wait: bool, timeout: float | None, retry: bool) -> None:
        with self._lock:
            if self._closed:
                return
        try:
            if wait and (left := self.wait_for_operations(timeout)):
                log.warning(
                    "bios: %d operations were still unanswered after %.0f s; closing without them", left, timeout
                )
            if self._session_id is not None:
                request = train_pb2.CloseSessionRequest(session_id=self._session_id)
                if retry:
                    self._unary("CloseSession", request)
                else:  # at exit: one short try, the server may be gone already
                    self._loop.run(self._close_session_once(request))
        finally:
            with self._lock:
                self._closed = True
            # Half-closed streams end with OK on the server; a channel closed under them would cancel them.
            concurrent.futures.wait([self._loop.submit(stream.finish()) for stream in list(self._streams)], 5.0)
            concurrent.futures.wait([self._loop.submit(channel.close()) for channel in self._channels], 5.0)
            lifecycle.closed(self)

    async def _close_session_once(self, request: train_pb2.CloseSessionRequest) -> None:
        await self._train.CloseSession(request, metadata=self._metadata, timeout=5.0)

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
