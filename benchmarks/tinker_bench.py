"""The Tinker gateway's overhead per operation: the same operation through the tinker SDK (HTTP + protobuf to
the gateway, then gRPC) vs the bios client (gRPC straight to the train service), on one train service.

Both drive the same tiny stand-in model in this process, alternately, one operation in flight at a time, so the
ratio is latency through the gateway over latency direct. The gateway adds a fixed cost per request (a submit
round trip, a retrieve_future round trip, translation), so on the tiny model the ratio is at its worst; on a real
model, where an operation takes 10-1000x longer, it tends to 1.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks import print_ratios

MODEL = "ultrasafe/usf-mini"
REPEATS = 9


def _median_ms(fn, repeats: int = REPEATS) -> float:
    fn()  # warm: first pass allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> list[dict]:
    import bios
    from bios import types as btypes
    from bios.futures import LoopThread
    from tinker_gateway import server as gateway_server
    from train_service import server as train_server

    loop = LoopThread.named("tinker-bench")
    checkpoints = tempfile.mkdtemp(prefix="tinker-bench-")
    train = loop.run(train_server.start("127.0.0.1", 0, checkpoints))
    gateway = loop.run(gateway_server.start("127.0.0.1", 0, f"127.0.0.1:{train.port}"))
    os.environ.update(
        TINKER_BASE_URL=f"http://127.0.0.1:{gateway.port}", TINKER_API_KEY="tml-bench", TINKER_TELEMETRY="0"
    )
    import tinker
    from tinker import types

    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(base_model=MODEL, rank=16, seed=0, train_unembed=False).result()
    direct = bios.ServiceClient(train_address=f"127.0.0.1:{train.port}")
    bc = direct.create_lora_training_client(base_model=MODEL, rank=16, seed=0)

    rng = np.random.default_rng(0)
    rows_ids = [rng.integers(0, 150_000, 129).tolist() for _ in range(2)]  # batch 2 x 128 tokens
    inputs = [{"target_tokens": ids[1:], "weights": [1.0] * 128} for ids in rows_ids]
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=i)
        for ids, i in zip(rows_ids, inputs)
    ]
    bdata = [
        btypes.Datum(model_input=btypes.ModelInput.from_ints(ids[:-1]), loss_fn_inputs=i)
        for ids, i in zip(rows_ids, inputs)
    ]
    adam = dict(learning_rate=1e-5, beta1=0.9, beta2=0.95, eps=1e-8)
    sampler = tc.save_weights_and_get_sampling_client().result()
    bsampler = bc.save_weights_and_get_sampling_client("bench")
    prompt = rows_ids[0][:64]
    greedy = dict(max_tokens=8, temperature=0.0)

    operations = {
        "forward (2 x 128 tokens)": (
            lambda: tc.forward(data, "cross_entropy").result(),
            lambda: bc.forward(bdata, "cross_entropy").result(),
        ),
        "forward_backward + optim_step (2 x 128 tokens)": (
            lambda: (tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(**adam)).result()),
            lambda: (bc.forward_backward(bdata, "cross_entropy"), bc.optim_step(btypes.AdamParams(**adam)).result()),
        ),
        "sample (64-token prompt, 8 tokens, 1 sample)": (
            lambda: sampler.sample(
                types.ModelInput.from_ints(prompt), 1, types.SamplingParams(stop=[], **greedy)
            ).result(),
            lambda: bsampler.sample(btypes.ModelInput.from_ints(prompt), btypes.SamplingParams(**greedy)).result(),
        ),
        "compute_logprobs (64 tokens)": (
            lambda: sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result(),
            lambda: bsampler.compute_logprobs(btypes.ModelInput.from_ints(prompt)).result(),
        ),
    }
    rows = []
    try:
        for name, (through_gateway, through_bios) in operations.items():
            gateway_ms, bios_ms = [], []
            for _ in range(3):  # alternate, so drift (other load, thermal) hits both alike
                gateway_ms.append(_median_ms(through_gateway, REPEATS // 3))
                bios_ms.append(_median_ms(through_bios, REPEATS // 3))
            value, baseline = statistics.median(gateway_ms), statistics.median(bios_ms)
            rows.append(
                {
                    "name": f"tinker gateway ms / bios client ms: {name}",
                    "value": value,
                    "baseline": baseline,
                    "ratio": value / baseline,
                    "overhead_ms": value - baseline,
                    "target": "<= 1.5 on the tiny stand-in (fixed cost per request)",
                }
            )
    finally:
        service.close("success").result()
        direct.close()
        loop.run(gateway.stop())
        loop.run(train.stop(None, checkpoint=False))
    return print_ratios(
        "tinker gateway: latency per operation, through the gateway vs direct gRPC", "tinker_bench", rows
    )


if __name__ == "__main__":
    main()
