"""Runs the bad-input matrix (bad_inputs.py) against both services on loopback in this process, as deployed: local
paths not allowed (no --allow-local-paths). After each case both services must answer a good request exactly as
before it.

    .venv/bin/python tests/reliability/matrix.py     # runs every case, prints the table for docs/reliability.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from bad_inputs import GOOD, MODEL, OK, Case, Context, cases, datum, render

from bios.channel import CHANNEL_OPTIONS
from bios.v1 import render_pb2_grpc, train_pb2_grpc
from bios.v1 import train_pb2 as T
from bios.v1 import types_pb2 as Y

STREAMING = {
    "ConversationsToData": "stream_stream",
    "Operate": "stream_stream",
    "Sample": "unary_stream",
    "ExportWeights": "unary_stream",
}
SERVICES = {"render": "bios.v1.RenderService", "train": "bios.v1.TrainService"}
TIMEOUT = 120.0  # a bound, not a target: a hang fails the case instead of the whole run


def _code(value: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == value)


def invoke(channel: grpc.Channel, case: Case, ctx: Context) -> tuple[grpc.StatusCode, str]:
    """(status, message) of one case; for Operate, a failed operation's own status."""
    request = case.request(ctx) if callable(case.request) else case.request
    kind = STREAMING.get(case.method, "unary_unary")
    method = getattr(channel, kind)(
        f"/{SERVICES[case.service]}/{case.method}",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
    )
    try:
        if kind == "unary_unary":
            method(request, timeout=TIMEOUT)
        elif kind == "unary_stream":
            for _ in method(request, timeout=TIMEOUT):
                pass
        else:
            for raw in method(iter(request), timeout=TIMEOUT):
                if case.method == "Operate":
                    event = T.OperationEvent.FromString(raw)
                    if event.WhichOneof("event") == "error":
                        return _code(event.error.code), event.error.message
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return OK, ""


class Matrix:
    """Both services on loopback in this process (no --allow-local-paths), the context, and the canaries."""

    def __init__(self) -> None:
        from bios.futures import LoopThread
        from render_service import server as render_server
        from render_service.tokenizers import get_tokenizer
        from train_service import server as train_server

        self.tmp = Path(tempfile.mkdtemp(prefix="bios-matrix-"))
        self.loop = LoopThread.named("reliability-matrix")
        self.render = self.loop.run(render_server.start("127.0.0.1", 0))
        self.train = self.loop.run(train_server.start("127.0.0.1", 0, str(self.tmp / "checkpoints"), device="cpu"))
        self.channels = {
            "render": grpc.insecure_channel(f"127.0.0.1:{self.render.port}", options=CHANNEL_OPTIONS),
            "train": grpc.insecure_channel(f"127.0.0.1:{self.train.port}", options=CHANNEL_OPTIONS),
        }
        self.render_stub = render_pb2_grpc.RenderServiceStub(self.channels["render"])
        self.train_stub = train_pb2_grpc.TrainServiceStub(self.channels["train"])
        get_tokenizer(MODEL).save_pretrained(str(self.tmp / "tokenizer"))
        self.ctx = self._context()
        self.reference = self.canaries()

    def _context(self) -> Context:
        stub = self.train_stub
        session = stub.CreateSession(T.CreateSessionRequest()).session_id
        lora = lambda rank: Y.LoraConfig(rank=rank, train_attn=True, train_mlp=True)  # noqa: E731
        model = stub.CreateModel(T.CreateModelRequest(session_id=session, base_model=MODEL, lora=lora(4))).model_id
        other = stub.CreateModel(T.CreateModelRequest(session_id=session, base_model=MODEL, lora=lora(8))).model_id
        sampler = stub.CreateSampler(T.CreateSamplerRequest(session_id=session, base_model=MODEL)).sampler_id
        ctx = Context(session, model, sampler, "", "", "", str(self.tmp / "tokenizer"))
        ctx.state = self._operate(model, 1, save_state=T.SaveStateRequest(name="matrix-state")).checkpoint.path
        ctx.sampler_path = self._operate(
            model, 2, save_weights_for_sampler=T.SaveWeightsForSamplerRequest(name="matrix-sampler")
        ).checkpoint.path
        ctx.rank8_state = self._operate(other, 1, save_state=T.SaveStateRequest(name="rank8")).checkpoint.path
        return ctx

    def _operate(self, model_id: str, seq: int, **op: Any) -> T.OperationEvent:
        (event,) = self.train_stub.Operate(
            iter([T.OperationRequest(seq=seq, model_id=model_id, **op)]), timeout=TIMEOUT
        )
        assert event.WhichOneof("event") != "error", event.error.message
        return event

    def canaries(self) -> dict[str, Any]:
        """A good request to each service; after every case the answers must be exactly these."""
        tokens = list(self.render_stub.Render(render(*GOOD), timeout=TIMEOUT).token_ids)
        self.ctx.seq += 1
        event = self._operate(self.ctx.model, self.ctx.seq, forward=T.ForwardBackwardInput(data=[datum()]))
        return {"render": tokens, "train": event.forward_backward.metrics["loss:sum"]}

    def run(self, case: Case) -> tuple[grpc.StatusCode, str, bool]:
        """(status, message, whether both services still answer exactly as before)."""
        code, message = invoke(self.channels[case.service], case, self.ctx)
        try:
            still_serving = self.canaries() == self.reference
        except (grpc.RpcError, AssertionError):
            still_serving = False
        return code, message, still_serving

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.loop.run(self.train.stop(None, checkpoint=False))
        self.loop.run(self.render.stop(None))


def passed(case: Case, code: grpc.StatusCode, message: str, still_serving: bool) -> bool:
    return code == case.code and case.field in message and still_serving


def main() -> int:
    """Run every case; print the markdown table for docs/reliability.md and a summary line."""
    matrix = Matrix()
    rows, failures = [], 0
    try:
        for k, case in enumerate(cases(), 1):
            code, message, serving = matrix.run(case)
            ok = passed(case, code, message, serving)
            failures += not ok
            shown = (message[:110] + "…" if len(message) > 110 else message).replace("|", "\\|").replace("\n", " ")
            rows.append(
                f"| {k} | {case.service}.{case.method} | {case.id} | {case.code.name} | "
                f"{code.name}{'' if ok else ' **FAIL**'} | {shown} |"
            )
    finally:
        matrix.close()
    print("| # | RPC | case | expected | got | message |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    n_render = sum(c.service == "render" for c in cases())
    print(
        f"\n{len(rows)} cases ({n_render} render, {len(rows) - n_render} train): {len(rows) - failures} as expected, "
        f"{failures} not; both services answered a good request exactly as before after every case"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
