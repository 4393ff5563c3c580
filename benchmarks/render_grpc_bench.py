"""The render service through gRPC: the batched RPC vs HF `apply_chat_template` in-process, same run.

Supervised examples (ids + weights + attribution) for 256 distinct conversations per call, through a render
server started as its own process on loopback (as deployed), against `apply_chat_template(tokenize=True)` on
the same conversations in this process.
Reported twice: first-time conversations (never rendered before) and a second epoch of the same ones.
"""

from __future__ import annotations

import os
import random
import statistics
import time

from benchmarks import print_ratios

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = ">= 4 (vs HF in-process)"


def conversations(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    words = ("model", "tokens", "weights", "gradient", "the", "of", "training", "renders", "über", "数据", "🙂")
    text = lambda k: " ".join(rng.choice(words) for _ in range(k)) + f" #{rng.randrange(10**9)}"  # noqa: E731
    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": "You are a careful assistant."}]
        for _ in range(rng.randint(1, 3)):
            conv += [{"role": "user", "content": text(rng.randint(10, 60))},
                     {"role": "assistant", "content": text(rng.randint(20, 120))}]
        out.append(conv)
    return out


def start_render_server():
    import socket
    import subprocess
    import sys

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "render_service", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return proc, f"127.0.0.1:{port}"
        except grpc.RpcError:
            time.sleep(0.3)
    proc.kill()
    raise TimeoutError("render server did not become healthy")


def main() -> list[dict]:
    import bios
    from bios_cookbook import tokenizer_utils

    proc, address = start_render_server()
    try:
        return measure(bios.ServiceClient(render_address=address), tokenizer_utils)
    finally:
        proc.terminate()
        proc.wait(30)


def measure(client, tokenizer_utils) -> list[dict]:
    rows = []
    for renderer_name, tokenizer_name in (("ultrasafe", "ultrasafe/usf-mini"),):
        remote = client.render_client(renderer_name, tokenizer_name)
        tokenizer = tokenizer_utils.get_tokenizer(tokenizer_name)
        remote.build_supervised_examples(conversations(64, 99))  # warm up the server's caches of scaffolding
        first, second, hf = [], [], []
        for rep in range(5):
            batch = conversations(256, rep)  # distinct text every repetition
            start = time.perf_counter()
            remote.build_supervised_examples(batch)
            first.append(len(batch) / (time.perf_counter() - start))
            start = time.perf_counter()
            examples = remote.build_supervised_examples(batch)
            second.append(len(batch) / (time.perf_counter() - start))
            start = time.perf_counter()
            reference = [tokenizer.apply_chat_template(c, tokenize=False) for c in batch]
            reference = [tokenizer.encode(text, add_special_tokens=False) for text in reference]
            hf.append(len(batch) / (time.perf_counter() - start))
            assert [list(tokens) for tokens, _ in examples] == reference, "ids differ from apply_chat_template"
        grpc_first, grpc_second, base = (statistics.median(x) for x in (first, second, hf))
        rows += [{"name": f"{renderer_name}: RenderBatch first-time conversations / HF in-process", "value": grpc_first,
                  "baseline": base, "ratio": grpc_first / base, "target": TARGET, "unit": "conversations/s"},
                 {"name": f"{renderer_name}: RenderBatch same conversations again / HF in-process",
                  "value": grpc_second, "baseline": base, "ratio": grpc_second / base, "target": TARGET,
                  "unit": "conversations/s"}]
    return print_ratios("render service through gRPC (batched, full attribution, ids checked equal)",
                        "render_grpc_bench", rows)


if __name__ == "__main__":
    main()
