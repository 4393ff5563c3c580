"""The HTTP side: Tinker's REST routes (Starlette), API keys, errors, and routing to the owning pod.

Every id the gateway hands out is one of our placed ids (bios.placement), so the pod that owns a session,
model, sampler or future is written in the id. With several train pods, each runs a gateway beside it;
a request that reaches the wrong one is forwarded, as it came, to the gateway of the pod its id names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, Awaitable, Callable

import httpx
import pydantic
import zstandard
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb

from bios import placement
from bios.errors import BiosError
from bios_server.auth import DEFAULT_TENANT, ApiKeys
from render_service.model_registry import registered
from tinker_gateway import wire
from tinker_gateway.backend import Backend
from tinker_gateway.gateway import Caller, Gateway
from tinker_gateway.state import Reply
from tinker_gateway.wire import GatewayError, bad

log = logging.getLogger("tinker_gateway")
FORWARDED = "x-bios-forwarded"  # set on a forwarded request: its receiver handles it, never forwards again
_FORWARD_HEADERS = ("x-api-key", "content-type", "content-encoding", "accept")
MAX_BODY_BYTES = 256 * 1024 * 1024  # as the gRPC message limit


class _Forward(Exception):
    def __init__(self, pod: int):
        self.pod = pod


class Context:
    """One request: its caller, body and the place it belongs."""

    def __init__(self, app: "GatewayApp", request: Request, caller: Caller, body: bytes):
        self.app, self.request, self.caller, self.body = app, request, caller, body

    def parse(self, model: type[pydantic.BaseModel]) -> Any:
        """The JSON body as one of the SDK's request types (they forbid unknown fields)."""
        try:
            return model.model_validate_json(self.body or b"{}")
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
            raise bad(problems) from None

    def owned(self, id_or_path: str | None) -> None:
        """Forward the request when the id names another pod than this gateway's."""
        pod = placement.pod_of(id_or_path or "")
        if pod is not None and pod != self.app.pod and self.app.peer_template and FORWARDED not in self.request.headers:
            raise _Forward(pod)

    def int_param(self, name: str, default: int) -> int:
        raw = self.request.query_params.get(name)
        try:
            value = default if raw is None else int(raw)
        except ValueError:
            raise bad(f"{name}: not an integer: {raw!r}") from None
        if value < 0:
            raise bad(f"{name}: must be >= 0, got {value}")
        return value


Handler = Callable[[Context], Awaitable[Any]]


