"""Train-service benchmarks, each printed as a ratio against a baseline measured in the same run.

step time through gRPC / the same loop in-process                      target <= 1.05
peak memory of forward_backward, chunked LM head / naive full logits    target <= 0.20
aggregate tokens/s, 4 concurrent sessions / 1 session                   target >= 0.90
8 sessions x batch 2 x 256 tokens: coalesced / one request per pass     target >= 1.5
the same with 8 sessions x batch 1 x 16 tokens (overhead-bound)         reported
step time on a base holding 16 adapters / holding 1                     target <= 1.2
sampling tokens/s, bios sampler / HF generate (same model, in-process)  reported
num_samples=8 in one call / 8 sequential calls (tokens/s)               target >= 3.0
8 samplers sampling at once / one after another (tokens/s)              reported
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import print_ratios

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "ultrasafe/usf-mini"


def _data(n_data: int, length: int, seed: int = 0):
    import numpy as np

    from bios import types

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_data):
        ids = rng.integers(0, 150_000, length + 1).tolist()
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length},
            )
        )
    return out


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_time(client, repeats: int = 7) -> dict:
    """One forward_backward + optim_step on 4x256 tokens: through gRPC vs direct calls on the same engine state."""
    from bios import types, wire
    from bios.v1 import train_pb2
    from train_service import worker
    from train_service.checkpoints import CheckpointStore
    from train_service.scheduler import Limits, PassPlan
    from train_service.sessions import SessionManager

    data = _data(4, 256)
    tc = client.create_lora_training_client(base_model=MODEL, rank=16)
    grpc_step = lambda: tc.train(data, learning_rate=1e-4)  # noqa: E731
    grpc_step()  # warm up

    sessions = SessionManager(CheckpointStore(tempfile.mkdtemp()))
    session = sessions.create_session({}, "bench")
    lora = types.LoraConfig(rank=16)
    entry, base, lora = sessions.prepare_model(session.session_id, "bench", MODEL, lora, "")
    model = sessions.create_model(session.session_id, "bench", entry, base, lora, "", False)
    fb = train_pb2.ForwardBackwardInput(data=[wire.datum_to_pb(d) for d in data], loss_fn="cross_entropy")
    opt = train_pb2.OptimStepRequest(adam_params=wire.adam_params_to_pb(types.AdamParams(learning_rate=1e-4)))

    def local_step():
        work = model.forward_work(fb, True, Limits())
        worker.run_plan(PassPlan(True, [(work, 0, len(work.rows))]))
        model.optim_step(opt)

    local_step()
    # Interleave the two so machine noise hits both alike.
    grpc_times, local_times = [], []
    for _ in range(repeats):
        grpc_times.append(_median_time(grpc_step, 1))
        local_times.append(_median_time(local_step, 1))
    g, local = statistics.median(grpc_times), statistics.median(local_times)
    return {
        "name": "step time gRPC / in-process (4x256 tokens)",
        "value": g,
        "baseline": local,
        "ratio": g / local,
        "target": "<= 1.05",
    }


_MEMORY_CHILD = r"""
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from bios import types
from render_service.model_registry import resolve
from train_service import passes
from train_service.lora import Segment
from train_service.models import BaseModelPool

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = BaseModelPool().get(resolve("ultrasafe/usf-mini"))
adapter = base.new_adapter("a", base.peft_config(types.LoraConfig(rank=16)))
torch.manual_seed(0)
ids = torch.randint(0, 150000, (4, 1025))
inputs, targets = ids[:, :-1], ids[:, 1:]
before = rss()
with base.router.route([Segment(adapter, 0, 4)]):
    if sys.argv[1] == "chunked":
        hidden = base.decoder(input_ids=inputs, use_cache=False).last_hidden_state
        logp = passes.head_logprobs(base.head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), adapter)
    else:
        logits = base.causal_lm(input_ids=inputs).logits.float()
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    (-logp.sum()).backward()
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - before)
"""


def peak_memory() -> dict:
    """Peak resident memory added by one forward_backward on 4x1024 tokens, each variant in a fresh process."""

    def run(kind: str) -> int:
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, kind], capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    chunked, naive = run("chunked"), run("naive")
    return {
        "name": "peak memory forward_backward 4x1024: chunked / naive full logits",
        "value": chunked / 2**20,
        "baseline": naive / 2**20,
        "ratio": chunked / naive,
        "target": "<= 0.20",
        "unit": "MiB",
    }


def concurrency(client, steps: int = 6) -> dict:
    """Tokens/s of 4 sessions training at once vs 1 session alone (same per-session work)."""
    data = _data(2, 256)
    tokens_per_step = 2 * 256

    def run_sessions(n: int) -> float:
        clients = [client.create_lora_training_client(base_model=MODEL, rank=8, seed=i) for i in range(n)]
        for c in clients:
            c.train(data, learning_rate=1e-4)  # warm up

        def work(c):
            for _ in range(steps):
                c.train(data, learning_rate=1e-4)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return n * steps * tokens_per_step / (time.perf_counter() - start)

    one, four = run_sessions(1), run_sessions(4)
    return {
        "name": "aggregate tokens/s: 4 concurrent sessions / 1 session",
        "value": four,
        "baseline": one,
        "ratio": four / one,
        "target": ">= 0.90",
        "unit": "tokens/s",
    }


class _TrainServers:
    """Train servers started in this process, each with its own engine (and copy of the base weights)."""

    def __init__(self):
        from bios.futures import LoopThread

        self.loop = LoopThread.named("bench-train-servers")
        self.running = []

    def start(self, **kwargs) -> str:
        from train_service import server

        running = self.loop.run(server.start("127.0.0.1", 0, tempfile.mkdtemp(prefix="bench-ckpt-"), **kwargs))
        self.running.append(running)
        return f"127.0.0.1:{running.port}"

    def close(self) -> None:
        for running in self.running:
            self.loop.run(running.stop(None))


def _train_concurrently(clients, data, steps: int) -> float:
    """Each client trains `steps` steps on its data in its own thread; returns the elapsed seconds."""

    def work(c, d):
        for _ in range(steps):
            c.train(d, learning_rate=1e-4)

    threads = [threading.Thread(target=work, args=(c, d)) for c, d in zip(clients, data)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def coalescing(
    servers: _TrainServers, sessions: int = 8, batch: int = 2, length: int = 256, steps: int = 2, rounds: int = 2
) -> dict:
    """Tokens/s of `sessions` sessions training at once on one base: requests coalesced into shared passes
    (the default engine) vs one request per pass (--max-pass-requests 1), same work, measured alternately."""
    import bios
    from train_service.scheduler import Limits

    addresses = {
        "coalesced": servers.start(device="cpu"),
        "one per pass": servers.start(device="cpu", limits=Limits(max_pass_ops=1)),
    }
    data = [_data(batch, length, seed=i) for i in range(sessions)]
    clients = {}
    for kind, address in addresses.items():
        service = bios.ServiceClient(train_address=address, render_address="unused:0")
        clients[kind] = [service.create_lora_training_client(base_model=MODEL, rank=8, seed=i) for i in range(sessions)]
        _train_concurrently(clients[kind], data, 1)  # warm up
    tokens = sessions * steps * batch * length
    rates: dict[str, list[float]] = {kind: [] for kind in addresses}
    for _ in range(rounds):
        for kind in addresses:
            rates[kind].append(tokens / _train_concurrently(clients[kind], data, steps))
    together, alone = statistics.median(rates["coalesced"]), statistics.median(rates["one per pass"])
    target = ">= 1.5" if (batch, length) == (2, 256) else "reported"
    return {
        "name": f"{sessions} sessions x batch {batch} x {length} tokens: coalesced / one request per pass",
        "value": together,
        "baseline": alone,
        "ratio": together / alone,
        "target": target,
        "unit": "tokens/s",
    }


def adapter_count(servers: _TrainServers, repeats: int = 5) -> dict:
    """Step time of one model on a base that also holds 15 idle adapters vs on a base holding only its own:
    no per-operation walk over every adapter's parameters."""
    import bios

    service = bios.ServiceClient(train_address=servers.start(device="cpu"), render_address="unused:0")
    tc = service.create_lora_training_client(base_model=MODEL, rank=16, seed=1)
    data = _data(2, 256)
    tc.train(data, learning_rate=1e-4)
    alone, crowded = [], []
    for _ in range(2):
        alone.append(_median_time(lambda: tc.train(data, learning_rate=1e-4), repeats))
        others = [service.create_lora_training_client(base_model=MODEL, rank=16, seed=i) for i in range(2, 17)]
        for other in others:
            other.train(_data(1, 8), learning_rate=1e-4)  # each holds a gradient history and optimizer state
        crowded.append(_median_time(lambda: tc.train(data, learning_rate=1e-4), repeats))
        for other in others:
            other.delete()
    a, c = statistics.median(alone), statistics.median(crowded)
    return {
        "name": "step time (2x256 tokens) on a base holding 16 adapters / holding 1",
        "value": c,
        "baseline": a,
        "ratio": c / a,
        "target": "<= 1.2",
        "unit": "s",
    }


