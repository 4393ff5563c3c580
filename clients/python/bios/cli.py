"""The `bios` command line.

    bios serve render|train|tinker|all              run services (all = every one in one process)
    bios render FILE.jsonl --renderer NAME           show rendered conversations (colorized, or --json)
    bios sft FILE.jsonl --model NAME                 supervised fine-tuning with checkpoints and --resume
    bios sample --model NAME --prompt TEXT           sample a reply to one user message
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any


def _serve(args: argparse.Namespace) -> None:
    from bios.server.auth import ApiKeys
    from bios.server.grpc import wait_for_signal
    from bios.server.metrics import serve_metrics

    async def run() -> None:
        keys = ApiKeys.from_env()
        stops = []
        if args.service in ("render", "all"):
            from render_service import server as render_server

            running = await render_server.start(args.host, args.render_port, keys,
                                                allow_local_paths=args.allow_local_paths)
            stops.append(running.stop)
            print(f"render service on {args.host}:{running.port}", flush=True)
        if args.service in ("train", "all"):
            from train_service import server as train_server

            running = await train_server.start(args.host, args.train_port, args.checkpoint_dir, keys,
                                               allow_local_paths=args.allow_local_paths)
            stops.append(running.stop)
            print(f"train service on {args.host}:{running.port}", flush=True)
        if args.service in ("tinker", "all"):
            from tinker_gateway import server as tinker_server

            # `all`: the train service above; `tinker` alone: $BIOS_TRAIN_ADDRESS (default localhost:50052)
            train_address = f"127.0.0.1:{running.port}" if args.service == "all" else None
            gateway = await tinker_server.start(args.host, args.tinker_port, train_address, keys)
            stops.insert(0, gateway.stop)
            print(f"tinker gateway on http://{args.host}:{gateway.port}", flush=True)
        if args.metrics_port:
            serve_metrics(args.metrics_port)

        async def stop_all() -> None:
            await asyncio.gather(*(stop() for stop in stops))

        await wait_for_signal(stop_all)

    asyncio.run(run())


def _read_conversations(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{number}: not JSON: {exc}") from None
    return rows


def _render(args: argparse.Namespace) -> None:
    from bios_cookbook import renderers, tokenizer_utils
    from bios_cookbook.utils.format_colorized import format_colorized

    tokenizer = tokenizer_utils.get_tokenizer(args.tokenizer)
    renderer = renderers.get_renderer(args.renderer, tokenizer)
    for row in _read_conversations(args.file):
        example = renderer.supervised_example(row["messages"], args.train_on_what, row.get("tools"))
        if args.json:
            r = example.rendered
            print(json.dumps({"token_ids": r.token_ids, "weights": example.weights, "message_indices": r.message_indices,
                              "sampled_mask": r.sampled_mask, "is_content": r.is_content}))
        else:
            print(format_colorized(example.rendered.token_ids, example.weights, tokenizer) + "\n")


def _sft(args: argparse.Namespace) -> None:
    import bios

    conversations = [row["messages"] for row in _read_conversations(args.file)]
    client = bios.ServiceClient()
    if args.resume:
        training_client = client.create_training_client_from_state_with_optimizer(args.resume)
        print(f"resumed from {args.resume} at step {training_client.get_info().step}")
    else:
        training_client = client.create_lora_training_client(base_model=args.model, rank=args.rank)
    for epoch in range(args.epochs):
        results = training_client.train_on_conversations(conversations, renderer=args.renderer,
                                                         batch_size=args.batch_size, learning_rate=args.lr)
        checkpoint = training_client.save_state(name=f"{args.name}-epoch{epoch + 1}",
                                                metadata={"epoch": epoch + 1, "loss": results[-1].loss}).result()
        print(f"epoch {epoch + 1}: loss {results[-1].loss:.4f}, step {results[-1].step}, saved {checkpoint.path}")


def _sample(args: argparse.Namespace) -> None:
    import bios
    from bios import types

    client = bios.ServiceClient()
    sampler = (client.create_sampling_client(model_path=args.model) if args.model.startswith("bios://")
               else client.create_sampling_client(base_model=args.model))
    result = sampler.chat([{"role": "user", "content": args.prompt}], renderer=args.renderer,
                          sampling_params=types.SamplingParams(max_tokens=args.max_tokens,
                                                               temperature=args.temperature))
    print(result.message.get("content", ""))
    if not result.ok:
        print("(the reply did not end with a stop sequence)", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bios", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the services")
    serve.add_argument("service", choices=["render", "train", "tinker", "all"])
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--render-port", type=int, default=50051)
    serve.add_argument("--train-port", type=int, default=50052)
    serve.add_argument("--tinker-port", type=int, default=8000, help="the Tinker gateway (docs/tinker.md)")
    serve.add_argument("--metrics-port", type=int, default=0)
    serve.add_argument("--checkpoint-dir", default=None)
    serve.add_argument("--allow-local-paths", action="store_true",
                       help="let callers name models and tokenizers by a directory on this server (trusted callers "
                            "only; see python -m train_service --help)")
    serve.set_defaults(run=_serve)

    render = sub.add_parser("render", help="render a JSONL file of conversations")
    render.add_argument("file")
    render.add_argument("--renderer", default="ultrasafe")
    render.add_argument("--tokenizer", default="ultrasafe/usf-mini", help="model name or tokenizer directory")
    render.add_argument("--train-on-what", default="last_assistant_message")
    render.add_argument("--json", action="store_true", help="one JSON object per conversation")
    render.set_defaults(run=_render)

    sft = sub.add_parser("sft", help="supervised fine-tuning on a JSONL file of conversations")
    sft.add_argument("file")
    sft.add_argument("--model", default="ultrasafe/usf-mini")
    sft.add_argument("--renderer", default=None, help="default: the model's renderer")
    sft.add_argument("--rank", type=int, default=16)
    sft.add_argument("--epochs", type=int, default=1)
    sft.add_argument("--batch-size", type=int, default=8)
    sft.add_argument("--lr", type=float, default=1e-4)
    sft.add_argument("--name", default="sft", help="checkpoint name prefix")
    sft.add_argument("--resume", default=None, help="a state checkpoint path (bios://...) to continue from")
    sft.set_defaults(run=_sft)

    sample = sub.add_parser("sample", help="sample a reply")
    sample.add_argument("--model", required=True, help="base model name, or sampler weights bios://...")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--renderer", default=None)
    sample.add_argument("--max-tokens", type=int, default=128)
    sample.add_argument("--temperature", type=float, default=0.0)
    sample.set_defaults(run=_sample)
    return p


def main(argv: list[str] | None = None) -> Any:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return args.run(args)


if __name__ == "__main__":
    main()
