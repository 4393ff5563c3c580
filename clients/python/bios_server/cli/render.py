"""`bios render FILE.jsonl`: what a renderer makes of each conversation, and which tokens carry loss weight.

Renders in this process with the same renderers as the render service. The renderer follows the tokenizer (the
model's registered family) unless --renderer is given; a renderer whose special tokens the tokenizer lacks is
refused, naming both.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from bios.v1 import render_pb2
from bios_server.cli.output import Console, UsageError
from bios_server.cli.records import read_records, read_tools
from render_service.model_registry import resolve
from render_service.renderers import RenderError, get_renderer
from render_service.tokenizers import get_tokenizer

DEFAULT_MODEL = "ultrasafe/usf-mini"


def train_on_what_choices() -> list[str]:
    return [name.lower() for name, value in render_pb2.TrainOnWhat.items() if value]


def register(command, common) -> None:
    p = command("render", "show how conversations render: tokens, and which ones are trained", __doc__)
    p.add_argument("file", metavar="FILE.jsonl", help='chat JSONL: one {"messages": [...], "tools"?: [...]} a line')
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="NAME",
        help=f"model name or tokenizer directory (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--renderer",
        default=None,
        metavar="NAME",
        help="renderer family (default: the tokenizer's own; `bios info` lists them)",
    )
    add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object per conversation instead of the coloured view")
    p.set_defaults(
        run=run,
        fields={
            "renderer.tokenizer": "--tokenizer",
            "tokenizer": "--tokenizer",
            "base_model": "--tokenizer",
            "renderer": "--renderer",
        },
    )


def add_data_arguments(p) -> None:
    """What render and sft share: which tokens are trained, and tools for records without their own."""
    p.add_argument(
        "--train-on-what",
        default="last_assistant_message",
        choices=train_on_what_choices(),
        help='which messages carry loss weight (customized: those with "trainable": true)',
    )
    p.add_argument(
        "--tools",
        default=None,
        metavar="FILE.json",
        help='a JSON list of tools, for records that have no "tools" of their own',
    )


def load_renderer(tokenizer_name: str | None, renderer_name: str | None) -> tuple[Any, Any, str]:
    """(renderer, tokenizer, renderer name): the renderer follows the tokenizer unless given."""
    name = tokenizer_name or DEFAULT_MODEL
    entry = resolve(name, allow_local_paths=True, field="--tokenizer")
    tokenizer = get_tokenizer(name, allow_local_paths=True, field="--tokenizer")
    label = name if tokenizer_name else f"{name} (the default --tokenizer)"
    renderer = get_renderer(renderer_name or entry.renderer, tokenizer, tokenizer_name=label)
    return renderer, tokenizer, renderer_name or entry.renderer


def run(args: Any, console: Console) -> int:
    records = read_records(args.file, read_tools(args.tools))
    renderer, tokenizer, renderer_name = load_renderer(args.tokenizer, args.renderer)
    for n, record in enumerate(records):
        try:
            example = renderer.supervised_example(record.messages, args.train_on_what, record.tools)
        except RenderError as exc:
            raise UsageError(f"{args.file}:{record.line}: {exc}") from None
        rendered, weights = example.rendered, example.weights
        if args.json:
            console.print(
                json.dumps(
                    {
                        "line": record.line,
                        "token_ids": rendered.token_ids,
                        "weights": weights,
                        "message_indices": rendered.message_indices,
                        "sampled_mask": rendered.sampled_mask,
                        "is_content": rendered.is_content,
                    }
                )
            )
            continue
        if n == 0:
            console.print(legend(console) + console.paint(f"   renderer {renderer_name}", "dim"))
        trained = sum(1 for w in weights if w > 0)
        console.print(
            console.paint(f"── {args.file}:{record.line} · {len(weights)} tokens · {trained} trained ──", "dim")
        )
        console.print(colorized(console, rendered.token_ids, weights, tokenizer))
    return 0


def legend(console: Console) -> str:
    if console.color:
        prompt, trained = console.paint("prompt (weight 0)", "prompt"), console.paint("trained (weight > 0)", "trained")
        return f"legend: {prompt}  {trained}"
    return "legend: ⟦trained tokens (weight > 0)⟧, the rest is prompt (weight 0)"


def colorized(console: Console, tokens: list[int], weights: list[float], tokenizer: Any) -> str:
    """Runs of prompt / trained tokens decoded; newlines shown as ↵ so the template's own line breaks are visible."""
    out = []
    for trained, run in groupby(zip(tokens, weights), key=lambda pair: pair[1] > 0):
        text = tokenizer.decode([t for t, _ in run]).replace("\n", "↵\n")
        if console.color:
            out.append(console.paint(text, "trained" if trained else "prompt"))
        else:
            out.append(f"⟦{text}⟧" if trained else text)
    return "".join(out)
