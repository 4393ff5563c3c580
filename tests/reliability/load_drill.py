"""The render load drill: 32 concurrent clients against the render service as its own process.

Each client mixes every single-conversation RPC, batches and malformed requests, and checks every answer against
the renderer library in-process (a malformed request must get INVALID_ARGUMENT). The service's resident memory is
read after every round: after the first rounds it must stay flat.

    .venv/bin/python tests/reliability/load_drill.py --rounds 10     # the figures in docs/reliability.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bios import wire
from bios.channel import CHANNEL_OPTIONS
from bios.v1 import render_pb2 as R
from bios.v1 import render_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
CLIENTS = 32
REQUESTS_PER_ROUND = 12  # per client
TIMEOUT = 60.0  # per request: a bound, so a hang fails instead of stalling the suite


def conversation(k: int) -> list[dict]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Question {k}: what is {k} squared? " + "Think. " * (k % 9)},
        {"role": "assistant", "content": f"{k * k}." + " Indeed." * (k % 4)},
    ]


@dataclass
class Report:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)  # after each round
    seconds: float = 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOS_")} | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "render_service", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=120)
    finally:
        channel.close()
    return process, f"127.0.0.1:{port}"


class Client:
    """One client's channel, and the answers it must get (from the renderer library, in this process)."""

    def __init__(self, address: str, index: int, expected: dict):
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = render_pb2_grpc.RenderServiceStub(self.channel)
        self.index, self.expected = index, expected

    def request(self, n: int) -> str | None:
        """Request n of this client; None if answered right, else what was wrong."""
        k = (self.index * 7 + n) % len(self.expected["convs"])
        spec = R.RendererSpec(name="ultrasafe", tokenizer="ultrasafe/usf-mini")
        kind = n % 6
        try:
            if kind == 0:
                got = self.stub.Render(
                    R.RenderRequest(renderer=spec, conversation=wire.conversation_to_pb(self.expected["convs"][k])),
                    timeout=TIMEOUT,
                ).token_ids
                return None if list(got) == self.expected["render"][k] else f"Render {k}: wrong tokens"
            if kind == 1:
                got = self.stub.BuildSupervisedExample(
                    R.BuildSupervisedExampleRequest(
                        renderer=spec, conversation=wire.conversation_to_pb(self.expected["convs"][k])
                    ),
                    timeout=TIMEOUT,
                )
                ok = wire.supervised_from_pb(got) == self.expected["supervised"][k]
                return None if ok else f"BuildSupervisedExample {k}: wrong example"
            if kind == 2:
                got = self.stub.BuildGenerationPrompt(
                    R.BuildGenerationPromptRequest(
                        renderer=spec, conversation=wire.conversation_to_pb(self.expected["convs"][k][:-1])
                    ),
                    timeout=TIMEOUT,
                ).token_ids
                return None if list(got) == self.expected["prompt"][k] else f"BuildGenerationPrompt {k}: wrong"
            if kind == 3:
                batch = R.RenderBatchRequest(renderer=spec, kind=R.SUPERVISED)
                for conv in self.expected["convs"][k : k + 8]:
                    wire.conversation_to_pb(conv, into=batch.conversations.add())
                got = [wire.supervised_from_pb(e) for e in self.stub.RenderBatch(batch, timeout=TIMEOUT).examples]
                return None if got == self.expected["supervised"][k : k + 8] else f"RenderBatch {k}: wrong examples"
            if kind == 4:
                tokens = self.expected["completion"][k]
                got = self.stub.ParseResponse(R.ParseResponseRequest(renderer=spec, tokens=tokens), timeout=TIMEOUT)
                return (
                    None
                    if got.ok and got.message.content == self.expected["convs"][k][-1]["content"]
                    else f"ParseResponse {k}: wrong message"
                )
            bad = [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]
            try:
                self.stub.Render(
                    R.RenderRequest(renderer=spec, conversation=wire.conversation_to_pb(bad)), timeout=TIMEOUT
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[1].role" in err.details():
                    return None
                return f"malformed request: {err.code().name} {err.details()}"
            return "malformed request: answered OK"
        except grpc.RpcError as err:
            return f"request kind {kind}: {err.code().name}: {err.details()}"

    def round(self, first: int) -> list[str]:
        return [e for n in range(first, first + REQUESTS_PER_ROUND) if (e := self.request(n))]


def expected_answers(n: int = 64) -> dict:
    from bios_cookbook import renderers, tokenizer_utils

    tokenizer = tokenizer_utils.get_tokenizer("ultrasafe/usf-mini")
    local = renderers.get_renderer("ultrasafe", tokenizer)
    convs = [conversation(k) for k in range(n)]
    return {
        "convs": convs,
        "render": [local.render(c).token_ids for c in convs],
        "supervised": [local.build_supervised_example(c) for c in convs],
        "prompt": [local.build_generation_prompt(c[:-1]).to_ints() for c in convs],
        "completion": [tokenizer.encode(c[-1]["content"] + "<|im_end|>", add_special_tokens=False) for c in convs],
    }


def drill(rounds: int, clients: int = CLIENTS) -> Report:
    report, expected = Report(), expected_answers()
    process, address = start_server()
    started = time.monotonic()
    try:
        pool = [Client(address, i, expected) for i in range(clients)]
        with concurrent.futures.ThreadPoolExecutor(clients) as threads:
            for r in range(rounds):
                for errors in threads.map(lambda c, r=r: c.round(r * REQUESTS_PER_ROUND), pool):
                    report.errors += errors
                report.requests += clients * REQUESTS_PER_ROUND
                report.rss_mb.append(rss_mb(process.pid))
        for client in pool:
            client.channel.close()
    finally:
        report.seconds = time.monotonic() - started
        process.kill()
        process.wait(30)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    args = parser.parse_args()
    report = drill(args.rounds, args.clients)
    print(
        f"{args.clients} concurrent clients, {report.requests} requests in {report.seconds:.1f} s "
        f"({report.requests / report.seconds:.0f}/s): {len(report.errors)} errors; service RSS per round (MB): "
        + " ".join(f"{m:.0f}" for m in report.rss_mb)
    )
    for error in report.errors[:20]:
        print("  ", error)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
