"""GPU check of the train engine's numerical core: one command, needing only torch, transformers and peft (no
gRPC, no generated code), so it runs on a bare GPU machine.

    python -m benchmarks.gpu_check                         # on a CUDA machine (about 3 minutes on one H200)
    python -m benchmarks.gpu_check --device cpu --small    # the same code paths on CPU with a tiny model (CI)
    torchrun --standalone --nproc-per-node=8 -m benchmarks.gpu_check    # 8 GPUs: FSDP2-sharded, data-parallel

It measures, on a Qwen3-0.6B-shaped model with random weights (bf16 base, fp32 LoRA, bf16 autocast):
  1. LoRA forward_backward at 8 x 2048 tokens: time, tokens/s and MFU (model FLOPs, below, over --peak-tflops);
  2. 8 sessions (adapters) x batch 2 x 512 tokens: one coalesced pass vs one pass per session, tokens/s;
  3. sampling: one decode group of 8 adapters x 4 samples vs HF `generate` on the same rows, tokens/s;
  4. peak device memory of each;
  5. the same model and adapter in fp32 on the CPU and in bf16 on the device: losses agree within bf16 tolerance.
The last line printed is one JSON object with every number (also written to --out when given). Under torchrun the
base is sharded over the ranks (train_service.distributed): passes are data-parallel and MFU is per GPU; sampling
runs every row on every rank; the fp32-CPU agreement check (5) and the HF generate baseline run on one rank only.

Model FLOPs of a LoRA forward_backward, per token, with the base frozen (no weight gradients for it):
4 x (decoder Linear parameters + LM head parameters) + 6 x layers x context x heads x head_dim (causal attention,
forward and backward); LoRA's own FLOPs and activation-checkpointing recomputation are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "clients/python")]

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402

from train_service import distributed, passes  # noqa: E402
from train_service.device import DeviceConfig  # noqa: E402
from train_service.losses import get_loss  # noqa: E402
from train_service.models import BaseModel  # noqa: E402
from train_service.optimizer import new_optimizer  # noqa: E402
from train_service.passes import Part, Rows  # noqa: E402
from train_service.sampler import DecodeGroup, SampleRequest, SamplingOptions  # noqa: E402
from train_service.scheduler import SampleWork  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM bf16 dense figure (no sparsity)


def qwen3_config(small: bool) -> transformers.Qwen3Config:
    if small:
        dims = dict(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    else:  # Qwen3-0.6B
        dims = dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
        )
    return transformers.Qwen3Config(
        **dims,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attn_implementation="sdpa",
        use_cache=True,
    )


def build(
    config: transformers.Qwen3Config, device: DeviceConfig, seed: int = 0, ranks: distributed.Ranks | None = None
) -> BaseModel:
    """Random weights drawn on the CPU from `seed` (the same on every device and rank), then moved and cast."""
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    base = BaseModel("random:qwen3", model.to(device.device, device.dtype), device, ranks)
    if ranks is not None:
        ranks.shard(base)
    return base


def adapter(base: BaseModel, name: str, seed: int, rank: int = 16):
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    a = base.new_adapter(name, config, seed=seed)
    with torch.no_grad():  # B away from zero, so the adapter changes the outputs
        for p in a.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)).to(p.device) * 1e-3)
    return a


def rows(n: int, length: int, vocab: int, seed: int) -> Rows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length + 1), generator=g).numpy()
    return Rows([r[:-1] for r in ids], [r[1:] for r in ids], [{"weights": torch.ones(length).numpy()} for _ in ids])


def sync(device: DeviceConfig) -> None:
    if device.is_cuda:
        torch.cuda.synchronize(device.device)


def timed(fn, device: DeviceConfig, repeats: int) -> float:
    fn()  # warm up (kernels, allocator)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak(device: DeviceConfig) -> None:
    if device.is_cuda:
        torch.cuda.reset_peak_memory_stats(device.device)


def peak_gib(device: DeviceConfig) -> float:
    return device.memory()["peak"] / 2**30


def model_flops_per_token(config: transformers.Qwen3Config, context: int) -> float:
    d, layers, heads, hd = config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.head_dim
    kv, inter, vocab = config.num_key_value_heads, config.intermediate_size, config.vocab_size
    linear = layers * (d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * inter)
    return 4 * (linear + vocab * d) + 6 * layers * context * heads * hd


def forward_backward(base: BaseModel, parts: list[Part]) -> None:
    for part in parts:
        for p in part.adapter.parameters():
            p.grad = None
    results = (distributed.run_pass if base.ranks is not None else passes.run_pass)(base, parts, backward=True)
    assert all(r.error is None for r in results), [r.error for r in results]


def check_mfu(base, config, device, batch, length, repeats, peak_tflops) -> dict:
    loss, _ = get_loss("cross_entropy", {})
    a = adapter(base, "mfu", 1)
    data = rows(batch, length, config.vocab_size, 1)
    part = Part(a, data, 0, batch, loss, {})
    reset_peak(device)
    seconds = timed(lambda: forward_backward(base, [part]), device, repeats)
    tokens = batch * length
    flops = model_flops_per_token(config, length) * tokens
    gpus = base.ranks.world if base.ranks is not None else 1
    return {
        "tokens": tokens,
        "ranks": gpus,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / 1e12 / (peak_tflops * gpus),
        "peak_memory_gib": peak_gib(device),
    }


def check_coalescing(base, config, device, sessions, batch, length, repeats) -> dict:
    loss, _ = get_loss("cross_entropy", {})
    adapters = [adapter(base, f"s{i}", 10 + i) for i in range(sessions)]
    optimizers = [new_optimizer(a.parameters()) for a in adapters]
    parts = [
        Part(a, rows(batch, length, config.vocab_size, 10 + i), 0, batch, loss, {}) for i, a in enumerate(adapters)
    ]

    def step_all():
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)

    def coalesced():
        forward_backward(base, parts)
        step_all()

    def sequential():
        for part in parts:
            forward_backward(base, [part])
        step_all()

    reset_peak(device)
    together = timed(coalesced, device, repeats)
    peak_together = peak_gib(device)
    alone = timed(sequential, device, repeats)
    tokens = sessions * batch * length
    return {
        "sessions": sessions,
        "tokens": tokens,
        "coalesced_tokens_per_s": tokens / together,
        "sequential_tokens_per_s": tokens / alone,
        "ratio": alone / together,
        "peak_memory_gib": peak_together,
    }


def check_sampling(base, config, device, requests, samples, prompt_len, max_tokens) -> dict:
    adapters = [adapter(base, f"g{i}", 30 + i) for i in range(requests)]
    prompts = [rows(1, prompt_len, config.vocab_size, 40 + i).ids[0].tolist() for i in range(requests)]
    options = SamplingOptions(max_tokens=max_tokens, temperature=1.0, seed=1)

    def ours():
        works = [SampleWork(base, SampleRequest(p, options, samples, a, None)) for p, a in zip(prompts, adapters)]
        group = DecodeGroup(base, works)
        while group.active:
            group.step()

    model = base.causal_lm
    ids = torch.tensor([p for p in prompts for _ in range(samples)], device=device.device)

    def hf():
        with torch.inference_mode(), device.autocast(), base.router.route([passes.Segment(None, 0, len(ids))]):
            model.generate(
                ids,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                pad_token_id=0,
            )

    reset_peak(device)
    seconds = timed(ours, device, 2)
    peak = peak_gib(device)
    tokens = requests * samples * max_tokens
    out = {
        "rows": requests * samples,
        "max_tokens": max_tokens,
        "bios_tokens_per_s": tokens / seconds,
        "peak_memory_gib": peak,
    }
    if base.ranks is None:  # HF generate knows nothing of our ranks
        hf_seconds = timed(hf, device, 2)
        out.update(hf_generate_tokens_per_s=tokens / hf_seconds, ratio=hf_seconds / seconds)
    return out


def check_agreement(config, device, length) -> dict:
    """The same weights and adapter in fp32 on the CPU and in the device's precision: per-token losses agree."""
    loss, _ = get_loss("cross_entropy", {})
    data = rows(2, length, config.vocab_size, 7)
    out = {}
    for name, where in (("cpu_fp32", DeviceConfig.resolve("cpu")), ("device", device)):
        base = build(config, where, seed=3)
        a = adapter(base, "agree", 5)
        result = passes.run_pass(base, [Part(a, data, 0, 2, loss, {})], backward=True)[0]
        grads = torch.cat([p.grad.float().flatten().cpu() for p in a.parameters()])
        out[name] = (result.loss / (2 * length), torch.tensor([x for lp in result.logprobs for x in lp]), grads)
        del base
    (cpu_loss, cpu_lp, cpu_g), (dev_loss, dev_lp, dev_g) = out["cpu_fp32"], out["device"]
    rel = abs(dev_loss - cpu_loss) / abs(cpu_loss)
    cosine = float(torch.nn.functional.cosine_similarity(cpu_g, dev_g, dim=0))
    tolerance = 2e-2 if device.is_cuda else 1e-6  # bf16 keeps ~3 significant digits
    return {
        "cpu_fp32_loss_per_token": cpu_loss,
        "device_loss_per_token": dev_loss,
        "relative_difference": rel,
        "max_logprob_difference": float((cpu_lp - dev_lp).abs().max()),
        "gradient_cosine": cosine,
        "tolerance": tolerance,
        "agree": bool(rel <= tolerance and cosine >= 0.99),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--small", action="store_true", help="a tiny model and short sequences (for CPU runs)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_DENSE_TFLOPS,
        help="the device's dense bf16 peak for MFU (default: H200, %(default)s)",
    )
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)

    ranks = distributed.Ranks.from_env(use_cuda=args.device != "cpu")  # under torchrun
    device = DeviceConfig.resolve(
        ranks.device if ranks is not None and args.device != "cpu" else args.device, args.activation_checkpointing
    )
    config = qwen3_config(args.small)
    leader = ranks is None or ranks.rank == 0
    say = print if leader else (lambda *a, **k: None)
    sizes = (
        dict(mfu=(2, 64, 2), coalesce=(8, 2, 32, 2), sample=(8, 4, 16, 8), agree=32)
        if args.small
        else dict(mfu=(8, 2048, 5), coalesce=(8, 2, 512, 5), sample=(8, 4, 128, 128), agree=128)
    )
    report = {
        "device": device.describe(),
        "dtype": device.dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "qwen3-tiny" if args.small else "qwen3-0.6b-shaped",
        "activation_checkpointing": args.activation_checkpointing,
        "ranks": ranks.world if ranks else 1,
    }
    started = time.perf_counter()
    base = build(config, device, ranks=ranks)
    batch, length, repeats = sizes["mfu"]
    report["forward_backward"] = check_mfu(base, config, device, batch, length, repeats, args.peak_tflops)
    say("forward_backward", report["forward_backward"], flush=True)
    report["coalescing"] = check_coalescing(base, config, device, *sizes["coalesce"])
    say("coalescing", report["coalescing"], flush=True)
    report["sampling"] = check_sampling(base, config, device, *sizes["sample"])
    say("sampling", report["sampling"], flush=True)
    del base
    report["targets"] = {
        "mfu >= 0.35": report["forward_backward"]["mfu"] >= 0.35,
        "coalesced >= 4x sequential": report["coalescing"]["ratio"] >= 4.0,
    }
    if ranks is None:
        report["agreement"] = check_agreement(config, device, sizes["agree"])
        say("agreement", report["agreement"], flush=True)
        report["targets"]["fp32 cpu vs device agree"] = report["agreement"]["agree"]
    report["seconds"] = time.perf_counter() - started
    if leader:
        line = json.dumps(report)
        print(line)
        if args.out:
            Path(args.out).write_text(line + "\n")
    if ranks is not None:
        ranks.close()
    return report


if __name__ == "__main__":
    main()
