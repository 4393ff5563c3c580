"""Train-service benchmarks, each printed as a ratio against a baseline measured in the same run.

    step time through gRPC / the same loop in-process                      target <= 1.05
    peak memory of forward_backward, chunked LM head / naive full logits    target <= 0.20
    aggregate tokens/s, 4 concurrent sessions / 1 session                   target >= 0.90
    sampling tokens/s, bios sampler / HF generate (same model, in-process)  reported
    num_samples=8 in one call / 8 sequential calls (tokens/s)               target >= 3.0
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
        out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                               loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length}))
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
    from bios import wire
    from bios.v1 import train_pb2
    from train_service.checkpoints import CheckpointStore
    from train_service.sessions import SessionManager

    data = _data(4, 256)
    tc = client.create_lora_training_client(base_model=MODEL, rank=16)
    grpc_step = lambda: tc.train(data, learning_rate=1e-4)  # noqa: E731
    grpc_step()  # warm up

    sessions = SessionManager(CheckpointStore(tempfile.mkdtemp()))
    session = sessions.create_session({}, "bench")
    from bios import types

    model = sessions.create_model(session.session_id, "bench", MODEL, types.LoraConfig(rank=16), "", False)
    fb = train_pb2.ForwardBackwardInput(data=[wire.datum_to_pb(d) for d in data], loss_fn="cross_entropy")
    opt = train_pb2.OptimStepRequest(adam_params=wire.adam_params_to_pb(types.AdamParams(learning_rate=1e-4)))

    def local_step():
        model.forward_backward(fb, backward=True)
        model.optim_step(opt)

    local_step()
    # Interleave the two so machine noise hits both alike.
    grpc_times, local_times = [], []
    for _ in range(repeats):
        grpc_times.append(_median_time(grpc_step, 1))
        local_times.append(_median_time(local_step, 1))
    g, local = statistics.median(grpc_times), statistics.median(local_times)
    return {"name": "step time gRPC / in-process (4x256 tokens)", "value": g, "baseline": local, "ratio": g / local,
            "target": "<= 1.05"}


_MEMORY_CHILD = r"""
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from bios import types
from render_service.model_registry import resolve
from train_service import compute
from train_service.models import BaseModelPool

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

base = BaseModelPool().get(resolve("ultrasafe/usf-mini"))
base.add_adapter("a", types.LoraConfig(rank=16))
base.activate("a")
torch.manual_seed(0)
ids = torch.randint(0, 150000, (4, 1025))
inputs, targets, mask = ids[:, :-1], ids[:, 1:], torch.ones(4, 1024, dtype=torch.long)
before = rss()
if sys.argv[1] == "chunked":
    logp = compute.target_logprobs(base.causal_lm, inputs, mask, targets)
else:
    logits = base.causal_lm(input_ids=inputs, attention_mask=mask).logits.float()
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
    return {"name": "peak memory forward_backward 4x1024: chunked / naive full logits", "value": chunked / 2**20,
            "baseline": naive / 2**20, "ratio": chunked / naive, "target": "<= 0.20", "unit": "MiB"}


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
    return {"name": "aggregate tokens/s: 4 concurrent sessions / 1 session", "value": four, "baseline": one,
            "ratio": four / one, "target": ">= 0.90", "unit": "tokens/s"}


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
    generate = lambda: model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens,  # noqa: E731
                                      do_sample=True, top_k=0, top_p=1.0, pad_token_id=151643)
    generate()
    hf = _median_time(generate, 3)

    batched = _median_time(lambda: sampler.sample(types.ModelInput.from_ints(prompt), params, num_samples=8).result(), 3)
    sequential = _median_time(lambda: [sampler.sample(types.ModelInput.from_ints(prompt), params).result()
                                       for _ in range(8)], 1)
    return [
        {"name": f"sampling tokens/s ({max_tokens} tokens, via gRPC) / HF generate in-process",
         "value": max_tokens / ours, "baseline": max_tokens / hf, "ratio": hf / ours, "target": "reported",
         "unit": "tokens/s"},
        {"name": "num_samples=8 in one call / 8 sequential calls (tokens/s)", "value": 8 * max_tokens / batched,
         "baseline": 8 * max_tokens / sequential, "ratio": sequential / batched, "target": ">= 3.0",
         "unit": "tokens/s"},
    ]


def main() -> list[dict]:
    import bios

    client = bios.ServiceClient()  # the embedded default: both services in this process, on loopback gRPC
    rows = [step_time(client), peak_memory(), concurrency(client), *sampling(client)]
    return print_ratios("train service", "train_bench", rows)


if __name__ == "__main__":
    main()
