"""The render service through gRPC: the batched RPC vs HF `apply_chat_template` in-process, same run.

Supervised examples (ids + weights + attribution) for 256 distinct conversations per call, through a render
server started as its own process on loopback (as deployed), against `apply_chat_template` + encode on the
same conversations in this process, one conversation at a time (one core).
Measured for a server rendering in its own process (--workers 1: one core) and with one render worker per
core of this machine (--workers N), each for first-time conversations (never rendered before) and a second
epoch of the same ones. The client sends 64-conversation chunks, up to three in flight. Each ratio is the
median over passes of (HF pass time / gRPC pass time), every gRPC pass timed next to an HF pass.
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


def start_render_server(workers: int = 1):
    import socket
    import subprocess
    import sys

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "render_service", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", "0", "--workers", str(workers)], stderr=subprocess.DEVNULL)
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

    rows = []
    cores = len(os.sched_getaffinity(0))
    for workers in sorted({1, cores}):
        proc, address = start_render_server(workers)
        try:
            rows += measure(bios.ServiceClient(render_address=address), tokenizer_utils, workers, cores)
        finally:
            proc.terminate()
            proc.wait(30)
    return print_ratios("render service through gRPC (batched, full attribution, ids checked equal)",
                        "render_grpc_bench", rows)


def measure(client, tokenizer_utils, workers: int, cores: int) -> list[dict]:
    rows = []
    for renderer_name, tokenizer_name in (("ultrasafe", "ultrasafe/usf-mini"),):
        remote = client.render_client(renderer_name, tokenizer_name)
        tokenizer = tokenizer_utils.get_tokenizer(tokenizer_name)
        for seed in range(4):  # warm up: every worker builds its encoders, every thread its caches
            remote.build_supervised_examples(conversations(256, 1000 + seed))
        first, second, hf = [], [], []
        for rep in range(7):
            batch = conversations(256, rep)  # distinct text every repetition
            start = time.perf_counter()
            remote.build_supervised_examples(batch)
            first.append(time.perf_counter() - start)
            start = time.perf_counter()
            examples = remote.build_supervised_examples(batch)
            second.append(time.perf_counter() - start)
            start = time.perf_counter()
            reference = [tokenizer.apply_chat_template(c, tokenize=False) for c in batch]
            reference = [tokenizer.encode(text, add_special_tokens=False) for text in reference]
            hf.append(time.perf_counter() - start)
            assert [list(tokens) for tokens, _ in examples] == reference, "ids differ from apply_chat_template"
        n = len(batch)
        where = f"{workers} render worker{'s' if workers > 1 else ''} on {cores} cores"
        for label, times in (("first-time conversations", first), ("same conversations again", second)):
            rows.append({"name": f"{renderer_name}, {where}: RenderBatch {label} / HF in-process",
                         "value": n / statistics.median(times), "baseline": n / statistics.median(hf),
                         "ratio": statistics.median(h / t for h, t in zip(hf, times)), "target": TARGET,
                         "unit": "conversations/s"})
    return rows


if __name__ == "__main__":
    main()
