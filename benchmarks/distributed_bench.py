"""The train service on two CPU ranks (torchrun, gloo) against one rank, the same work through the client.

    step time (forward_backward + optim_step, 8 x 128 tokens), 2 ranks / 1 rank     reported
    sampling 32 tokens x 4 samples, 2 ranks / 1 rank                                reported

On this 2-core machine two ranks share the two cores that one rank uses alone, so the ratios measure the
correctness-preserving overhead of sharding (all-gathers of every layer, gathered results, replicated adapters),
not a speed-up; on GPUs each rank has a device of its own (benchmarks/gpu_check.py --ranks).
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time

from benchmarks import print_ratios

MODEL = "ultrasafe/usf-mini"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed: int, n: int = 8, length: int = 128):
    import random

    from bios import types

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(150_000) for _ in range(length + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(ids[:-1]),
                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * length},
            )
        )
    return out


def main(rounds: int = 3) -> list[dict]:
    import bios
    from bios import types
    from train_service import launch

    checkpoints = tempfile.mkdtemp(prefix="bench-ranks-")
    servers, clients = {}, {}
    try:
        for ranks in (1, 2):
            port = _port()
            args = [
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                "--checkpoint-dir",
                checkpoints,
                "--device",
                "cpu",
            ]
            servers[ranks] = launch.spawn(ranks, args, env={"HF_HUB_OFFLINE": "1"})
            launch.wait_serving(f"127.0.0.1:{port}", servers[ranks])
            service = bios.ServiceClient(train_address=f"127.0.0.1:{port}", render_address="unused:0")
            clients[ranks] = (
                service.create_lora_training_client(base_model=MODEL, rank=8, seed=1),
                service.create_sampling_client(base_model=MODEL),
            )
        data = _data(1)
        prompt = types.ModelInput.from_ints(list(range(1000, 1016)))
        params = types.SamplingParams(max_tokens=32, temperature=1.0, seed=2)
        steps: dict[int, list[float]] = {1: [], 2: []}
        samples: dict[int, list[float]] = {1: [], 2: []}
        for tc, sampler in clients.values():  # warm up
            tc.train(data, learning_rate=1e-4)
            sampler.sample(prompt, params, num_samples=4).result()
        for _ in range(rounds):  # alternate, so machine noise hits both alike
            for ranks, (tc, sampler) in clients.items():
                start = time.perf_counter()
                tc.train(data, learning_rate=1e-4)
                steps[ranks].append(time.perf_counter() - start)
                start = time.perf_counter()
                sampler.sample(prompt, params, num_samples=4).result()
                samples[ranks].append(time.perf_counter() - start)
    finally:
        for proc in servers.values():
            launch.stop(proc)
    two, one = statistics.median(steps[2]), statistics.median(steps[1])
    s2, s1 = statistics.median(samples[2]), statistics.median(samples[1])
    note = "reported (2 CPU ranks share 2 cores: overhead, not speed-up)"
    rows = [
        {
            "name": "step time (8x128 tokens) on 2 CPU ranks / 1 rank",
            "value": two,
            "baseline": one,
            "ratio": two / one,
            "target": note,
            "unit": "s",
        },
        {
            "name": "sampling 4 x 32 tokens on 2 CPU ranks / 1 rank",
            "value": s2,
            "baseline": s1,
            "ratio": s2 / s1,
            "target": note,
            "unit": "s",
        },
    ]
    return print_ratios("train service on several ranks", "distributed_bench", rows)


if __name__ == "__main__":
    main()