def _respond(value: Any, status: int = 200) -> Response:
    if isinstance(value, Reply):
        return Response(value.body, status, media_type=value.media_type)
    return Response(json.dumps(value).encode(), status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _respond({"error": message, "detail": message, "category": "user" if status < 500 else "server"}, status)


class GatewayApp:
    def __init__(
        self,
        train_address: str,
        api_keys: ApiKeys | None = None,
        pod: int | None = None,
        peer_template: str | None = None,
        tls_ca: str | None = None,
        **options: Any,
    ):
        """`peer_template`: the gateway of pod k, as `http://bios-train-{pod}.bios-train-headless:8000`;
        `options`: Gateway's (poll_seconds, session_timeout, compress_fwdbwd)."""
        if peer_template:
            placement.pod_address(peer_template, 0)  # a template without {pod} fails here
        self.train_address, self.api_keys, self.pod, self.peer_template = train_address, api_keys, pod, peer_template
        self.tls_ca, self.options = tls_ca, options
        self.gateway: Gateway | None = None
        self._peers: httpx.AsyncClient | None = None
        self.starlette = Starlette(routes=self._routes(), lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _: Starlette):
        backend = Backend(self.train_address, self.tls_ca)
        gateway = self.gateway = Gateway(backend, **self.options)
        peers = self._peers = httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=5.0))

        async def reap() -> None:
            while True:
                await asyncio.sleep(30)
                try:
                    await gateway.reap()
                except Exception:  # noqa: BLE001 - housekeeping never stops the gateway
                    log.exception("reaping sessions")

        reaper = asyncio.get_running_loop().create_task(reap())
        try:
            yield
        finally:
            reaper.cancel()
            await peers.aclose()
            await backend.close()

    # ---- request handling -----------------------------------------------------------------------

    def _caller(self, request: Request) -> Caller:
        key = request.headers.get("x-api-key")
        if self.api_keys is None:
            return Caller(DEFAULT_TENANT, key)
        tenant = self.api_keys.tenant(f"Bearer {key}") if key else None
        if tenant is None:
            raise GatewayError(401, "X-API-Key: missing or unknown API key")
        return Caller(tenant, key)

    async def _body(self, request: Request) -> bytes:
        body = await request.body()
        if request.headers.get("content-encoding", "").lower() == "zstd":
            try:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY_BYTES)
            except zstandard.ZstdError as exc:
                raise bad(f"body: not valid zstd ({exc})") from None
        if len(body) > MAX_BODY_BYTES:
            raise GatewayError(413, f"body: {len(body)} bytes exceed {MAX_BODY_BYTES}")
        return body

    def _endpoint(self, handler: Handler, authenticated: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                caller = self._caller(request) if authenticated else Caller(DEFAULT_TENANT, None)
                context = Context(self, request, caller, await self._body(request))
                return _respond(await handler(context))
            except _Forward as forward:
                return await self._forward(request, forward.pod)
            except GatewayError as exc:
                return _error(exc.status, exc.message)
            except BiosError as exc:
                return _error(wire.http_status(exc.code), str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug answers 500; the gateway keeps serving
                log.exception("%s %s failed", request.method, request.url.path)
                return _error(500, f"internal error: {type(exc).__name__}")

        return endpoint

    async def _forward(self, request: Request, pod: int) -> Response:
        # Context.owned forwards only with a peer template, and requests arrive once the lifespan has started
        assert self.peer_template is not None and self._peers is not None
        url = placement.pod_address(self.peer_template, pod).rstrip("/") + request.url.path
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}
        headers[FORWARDED] = str(self.pod)
        try:
            answer = await self._peers.request(
                request.method, url, params=request.query_params, content=await request.body(), headers=headers
            )
        except httpx.HTTPError as exc:
            return _error(503, f"the gateway of train pod {pod} is unreachable: {type(exc).__name__}")
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    # ---- routes: each parses, finds the owner, and hands over to the Gateway ---------------------

    def _routes(self) -> list[Route]:
        def g() -> Gateway:
            assert self.gateway is not None, "requests arrive once the app has started"
            return self.gateway

        async def client_config(c: Context) -> Any:
            return g().client_config()

        async def dynamic_config(c: Context) -> Any:
            return tt.ClientDynamicConfigResponse().model_dump(mode="json")

        async def healthz(c: Context) -> Any:
            return {"status": "ok"}

        async def telemetry(c: Context) -> Any:  # accepted and dropped
            return {"status": "accepted"}

        async def capabilities(c: Context) -> Any:
            return {
                "supported_models": [
                    {"model_name": name, "trainable": True, "sampleable": True} for name in sorted(registered())
                ]
            }

        async def create_session(c: Context) -> Any:
            return await g().create_session(c.caller, c.parse(tt.CreateSessionRequest))

        async def heartbeat(c: Context) -> Any:
            request = c.parse(tt.SessionHeartbeatRequest)
            c.owned(request.session_id)
            return g().heartbeat(c.caller, request.session_id)

        async def finish(c: Context) -> Any:
            session_id = c.request.path_params["session_id"]
            c.owned(session_id)
            return await g().finish_session(c.caller, session_id)

        async def create_model(c: Context) -> Any:
            request = c.parse(tt.CreateModelRequest)
            c.owned(request.session_id)
            return g().create_model(c.caller, request)

        async def get_info(c: Context) -> Any:
            request = c.parse(tt.GetInfoRequest)
            c.owned(request.model_id)
            return g().get_info(c.caller, request)

        async def load_weights(c: Context) -> Any:
            request = c.parse(tt.LoadWeightsRequest)
            c.owned(request.session_id or request.model_id)
            return g().load_weights(c.caller, request)

        async def forward_backward(c: Context) -> Any:
            if "protobuf" not in c.request.headers.get("content-type", ""):
                raise GatewayError(
                    415,
                    "content-type: forward_backward takes a tinker_public.ForwardBackwardRequest "
                    "as application/x-protobuf",
                )
            msg = tpb.ForwardBackwardRequest()
            try:
                msg.ParseFromString(c.body)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError
                raise bad("body: not a tinker_public.ForwardBackwardRequest protobuf message") from None
            c.owned(msg.model_id)
            return g().forward_backward(c.caller, msg)

        async def optim_step(c: Context) -> Any:
            request = c.parse(tt.OptimStepRequest)
            c.owned(request.model_id)
            return g().optim_step(c.caller, request)

        async def save_weights(c: Context) -> Any:
            request = c.parse(tt.SaveWeightsRequest)
            c.owned(request.model_id)
            return g().save_weights(c.caller, request)

        async def save_for_sampler(c: Context) -> Any:
            request = c.parse(tt.SaveWeightsForSamplerRequest)
            c.owned(request.model_id)
            return g().save_weights_for_sampler(c.caller, request)

        async def create_sampling_session(c: Context) -> Any:
            request = c.parse(tt.CreateSamplingSessionRequest)
            c.owned(request.session_id)
            return await g().create_sampling_session(c.caller, request)

        async def get_sampler(c: Context) -> Any:
            sampler_id = c.request.path_params["sampler_id"]
            c.owned(sampler_id)
            return g().get_sampler(c.caller, sampler_id)

        async def asample(c: Context) -> Any:
            request = c.parse(tt.SampleRequest)
            c.owned(request.sampling_session_id)
            return g().asample(c.caller, request)

        async def retrieve(c: Context) -> Any:
            request = c.parse(tt.FutureRetrieveRequest)
            c.owned(request.request_id)
            return await g().retrieve(c.caller, request)

        async def cancel(c: Context) -> Any:
            request_id = str(json.loads(c.body or b"{}").get("request_id", ""))
            c.owned(request_id)
            return g().cancel(c.caller, request_id)

        async def training_runs(c: Context) -> Any:
            return await g().training_runs(c.caller, c.int_param("limit", 20), c.int_param("offset", 0))

        async def training_run(c: Context) -> Any:
            c.owned(c.request.path_params["run_id"])
            return await g().training_run(c.caller, c.request.path_params["run_id"])

        async def checkpoints(c: Context) -> Any:
            c.owned(c.request.path_params["run_id"])
            return await g().checkpoints(c.caller, c.request.path_params["run_id"])

        async def delete_checkpoint(c: Context) -> Any:
            params = c.request.path_params
            c.owned(params["run_id"])
            return await g().delete_checkpoint(c.caller, params["run_id"], params["checkpoint_id"])

        async def user_checkpoints(c: Context) -> Any:
            return await g().user_checkpoints(c.caller, c.int_param("limit", 100), c.int_param("offset", 0))

        async def weights_info(c: Context) -> Any:
            tinker_path = str(json.loads(c.body or b"{}").get("tinker_path", ""))
            c.owned(tinker_path)
            return await g().weights_info(c.caller, tinker_path)

        async def unsupported(c: Context) -> Any:
            # 400, not 501: the SDK retries any 5xx for minutes
            raise GatewayError(400, f"{c.request.url.path}: not supported by the bios Tinker gateway")

        v1 = "/api/v1"
        table: list[tuple[str, str, Handler]] = [
            ("POST", "/client/config", client_config),
            ("POST", "/client/dynamic_config", dynamic_config),
            ("POST", "/telemetry", telemetry),
            ("GET", "/get_server_capabilities", capabilities),
            ("POST", "/create_session", create_session),
            ("POST", "/session_heartbeat", heartbeat),
            ("POST", "/sessions/{session_id}/finish", finish),
            ("POST", "/create_model", create_model),
            ("POST", "/get_info", get_info),
            ("POST", "/load_weights", load_weights),
            ("POST", "/forward_backward", forward_backward),
            ("POST", "/optim_step", optim_step),
            ("POST", "/save_weights", save_weights),
            ("POST", "/save_weights_for_sampler", save_for_sampler),
            ("POST", "/create_sampling_session", create_sampling_session),
            ("GET", "/samplers/{sampler_id}", get_sampler),
            ("POST", "/asample", asample),
            ("POST", "/retrieve_future", retrieve),
            ("POST", "/cancel_future", cancel),
            ("GET", "/training_runs", training_runs),
            ("GET", "/training_runs/{run_id}", training_run),
            ("GET", "/training_runs/{run_id}/checkpoints", checkpoints),
            ("DELETE", "/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", delete_checkpoint),
            ("GET", "/checkpoints", user_checkpoints),
            ("POST", "/weights_info", weights_info),
        ]
        routes = [Route(v1 + path, self._endpoint(handler), methods=[method]) for method, path, handler in table]
        routes.append(Route(v1 + "/healthz", self._endpoint(healthz, authenticated=False), methods=["GET"]))
        for path in (
            "/save_weights_external",
            "/copy_weights",
            "/create_custom_loss",
            "/retrieve_futures",
            "/join_sampling_session",
            "/auth/token",
        ):
            routes.append(Route(v1 + path, self._endpoint(unsupported), methods=["POST"]))
        return routes
