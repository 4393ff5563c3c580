"""`bios sample` (one reply) and `bios chat` (an interactive conversation): render the prompt with the model's
renderer (or --renderer), sample, and parse the reply back into a message (content, reasoning, tool calls)."""

from __future__ import annotations

import json
import sys
from typing import Any

from bios import types
from bios_server.cli.common import connect, non_negative_float, positive_int
from bios_server.cli.output import Console
from bios_server.cli.records import read_tools

FIELDS = {"base_model": "--model", "model_path": "--model", "renderer": "--renderer", "renderer.tokenizer": "--model"}


def register(command, common) -> None:
    p = command("sample", "sample a reply to one prompt")
    add_model_arguments(p, temperature=0.0, max_tokens=128)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--num-samples", type=positive_int, default=1, help="independent replies")
    p.add_argument("--json", action="store_true", help="one JSON object per reply (message, ok, tokens)")
    p.set_defaults(run=run_sample, fields=FIELDS)

    c = command(
        "chat",
        "chat with a model, turn after turn",
        "Chat with a model: each line you type is a user message; the whole conversation so far is the "
        "prompt.\nCommands: /reset (start over), /tool TEXT (answer the last tool call), /exit (or end of "
        "input).",
    )
    add_model_arguments(c, temperature=0.7, max_tokens=256)
    c.add_argument("--tools", default=None, metavar="FILE.json", help="a JSON list of tools the model may call")
    c.set_defaults(run=run_chat, fields=FIELDS)


def add_model_arguments(p, temperature: float, max_tokens: int) -> None:
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME|bios://...",
        help="a base model name, or sampler weights saved by `bios sft` (bios://MODEL/sampler/NAME)",
    )
    p.add_argument("--renderer", default=None, metavar="NAME", help="renderer family (default: the model's own)")
    p.add_argument("--system", default=None, help="a system message before the conversation")
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens, help="most tokens in a reply")
    p.add_argument("--temperature", type=non_negative_float, default=temperature, help="0: always the likeliest token")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for replies that repeat")


class Chat:
    """A sampler and its renderer: messages in, parsed replies out."""

    def __init__(self, args: Any):
        self.client = connect(args)
        model = args.model
        self.sampler = (
            self.client.create_sampling_client(model_path=model)
            if model.startswith("bios://")
            else self.client.create_sampling_client(base_model=model)
        )
        self.renderer = self.client.render_client(
            args.renderer or self.sampler.renderer_name or "", self.sampler.tokenizer_name
        )
        self.params = types.SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            stop=self.renderer.get_stop_sequences(),
        )
        self.system = [{"role": "system", "content": args.system}] if args.system else []

    def replies(
        self, messages: list[dict], tools: list[dict] | None = None, n: int = 1
    ) -> list[tuple[dict, bool, list]]:
        prompt = self.renderer.render([*self.system, *messages], tools=tools, add_generation_prompt=True)
        output = self.sampler.sample(types.ModelInput.from_ints(prompt.token_ids), self.params, num_samples=n).result()
        return [(*self.renderer.parse_response(s.tokens, tools), s.tokens) for s in output.sequences]


def show(message: dict) -> str:
    text = message.get("content") or ""
    if message.get("reasoning_content"):
        text = f"(thinking: {message['reasoning_content']})\n{text}"
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        text += f"\n[tool call] {function.get('name')}({json.dumps(function.get('arguments'))})"
    return text.strip("\n")


def run_sample(args: Any, console: Console) -> int:
    chat = Chat(args)
    for message, ok, tokens in chat.replies([{"role": "user", "content": args.prompt}], n=args.num_samples):
        if args.json:
            console.print(json.dumps({"message": message, "ok": ok, "tokens": tokens}))
            continue
        console.print(show(message))
        if not ok:
            console.note(
                console.paint(
                    f"(the reply reached --max-tokens {args.max_tokens} before its end-of-turn token)", "warn"
                )
            )
    return 0


def run_chat(args: Any, console: Console) -> int:
    tools = read_tools(args.tools)
    chat = Chat(args)
    interactive = sys.stdin.isatty()
    if interactive:
        console.note(console.paint(f"chatting with {args.model} — /reset starts over, /exit ends", "dim"))
    messages: list[dict] = []
    while True:
        try:
            line = input(console.paint("you: ", "bold") if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages.clear()
            console.note("(a new conversation)")
            continue
        if line.startswith("/tool "):
            messages.append({"role": "tool", "content": line.removeprefix("/tool ")})
        else:
            messages.append({"role": "user", "content": line})
        message, ok, _ = chat.replies(messages, tools)[0]
        messages.append(message)
        console.print(console.paint("assistant: ", "accent") + show(message))
        if not ok:
            console.note(console.paint(f"(the reply reached --max-tokens {args.max_tokens})", "warn"))
    return 0