def sampler_groups(servers: _TrainServers, samplers: int = 8, max_tokens: int = 32) -> dict:
    """8 training models sampling at once (one decode group over the shared base) vs one after another."""
    import bios
    from bios import types

    service = bios.ServiceClient(train_address=servers.start(device="cpu"), render_address="unused:0")
    models = [service.create_lora_training_client(base_model=MODEL, rank=8, seed=i) for i in range(samplers)]
    prompt = types.ModelInput.from_ints(list(range(1000, 1032)))
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=3)
    for m in models:
        m.sample(prompt, params).result()  # warm up

    def at_once():
        futures = [m.sample(prompt, params) for m in models]
        return [f.result() for f in futures]

    together = _median_time(at_once, 3)
    sequential = _median_time(lambda: [m.sample(prompt, params).result() for m in models], 3)
    tokens = samplers * max_tokens
    return {
        "name": f"{samplers} models sampling {max_tokens} tokens at once / one after another (tokens/s)",
        "value": tokens / together,
        "baseline": tokens / sequential,
        "ratio": sequential / together,
        "target": "reported",
        "unit": "tokens/s",
    }


def sampling(client, max_tokens: int = 64) -> list[dict]:
    import torch

    from bios import types
    from train_service.tiny_model import build_tiny_qwen3

    prompt = list(range(1000, 1032))
    sampler = client.create_sampling_client(base_model=MODEL)
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1)
    sampler.sample(types.ModelInput.from_ints(prompt), params).result()  # warm up

    ours = _median_time(lambda: sampler.sample(types.ModelInput.from_ints(prompt), params).result(), 3)
    model = build_tiny_qwen3()
    ids = torch.tensor([prompt])

    def generate():
        return model.generate(
            ids,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            pad_token_id=151643,
        )

    generate()
    hf = _median_time(generate, 3)

    batched = _median_time(
        lambda: sampler.sample(types.ModelInput.from_ints(prompt), params, num_samples=8).result(), 3
    )
    sequential = _median_time(
        lambda: [sampler.sample(types.ModelInput.from_ints(prompt), params).result() for _ in range(8)], 1
    )
    return [
        {
            "name": f"sampling tokens/s ({max_tokens} tokens, via gRPC) / HF generate in-process",
            "value": max_tokens / ours,
            "baseline": max_tokens / hf,
            "ratio": hf / ours,
            "target": "reported",
            "unit": "tokens/s",
        },
        {
            "name": "num_samples=8 in one call / 8 sequential calls (tokens/s)",
            "value": 8 * max_tokens / batched,
            "baseline": 8 * max_tokens / sequential,
            "ratio": sequential / batched,
            "target": ">= 3.0",
            "unit": "tokens/s",
        },
    ]


def main() -> list[dict]:
    import bios

    client = bios.ServiceClient()  # the embedded default: both services in this process, on loopback gRPC
    rows = [step_time(client), peak_memory(), concurrency(client)]
    servers = _TrainServers()
    try:
        rows += [
            coalescing(servers),
            coalescing(servers, batch=1, length=16, steps=20),
            adapter_count(servers),
            sampler_groups(servers),
        ]
    finally:
        servers.close()
    rows += sampling(client)
    return print_ratios("train service", "train_bench", rows)


if __name__ == "__main__":
    main()
