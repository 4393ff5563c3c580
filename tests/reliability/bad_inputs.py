"""The bad-input matrix: malformed requests to both services over raw stubs, each with the status it must get.

Every case names the status and a text its message must contain (the field at fault, e.g.
`messages[2].tool_calls[0].arguments`); cases a caller may legally send expect OK. After each case a good request
must still be answered exactly as before it (same tokens, same loss): a bad request changes nothing.

Run by test_bad_inputs.py; `.venv/bin/python tests/reliability/matrix.py` prints the table in docs/reliability.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from bios.v1 import render_pb2 as R
from bios.v1 import train_pb2 as T
from bios.v1 import types_pb2 as Y

OK, INVALID, NOT_FOUND, EXHAUSTED, PRECONDITION = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
)
MODEL = "ultrasafe/usf-mini"
VOCAB = 151936  # the stand-in's embedding rows; its tokenizer knows 151669 ids
DEEP = "[" * 100_000 + "]" * 100_000


@dataclass
class Case:
    id: str
    service: str  # "render" or "train"
    method: str
    request: Any  # a message, a list of messages (streams), bytes (raw), or a function of the Context giving one
    code: grpc.StatusCode
    field: str = ""  # must appear in the status message


@dataclass
class Context:
    """What the cases refer to, made once against the live servers."""

    session: str
    model: str  # rank 4 LoRA on MODEL
    sampler: str
    state: str  # a state checkpoint of `model`
    sampler_path: str  # a sampler checkpoint of `model`
    rank8_state: str  # a state of a rank-8 model on the same base
    tokenizer_dir: str  # a directory holding a real tokenizer (a server path: must be refused like a missing name)
    seq: int = 100


# ---- request builders -------------------------------------------------------------------------------------


def spec(name: str = "ultrasafe", tokenizer: str = MODEL, **options: Any) -> R.RendererSpec:
    pb = R.RendererSpec(name=name, tokenizer=tokenizer)
    if options:
        pb.options.update(options)
    return pb


def msg(role: str = "user", content: str | None = "Hi", **kw: Any) -> Y.Message:
    return Y.Message(role=role, **({} if content is None else {"content": content}), **kw)


def call(name: str = "lookup", arguments: str = "{}", **kw: Any) -> Y.ToolCall:
    return Y.ToolCall(name=name, arguments_json=arguments, **kw)


TOOL = Y.ToolSpec(name="lookup", description="Look up.", parameters_json='{"type": "object"}')
GOOD = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello.")]


def conv(*messages: Y.Message, tools: tuple = ()) -> R.Conversation:
    return R.Conversation(messages=list(messages or GOOD), tools=list(tools))


def render(*messages: Y.Message, tools: tuple = (), **spec_kw: Any) -> R.RenderRequest:
    return R.RenderRequest(renderer=spec(**spec_kw), conversation=conv(*messages, tools=tools))


def qwen(*messages: Y.Message, tools: tuple = ()) -> R.RenderRequest:
    return render(*messages, tools=tools, name="qwen2.5")


def with_call(*calls: Y.ToolCall) -> R.RenderRequest:
    return qwen(
        msg("user", "Find x."), msg("assistant", "", tool_calls=list(calls)), msg("tool", "found"), tools=(TOOL,)
    )


def tool(**kw: Any) -> R.RenderRequest:
    return qwen(*GOOD, tools=(Y.ToolSpec(**kw),))


def parse(tokens: list[int], **spec_kw: Any) -> R.ParseResponseRequest:
    return R.ParseResponseRequest(renderer=spec(**spec_kw), tokens=tokens)


def batch(conversations: list[R.Conversation], **kw: Any) -> R.RenderBatchRequest:
    return R.RenderBatchRequest(renderer=spec(), conversations=conversations, **kw)


def bridge(
    prompt=(151644, 872, 198), completion=(9707, 151645), new_turn=None, history=(), **kw
) -> R.BridgeToNextTurnRequest:
    return R.BridgeToNextTurnRequest(
        renderer=spec(),
        prev_prompt_ids=list(prompt),
        prev_completion_ids=list(completion),
        new_turn=new_turn or conv(msg("user", "And?")),
        history=list(history),
        **kw,
    )


def lines(*texts: str, **first: Any) -> list[R.ConversationsToDataRequest]:
    """One request with the settings and these lines (a list: ConversationsToData is a stream)."""
    return [R.ConversationsToDataRequest(renderer=first.pop("renderer", spec()), lines=list(texts), **first)]


def line(*messages: dict, **extra: Any) -> str:
    return json.dumps(
        {
            "messages": list(messages)
            or [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
            **extra,
        }
    )


def tensor(values: list, dtype: int = Y.DTYPE_INT64, data: bytes | None = None) -> Y.Tensor:
    import numpy as np

    array = np.asarray(values, dtype={Y.DTYPE_INT64: np.int64, Y.DTYPE_FLOAT32: np.float32}.get(dtype, np.float32))
    return Y.Tensor(dtype=dtype, shape=[len(values)], data=array.tobytes() if data is None else data)


def datum(tokens=None, targets=None, weights=None, **extra: Y.Tensor) -> Y.Datum:
    tokens = list(range(100, 110)) if tokens is None else tokens
    targets = [t + 1 for t in tokens] if targets is None else targets
    inputs = {"target_tokens": targets if isinstance(targets, Y.Tensor) else tensor(targets)}
    if weights is not False:
        inputs["weights"] = (
            weights
            if isinstance(weights, Y.Tensor)
            else tensor([1.0] * len(tokens) if weights is None else weights, Y.DTYPE_FLOAT32)
        )
    inputs.update(extra)
    chunk = Y.Chunk(encoded_text=Y.EncodedTextChunk(tokens=tokens))
    return Y.Datum(model_input=Y.ModelInput(chunks=[chunk]), loss_fn_inputs=inputs)


def op(**kw: Any) -> Callable[[Context], list[T.OperationRequest]]:
    """An Operate stream of one operation on the context's model (a fresh sequence number each time)."""

    def build(ctx: Context) -> list[T.OperationRequest]:
        ctx.seq += 1
        return [T.OperationRequest(seq=ctx.seq, model_id=kw.pop("model_id", ctx.model), **kw)]

    return build


def forward(*data: Y.Datum, loss_fn: str = "", **config: float) -> Callable:
    return op(forward=T.ForwardBackwardInput(data=list(data) or [datum()], loss_fn=loss_fn, loss_fn_config=config))


def adam(**kw: float) -> Callable:
    params = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, **kw}
    return op(optim_step=T.OptimStepRequest(adam_params=Y.AdamParams(**params)))


def sample(prompt=(100, 101, 102), max_tokens: int = 2, num_samples: int = 1, chunks=None, **params: Any) -> Callable:
    def build(ctx: Context) -> T.SampleRequest:
        model_input = Y.ModelInput(chunks=chunks or [Y.Chunk(encoded_text=Y.EncodedTextChunk(tokens=list(prompt)))])
        return T.SampleRequest(
            sampler_id=ctx.sampler,
            prompt=model_input,
            num_samples=num_samples,
            sampling_params=Y.SamplingParams(max_tokens=max_tokens, **params),
        )

    return build


def create(base_model: str = MODEL, **lora: Any) -> Callable:
    lora = {"rank": 4, "train_attn": True, "train_mlp": True, **lora}
    return lambda ctx: T.CreateModelRequest(session_id=ctx.session, base_model=base_model, lora=Y.LoraConfig(**lora))


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


# ---- the cases ---------------------------------------------------------------------------------------------


def render_cases() -> list[Case]:
    c = []

    def add(id: str, method: str, request: Any, code: grpc.StatusCode = OK, field: str = "") -> None:
        c.append(Case(id, "render", method, request, code, field))

    # which renderer, over which tokenizer: names resolve through the registry only, paths are refused
    add("spec: tokenizer empty", "Render", render(tokenizer=""), INVALID, "renderer.tokenizer")
    for path in ("/etc", "../../..", "/no/such/dir", "~root", "ultrasafe/../../etc", "a\x00b", "/" + "x" * 5000):
        add(f"spec: tokenizer path {path[:24]!r}", "Render", render(tokenizer=path), NOT_FOUND, "renderer.tokenizer")
    add(
        "spec: tokenizer = a real tokenizer directory",
        "Render",
        lambda ctx: render(tokenizer=ctx.tokenizer_dir),
        NOT_FOUND,
        "renderer.tokenizer",
    )
    add("spec: tokenizer unknown model", "Render", render(tokenizer="no/such-model"), NOT_FOUND, "renderer.tokenizer")
    add("spec: renderer unknown", "Render", render(name="nope"), INVALID, "renderer")
    add("spec: renderer = model default", "Render", render(name=""))
    add("spec: renderer alias", "Render", render(name="chatml"))
    add(
        "spec: declarative template = /etc/passwd",
        "Render",
        render(name="declarative:/etc/passwd"),
        INVALID,
        "renderer.name",
    )
    add(
        "spec: declarative template = ../ path",
        "Render",
        render(name="declarative:../templates/chatml"),
        INVALID,
        "renderer.name",
    )
    add("spec: declarative template unknown", "Render", render(name="declarative:nosuch"), INVALID, "renderer.name")
    add("spec: declarative bundled template", "Render", render(name="declarative:chatml"))
    add(
        "spec: declarative options.template = a path",
        "Render",
        render(name="declarative", template="/etc/passwd"),
        INVALID,
        "renderer.options.template",
    )
    add(
        "spec: declarative options.template = bad object",
        "Render",
        render(name="declarative", template={"x": 1}),
        INVALID,
        "template",
    )
    add("spec: option nothing reads", "Render", render(foo=1), INVALID, "renderer.options.foo")
    add(
        "spec: option of another family",
        "Render",
        render(enable_thinking=True),
        INVALID,
        "renderer.options.enable_thinking",
    )
    add("spec: qwen3 enable_thinking", "Render", render(name="qwen3", enable_thinking=False))
    add(
        "spec: caller's chat template",
        "Render",
        render(name="chat_template", chat_template="{{ 1 }}"),
        INVALID,
        "renderer.options.chat_template",
    )
    add(
        "spec: reserved option",
        "Render",
        render(name="chat_template", tokenize=True),
        INVALID,
        "renderer.options.tokenize",
    )
    add(
        "spec: option the template does not read",
        "Render",
        render(name="chat_template", wizard=1),
        INVALID,
        "renderer.options.wizard",
    )
    add("spec: the tokenizer's own chat template", "Render", render(name="chat_template"))
    add(
        "spec: llama3.1 renderer over a Qwen tokenizer",
        "Render",
        render(name="llama3.1", date_string="1 Jan 2025"),
        INVALID,
        "renderer: 'llama3.1' does not match the tokenizer 'ultrasafe/usf-mini'",
    )

    # messages
    add("message: unknown role", "Render", render(msg("system", "x"), msg("wizard")), INVALID, "messages[1].role")
    add("message: empty role", "Render", render(msg("")), INVALID, "messages[0].role")
    add("message: role in capitals", "Render", render(msg("USER")), INVALID, "messages[0].role")
    add("message: no content", "Render", render(msg("system", "x"), msg("user", None)), INVALID, "messages[1].content")
    add("message: empty content", "Render", render(msg("user", "")))
    add("message: text parts", "Render", render(msg("user", None, parts=[Y.ContentPart(type="text", text="Hi")])))
    add(
        "message: image part",
        "Render",
        render(msg("system", "x"), msg("user", None, parts=[Y.ContentPart(type="image", image=b"\x89PNG")])),
        INVALID,
        "messages[1].content[0].type",
    )
    add(
        "message: untyped part with image bytes",
        "Render",
        render(msg("user", None, parts=[Y.ContentPart(image=b"\x89PNG")])),
        INVALID,
        "messages[0].content[0].type",
    )
    add(
        "message: video part",
        "Render",
        render(msg("user", None, parts=[Y.ContentPart(type="text", text="a"), Y.ContentPart(type="video", text="b")])),
        INVALID,
        "messages[0].content[1].type",
    )
    add(
        "message: tool result with no call",
        "Render",
        render(msg("user"), msg("tool", "42")),
        INVALID,
        "messages[1].role",
    )
    add(
        "message: assistant without content or calls",
        "Render",
        render(msg("user"), msg("assistant", None)),
        INVALID,
        "messages[1].content",
    )
    add("message: special-token text in content", "Render", render(msg("user", "<|im_end|>")))
    add("message: 2000 messages", "Render", render(*[msg("user", "a"), msg("assistant", "b")] * 1000))
    add("message: over 4 MB", "Render", render(msg("user", "x" * 4_000_001)), EXHAUSTED, "messages")
    add("message: trainable outside customized", "Render", render(msg("user", trainable=True)))

    # tool calls (qwen2.5 renders them)
    add(
        "tool call: arguments not JSON",
        "Render",
        with_call(call(arguments="{")),
        INVALID,
        "messages[1].tool_calls[0].arguments",
    )
    add(
        "tool call: arguments nested 100,000 deep",
        "Render",
        with_call(call(arguments=DEEP)),
        INVALID,
        "messages[1].tool_calls[0].arguments",
    )
    add(
        "tool call: arguments nested 65 deep",
        "Render",
        with_call(call(), call(arguments=nested(65))),
        INVALID,
        "messages[1].tool_calls[1].arguments",
    )
    add("tool call: arguments nested 60 deep", "Render", with_call(call(arguments=nested(60))))
    add("tool call: arguments a JSON number", "Render", with_call(call(arguments="42")))
    add("tool call: arguments as text", "Render", with_call(call(arguments="not json", arguments_as_text=True)))
    add("tool call: no name", "Render", with_call(call(name="")), INVALID, "messages[1].tool_calls[0].function.name")
    add("tool call: with id and status", "Render", with_call(call(id="c1", status=Y.TOOL_CALL_STATUS_OK)))

    # tools
    add("tool: spec_json a number", "Render", tool(spec_json="42"), INVALID, "tools[0].spec_json")
    add("tool: spec_json not JSON", "Render", tool(spec_json="{"), INVALID, "tools[0].spec_json")
    add("tool: spec_json nested 100,000 deep", "Render", tool(spec_json=DEEP), INVALID, "tools[0].spec_json")
    add("tool: spec_json without a name", "Render", tool(spec_json="{}"), INVALID, "tools[0].spec_json.name")
    add(
        "tool: spec_json function a string",
        "Render",
        tool(spec_json='{"function": "f"}'),
        INVALID,
        "tools[0].spec_json.function",
    )
    add(
        "tool: spec_json parameters a list",
        "Render",
        tool(spec_json='{"type": "function", "function": {"name": "f", "parameters": [1]}}'),
        INVALID,
        "tools[0].spec_json.function.parameters",
    )
    add(
        "tool: parameters_json not JSON",
        "Render",
        tool(name="f", parameters_json="{"),
        INVALID,
        "tools[0].parameters_json",
    )
    add(
        "tool: parameters_json a list",
        "Render",
        tool(name="f", parameters_json="[1]"),
        INVALID,
        "tools[0].parameters_json",
    )
    add(
        "tool: parameters_json nested 100,000 deep",
        "Render",
        tool(name="f", parameters_json=DEEP),
        INVALID,
        "tools[0].parameters_json",
    )
    add("tool: no name", "Render", tool(description="x"), INVALID, "tools[0].name")
    add(
        "tool: second tool bad",
        "Render",
        qwen(*GOOD, tools=(TOOL, Y.ToolSpec(name="g", parameters_json="1"))),
        INVALID,
        "tools[1].parameters_json",
    )
    add(
        "tool: good spec_json",
        "Render",
        tool(spec_json='{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}'),
    )

    # generation prompts and supervised examples
    gen = lambda prefill, *m: R.BuildGenerationPromptRequest(renderer=spec(), conversation=conv(*m), prefill=prefill)  # noqa: E731
    add("prefill: 10 MB", "BuildGenerationPrompt", gen("x" * 10_000_000, msg()), EXHAUSTED, "prefill")
    add(
        "prefill: 3 MB + a 2 MB conversation",
        "BuildGenerationPrompt",
        gen("x" * 3_000_000, msg("user", "y" * 2_000_000)),
        EXHAUSTED,
        "messages",
    )
    add("prefill: empty", "BuildGenerationPrompt", gen("", msg()))
    add("prefill: special-token text", "BuildGenerationPrompt", gen("<|im_end|>", msg()))
    add("generation prompt: bad role", "BuildGenerationPrompt", gen("", msg("robot")), INVALID, "messages[0].role")
    sup = lambda **kw: R.BuildSupervisedExampleRequest(renderer=spec(), conversation=conv(), **kw)  # noqa: E731
    add("supervised: train_on_what 99", "BuildSupervisedExample", sup(train_on_what=99), INVALID, "train_on_what")
    add("supervised: train_on_what -1", "BuildSupervisedExample", sup(train_on_what=-1), INVALID, "train_on_what")
    add(
        "supervised: content_sft_roles unknown",
        "BuildSupervisedExample",
        sup(content_sft_roles=["user", "wizard"]),
        INVALID,
        "content_sft_roles[1]",
    )
    add("supervised: content_sft_roles user", "BuildSupervisedExample", sup(content_sft_roles=["user"]))
    add("supervised: customized, nothing trainable", "BuildSupervisedExample", sup(train_on_what=R.CUSTOMIZED))
    add(
        "supervised: no assistant message",
        "BuildSupervisedExample",
        R.BuildSupervisedExampleRequest(renderer=spec(), conversation=conv(msg())),
    )
    add(
        "supervised: bad tool",
        "BuildSupervisedExample",
        R.BuildSupervisedExampleRequest(
            renderer=spec(name="qwen2.5"), conversation=conv(*GOOD, tools=(Y.ToolSpec(spec_json="[]"),))
        ),
        INVALID,
        "tools[0].spec_json",
    )

    # token ids sent back: ParseResponse, GetStopSequences
    add("parse: token -5", "ParseResponse", parse([100, -5]), INVALID, "tokens[1]")
    add("parse: token 2e9", "ParseResponse", parse([2_000_000_000]), INVALID, "tokens[0]")
    add("parse: token past the vocabulary", "ParseResponse", parse([100, VOCAB + 10]), INVALID, "tokens[1]")
    add("parse: token at the embedding size", "ParseResponse", parse([VOCAB]), INVALID, "tokens[0]")
    add("parse: padding token past the tokenizer's ids", "ParseResponse", parse([100, VOCAB - 1, 151645]))
    add("parse: no tokens", "ParseResponse", parse([]))
    add("parse: 1.1M tokens", "ParseResponse", parse([100] * 1_100_000), EXHAUSTED, "tokens")
    add(
        "parse: bad tool",
        "ParseResponse",
        R.ParseResponseRequest(renderer=spec(), tokens=[100], tools=[Y.ToolSpec(spec_json="42")]),
        INVALID,
        "tools[0].spec_json",
    )
    add(
        "parse: call to an undeclared tool",
        "ParseResponse",
        R.ParseResponseRequest(
            renderer=spec(name="qwen2.5"),
            tokens=[151657, 4913, 606, 788, 330, 69, 497, 330, 16370, 788, 4687, 151658, 151645],
            tools=[TOOL],
        ),
    )
    add("parse: tokenizer path", "ParseResponse", parse([100], tokenizer="/etc"), NOT_FOUND, "renderer.tokenizer")
    stops = lambda **kw: R.GetStopSequencesRequest(renderer=spec(**kw))  # noqa: E731
    add("stops: tokenizer path", "GetStopSequences", stops(tokenizer="/etc"), NOT_FOUND, "renderer.tokenizer")
    add("stops: unknown renderer", "GetStopSequences", stops(name="nope"), INVALID, "renderer")
    add("stops: option nothing reads", "GetStopSequences", stops(bogus=True), INVALID, "renderer.options.bogus")
    add("stops: good", "GetStopSequences", stops())

    # RenderBatch
    bad = conv(msg("robot"))
    add("batch: kind 42", "RenderBatch", batch([conv()], kind=42), INVALID, "kind")
    add("batch: kind -1", "RenderBatch", batch([conv()], kind=-1), INVALID, "kind")
    add(
        "batch: train_on_what 99",
        "RenderBatch",
        batch([conv()], kind=R.SUPERVISED, train_on_what=99),
        INVALID,
        "train_on_what",
    )
    add(
        "batch: content_sft_roles unknown",
        "RenderBatch",
        batch([conv()], kind=R.SUPERVISED, content_sft_roles=["wizard"]),
        INVALID,
        "content_sft_roles[0]",
    )
    add("batch: 5000 conversations", "RenderBatch", batch([conv()] * 5000), EXHAUSTED, "conversations")
    add(
        "batch: bad conversation, offset 64",
        "RenderBatch",
        batch([conv()] * 3 + [bad], first_index=64),
        INVALID,
        "conversations[67].messages[0].role",
    )
    add(
        "batch: bad tool",
        "RenderBatch",
        batch([conv(), conv(*GOOD, tools=(Y.ToolSpec(spec_json="1"),))]),
        INVALID,
        "conversations[1].tools[0].spec_json",
    )
    add(
        "batch: oversized conversation",
        "RenderBatch",
        batch([conv(msg("user", "x" * 4_000_001))]),
        EXHAUSTED,
        "conversations[0].messages",
    )
    add("batch: no conversations", "RenderBatch", batch([]))
    add("batch: generation prompts", "RenderBatch", batch([conv(msg())] * 3, kind=R.GENERATION_PROMPT))
    add(
        "batch: tokenizer path",
        "RenderBatch",
        R.RenderBatchRequest(renderer=spec(tokenizer="/etc"), conversations=[conv()]),
        NOT_FOUND,
        "renderer.tokenizer",
    )

    # BridgeToNextTurn
    add("bridge: prompt id -1", "BridgeToNextTurn", bridge(prompt=[151644, -1]), INVALID, "prev_prompt_ids[1]")
    add(
        "bridge: completion id 2e9",
        "BridgeToNextTurn",
        bridge(completion=[2_000_000_000]),
        INVALID,
        "prev_completion_ids[0]",
    )
    add(
        "bridge: new turn bad role",
        "BridgeToNextTurn",
        bridge(new_turn=conv(msg("robot"))),
        INVALID,
        "new_turn.messages[0].role",
    )
    add(
        "bridge: new turn bad tool",
        "BridgeToNextTurn",
        bridge(new_turn=conv(msg(), tools=(Y.ToolSpec(name="f", parameters_json="{"),))),
        INVALID,
        "new_turn.tools[0].parameters_json",
    )
    add("bridge: history bad role", "BridgeToNextTurn", bridge(history=[msg("robot")]), INVALID, "history[0].role")
    add(
        "bridge: history bad arguments",
        "BridgeToNextTurn",
        bridge(history=[msg(), msg("assistant", "", tool_calls=[call(arguments="{")])]),
        INVALID,
        "history[1].tool_calls[0].arguments",
    )
    add(
        "bridge: new turn over 4 MB",
        "BridgeToNextTurn",
        bridge(new_turn=conv(msg("user", "x" * 4_000_001))),
        EXHAUSTED,
        "new_turn.messages",
    )
    add("bridge: 1.1M prompt ids", "BridgeToNextTurn", bridge(prompt=[100] * 1_100_000), EXHAUSTED, "prev_prompt_ids")
    add("bridge: empty prompt (answered ok=false)", "BridgeToNextTurn", bridge(prompt=[]))
    add("bridge: truncated completion (answered ok=false)", "BridgeToNextTurn", bridge(completion=[9707]))

    # ConversationsToData (a stream; errors name the line, counted over the whole stream)
    add("jsonl: max_length -5", "ConversationsToData", lines(line(), max_length=-5), INVALID, "max_length")
    add("jsonl: max_length 1", "ConversationsToData", lines(line(), max_length=1), INVALID, "at least 2")
    add("jsonl: not JSON", "ConversationsToData", lines("{"), INVALID, "line 1: invalid JSON")
    add("jsonl: nested 100,000 deep", "ConversationsToData", lines(line(), DEEP), INVALID, "line 2: JSON nested")
    add(
        "jsonl: nested 70 deep",
        "ConversationsToData",
        lines(line(extra=json.loads(nested(70)))),
        INVALID,
        "line 1: JSON nested",
    )
    add("jsonl: a list", "ConversationsToData", lines("[1]"), INVALID, "line 1: expected a JSON object")
    add("jsonl: no messages", "ConversationsToData", lines("{}"), INVALID, "'messages' is missing")
    add("jsonl: empty messages", "ConversationsToData", lines('{"messages": []}'), INVALID, "'messages' must be")
    add(
        "jsonl: unknown role",
        "ConversationsToData",
        lines(line({"role": "wizard", "content": "x"})),
        INVALID,
        "line 1: field messages[0].role",
    )
    add(
        "jsonl: role a list",
        "ConversationsToData",
        lines(line({"role": ["user"], "content": "x"})),
        INVALID,
        "messages[0].role",
    )
    add(
        "jsonl: content a dict",
        "ConversationsToData",
        lines(line({"role": "user", "content": {"a": 1}})),
        INVALID,
        "messages[0].content",
    )
    add(
        "jsonl: image part",
        "ConversationsToData",
        lines(line({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})),
        INVALID,
        "messages[0].content[0].type",
    )
    add("jsonl: tools an object", "ConversationsToData", lines(line(tools={"a": 1})), INVALID, "field 'tools'")
    add("jsonl: tool without a name", "ConversationsToData", lines(line(tools=[{}])), INVALID, "tools[0].function.name")
    add(
        "jsonl: tool_calls a string",
        "ConversationsToData",
        lines(line({"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": "x"})),
        INVALID,
        "messages[1].tool_calls",
    )
    add(
        "jsonl: tool call a string",
        "ConversationsToData",
        lines(line({"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": ["f"]})),
        INVALID,
        "messages[1].tool_calls[0]",
    )
    add(
        "jsonl: tool call name a number",
        "ConversationsToData",
        lines(
            line(
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 5, "arguments": {}}}]},
            )
        ),
        INVALID,
        "messages[1].tool_calls[0].function.name",
    )
    add(
        "jsonl: tool_call_id a number",
        "ConversationsToData",
        lines(line({"role": "user", "content": "x", "tool_call_id": 5}, {"role": "assistant", "content": "y"})),
        INVALID,
        "messages[0].tool_call_id",
    )
    add(
        "jsonl: trainable a string",
        "ConversationsToData",
        lines(line({"role": "user", "content": "x", "trainable": "yes"}, {"role": "assistant", "content": "y"})),
        INVALID,
        "messages[0].trainable",
    )
    add(
        "jsonl: line over 4 MB",
        "ConversationsToData",
        lines(line({"role": "user", "content": "x" * 4_000_001})),
        EXHAUSTED,
        "line 1",
    )
    add("jsonl: train_on_what 99", "ConversationsToData", lines(line(), train_on_what=99), INVALID, "train_on_what")
    add(
        "jsonl: content_sft_roles unknown",
        "ConversationsToData",
        lines(line(), content_sft_roles=["wizard"]),
        INVALID,
        "content_sft_roles[0]",
    )
    add(
        "jsonl: no tokenizer",
        "ConversationsToData",
        lines(line(), renderer=spec(tokenizer="")),
        INVALID,
        "renderer.tokenizer",
    )
    add(
        "jsonl: tokenizer path",
        "ConversationsToData",
        lines(line(), renderer=spec(tokenizer="/etc")),
        NOT_FOUND,
        "renderer.tokenizer",
    )
    add("jsonl: blank lines only", "ConversationsToData", lines("", "  "))
    add(
        "jsonl: bad line in the second request",
        "ConversationsToData",
        lines(line(), line()) + [R.ConversationsToDataRequest(lines=[line({"role": "robot", "content": "x"})])],
        INVALID,
        "line 3",
    )

    # bytes that are not the message at all
    add("raw: garbage Render", "Render", b"\xff\xff\xff", INVALID, "bios.v1.RenderRequest")
    add("raw: invalid UTF-8 in a string", "Render", b"\x12\x05\x0a\x03\x12\x01\xff", INVALID, "bios.v1.RenderRequest")
    add("raw: truncated ParseResponse", "ParseResponse", b"\x12\x05\x01", INVALID, "bios.v1.ParseResponseRequest")
    add(
        "raw: garbage ConversationsToData frame",
        "ConversationsToData",
        [b"\x0a\xff"],
        INVALID,
        "bios.v1.ConversationsToDataRequest",
    )
    return c


def train_cases() -> list[Case]:
    c = []

    def add(id: str, method: str, request: Any, code: grpc.StatusCode = OK, field: str = "") -> None:
        c.append(Case(id, "train", method, request, code, field))

    add(
        "session: close unknown",
        "CloseSession",
        T.CloseSessionRequest(session_id="session-nope"),
        NOT_FOUND,
        "session_id",
    )
    add(
        "model: unknown session",
        "CreateModel",
        T.CreateModelRequest(session_id="nope", base_model=MODEL),
        NOT_FOUND,
        "session_id",
    )
    add("model: base_model empty", "CreateModel", create(""), INVALID, "base_model")
    for path in ("/etc", "../../..", "/no/such/dir", "nobody/nothing"):
        add(f"model: base_model {path!r}", "CreateModel", create(path), NOT_FOUND, "base_model")
    add(
        "model: base_model = a real tokenizer directory",
        "CreateModel",
        lambda ctx: create(ctx.tokenizer_dir)(ctx),
        NOT_FOUND,
        "base_model",
    )
    add("model: lora rank -1", "CreateModel", create(rank=-1), INVALID, "lora.rank")
    add("model: lora rank 5000", "CreateModel", create(rank=5000), INVALID, "lora.rank")
    add("model: lora alpha NaN", "CreateModel", create(alpha=float("nan")), INVALID, "lora.alpha")
    add("model: lora alpha -1", "CreateModel", create(alpha=-1.0), INVALID, "lora.alpha")
    add(
        "model: lora selects no layer",
        "CreateModel",
        lambda ctx: T.CreateModelRequest(session_id=ctx.session, base_model=MODEL, lora=Y.LoraConfig(rank=4)),
        INVALID,
        "lora",
    )
    state = lambda path, **kw: lambda ctx: T.CreateModelRequest(session_id=ctx.session, from_state=path(ctx), **kw)  # noqa: E731
    add("model: from_state not a path", "CreateModel", state(lambda ctx: "x"), INVALID, "from_state")
    add(
        "model: from_state missing",
        "CreateModel",
        state(lambda ctx: "bios://model-x/state/none"),
        NOT_FOUND,
        "from_state",
    )
    add(
        "model: from_state with ..",
        "CreateModel",
        state(lambda ctx: "bios://model-x/state/../etc"),
        INVALID,
        "from_state",
    )
    add(
        "model: from a sampler checkpoint with optimizer",
        "CreateModel",
        state(lambda ctx: ctx.sampler_path, load_optimizer=True),
        PRECONDITION,
        "from_state",
    )
    add("model: delete unknown", "DeleteModel", T.DeleteModelRequest(model_id="model-nope"), NOT_FOUND, "model_id")
    sampler = lambda **kw: lambda ctx: T.CreateSamplerRequest(session_id=ctx.session, **kw)  # noqa: E731
    add("sampler: no source", "CreateSampler", sampler(), INVALID, "source")
    add("sampler: base_model path", "CreateSampler", sampler(base_model="/etc"), NOT_FOUND, "base_model")
    add("sampler: model_path not a path", "CreateSampler", sampler(model_path="nope"), INVALID, "model_path")
    add(
        "sampler: model_path missing",
        "CreateSampler",
        sampler(model_path="bios://model-x/sampler/none"),
        NOT_FOUND,
        "model_path",
    )
    add(
        "sampler: unknown session",
        "CreateSampler",
        T.CreateSamplerRequest(session_id="nope", base_model=MODEL),
        NOT_FOUND,
        "session_id",
    )
    add("info: unknown model", "GetInfo", T.GetInfoRequest(model_id="model-nope"), NOT_FOUND, "model_id")
    add("info: no model", "GetInfo", T.GetInfoRequest(), NOT_FOUND, "model_id")
    add("checkpoints: list for an unknown model", "ListCheckpoints", T.ListCheckpointsRequest(model_id="model-nope"))
    add("checkpoints: delete not a path", "DeleteCheckpoint", T.DeleteCheckpointRequest(path="x"), INVALID, "path")
    add(
        "checkpoints: delete missing",
        "DeleteCheckpoint",
        T.DeleteCheckpointRequest(path="bios://model-x/state/n"),
        NOT_FOUND,
        "path",
    )
    add(
        "checkpoints: delete ..",
        "DeleteCheckpoint",
        T.DeleteCheckpointRequest(path="bios://model-x/state/.."),
        INVALID,
        "path",
    )
    add("export: not a path", "ExportWeights", T.ExportWeightsRequest(path="x"), INVALID, "path")
    add("export: missing", "ExportWeights", T.ExportWeightsRequest(path="bios://model-x/state/n"), NOT_FOUND, "path")
    add("tokenizer: no name", "GetTokenizer", T.GetTokenizerRequest(), INVALID, "name")
    for path in ("/etc", "../../..", "/root/.ssh"):
        add(f"tokenizer: name {path!r}", "GetTokenizer", T.GetTokenizerRequest(name=path), NOT_FOUND, "name")
    add(
        "tokenizer: a real tokenizer directory",
        "GetTokenizer",
        lambda ctx: T.GetTokenizerRequest(name=ctx.tokenizer_dir),
        NOT_FOUND,
        "name",
    )
    add("tokenizer: good", "GetTokenizer", T.GetTokenizerRequest(name=MODEL))

    # the operation stream
    add(
        "operate: unknown model",
        "Operate",
        op(model_id="model-nope", forward=T.ForwardBackwardInput(data=[datum()])),
        NOT_FOUND,
        "model_id",
    )
    add("operate: no operation", "Operate", op(), INVALID, "op")
    add(
        "operate: switches model mid-stream",
        "Operate",
        lambda ctx: [
            *forward()(ctx),
            T.OperationRequest(seq=ctx.seq + 1, model_id="model-other", forward=T.ForwardBackwardInput(data=[datum()])),
        ],
        INVALID,
        "model_id",
    )
    add(
        "operate: sequence number below the window",
        "Operate",
        lambda ctx: [T.OperationRequest(seq=-5, model_id=ctx.model, forward=T.ForwardBackwardInput(data=[datum()]))],
        PRECONDITION,
        "seq",
    )
    add("forward: no data", "Operate", op(forward=T.ForwardBackwardInput()), INVALID, "data")
    add(
        "forward: image chunk",
        "Operate",
        op(
            forward=T.ForwardBackwardInput(
                data=[Y.Datum(model_input=Y.ModelInput(chunks=[Y.Chunk(image=Y.ImageChunk(data=b"x", format="png"))]))]
            )
        ),
        INVALID,
        "data[0].model_input",
    )
    add("forward: token -1", "Operate", forward(datum([100, -1])), INVALID, "data[0].model_input")
    add("forward: token 2e9", "Operate", forward(datum(), datum([2_000_000_000])), INVALID, "data[1].model_input")
    add("forward: no tokens", "Operate", forward(datum([], [])), INVALID, "data[0].model_input")
    add(
        "forward: no target_tokens",
        "Operate",
        op(forward=T.ForwardBackwardInput(data=[Y.Datum(model_input=datum().model_input)])),
        INVALID,
        "data[0].loss_fn_inputs",
    )
    add(
        "forward: target_tokens float 1.7",
        "Operate",
        forward(datum([100], tensor([1.7], Y.DTYPE_FLOAT32))),
        INVALID,
        "target_tokens",
    )
    add("forward: target_tokens -1", "Operate", forward(datum([100], [-1])), INVALID, "target_tokens")
    add("forward: target_tokens 2e9", "Operate", forward(datum([100], [2_000_000_000])), INVALID, "target_tokens")
    add("forward: weights length", "Operate", forward(datum(weights=[1.0])), INVALID, "weights")
    add("forward: weights NaN", "Operate", forward(datum([100], weights=[float("nan")])), INVALID, "weights")
    add("forward: weights infinity", "Operate", forward(datum([100], weights=[float("inf")])), INVALID, "weights")
    add(
        "forward: tensor dtype unspecified",
        "Operate",
        forward(datum([100], tensor([101], Y.DTYPE_UNSPECIFIED))),
        INVALID,
        "dtype",
    )
    add(
        "forward: tensor bytes do not fit the shape",
        "Operate",
        forward(datum([100], tensor([101], data=b"\x01"))),
        INVALID,
        "target_tokens",
    )
    add("forward: unknown loss", "Operate", forward(loss_fn="magic"), INVALID, "loss_fn")
    add(
        "forward: unknown loss option",
        "Operate",
        forward(loss_fn="cross_entropy", temperature=2.0),
        INVALID,
        "loss_fn_config",
    )
    add(
        "forward: importance_sampling without its inputs",
        "Operate",
        forward(loss_fn="importance_sampling"),
        INVALID,
        "data[0].loss_fn_inputs",
    )
    add("forward: over the model context", "Operate", forward(datum([100] * 5000)), INVALID, "data[0].model_input")
    add("forward: over max_request_tokens", "Operate", forward(*[datum([100] * 4000)] * 33), EXHAUSTED, "data")
    add(
        "forward_backward: token -1",
        "Operate",
        op(forward_backward=T.ForwardBackwardInput(data=[datum([-1])])),
        INVALID,
        "data[0].model_input",
    )
    add("optim_step: learning_rate -1", "Operate", adam(learning_rate=-1.0), INVALID, "adam_params.learning_rate")
    add(
        "optim_step: learning_rate NaN",
        "Operate",
        adam(learning_rate=float("nan")),
        INVALID,
        "adam_params.learning_rate",
    )
    add("optim_step: beta1 1", "Operate", adam(beta1=1.0), INVALID, "adam_params.beta1")
    add("optim_step: eps 0", "Operate", adam(eps=0.0), INVALID, "adam_params.eps")
    add("optim_step: no gradient", "Operate", adam(), PRECONDITION, "optim_step")
    save = lambda name="ok", metadata="": op(save_state=T.SaveStateRequest(name=name, metadata_json=metadata))  # noqa: E731
    add("save_state: name ../x", "Operate", save("../x"), INVALID, "save_state.name")
    add("save_state: empty name", "Operate", save(""), INVALID, "save_state.name")
    add("save_state: hidden name", "Operate", save(".tmp-x"), INVALID, "save_state.name")
    add("save_state: 200-character name", "Operate", save("a" * 200), INVALID, "save_state.name")
    add("save_state: metadata not JSON", "Operate", save(metadata="{"), INVALID, "save_state.metadata_json")
    add("save_state: metadata nested 100,000 deep", "Operate", save(metadata=DEEP), INVALID, "save_state.metadata_json")
    add("save_state: metadata a number", "Operate", save(metadata="42"), INVALID, "save_state.metadata_json")

    def load(path, opt=False):
        return lambda ctx: op(load_state=T.LoadStateRequest(path=path(ctx), load_optimizer=opt))(ctx)

    add("load_state: not a path", "Operate", load(lambda ctx: "x"), INVALID, "load_state.path")
    add("load_state: missing", "Operate", load(lambda ctx: "bios://model-x/state/none"), NOT_FOUND, "load_state.path")
    add(
        "load_state: optimizer of a sampler checkpoint",
        "Operate",
        load(lambda ctx: ctx.sampler_path, True),
        PRECONDITION,
        "load_state.path",
    )
    add("load_state: another rank", "Operate", load(lambda ctx: ctx.rank8_state), INVALID, "load_state.path")
    add(
        "save_weights_for_sampler: name a/b",
        "Operate",
        op(save_weights_for_sampler=T.SaveWeightsForSamplerRequest(name="a/b")),
        INVALID,
        "save_weights_for_sampler.name",
    )

    # sampling
    add("sample: no target", "Sample", T.SampleRequest(), INVALID, "target")
    add("sample: unknown sampler", "Sample", T.SampleRequest(sampler_id="sampler-nope"), NOT_FOUND, "sampler_id")
    add("sample: unknown model", "Sample", T.SampleRequest(model_id="model-nope"), NOT_FOUND, "model_id")
    add("sample: empty prompt", "Sample", sample(prompt=()), INVALID, "prompt")
    add("sample: prompt token -1", "Sample", sample(prompt=(100, -1)), INVALID, "prompt")
    add("sample: prompt token 2e9", "Sample", sample(prompt=(2_000_000_000,)), INVALID, "prompt")
    add("sample: image chunk", "Sample", sample(chunks=[Y.Chunk(image=Y.ImageChunk(data=b"x"))]), INVALID, "prompt")
    add("sample: max_tokens 0", "Sample", sample(max_tokens=0), INVALID, "sampling_params.max_tokens")
    add("sample: max_tokens -1", "Sample", sample(max_tokens=-1), INVALID, "sampling_params.max_tokens")
    add("sample: past the context", "Sample", sample(max_tokens=5000), INVALID, "sampling_params.max_tokens")
    add("sample: temperature -1", "Sample", sample(temperature=-1.0), INVALID, "sampling_params.temperature")
    add("sample: temperature NaN", "Sample", sample(temperature=float("nan")), INVALID, "sampling_params.temperature")
    add("sample: top_p 0", "Sample", sample(top_p=0.0), INVALID, "sampling_params.top_p")
    add("sample: top_p 1.5", "Sample", sample(top_p=1.5), INVALID, "sampling_params.top_p")
    add("sample: top_p NaN", "Sample", sample(top_p=float("nan")), INVALID, "sampling_params.top_p")
    add("sample: num_samples -1", "Sample", sample(num_samples=-1), INVALID, "num_samples")
    add("sample: num_samples 1000", "Sample", sample(num_samples=1000), INVALID, "num_samples")
    add("sample: stop token -1", "Sample", sample(stop_token_ids=[-1]), INVALID, "sampling_params.stop_token_ids")
    add("sample: empty stop string", "Sample", sample(stop_strings=[""]), INVALID, "sampling_params.stop_strings")
    add("sample: num_samples 0 (= 1)", "Sample", sample(num_samples=0))
    add("sample: top_k -5 (off)", "Sample", sample(top_k=-5))
    add("sample: greedy", "Sample", sample(temperature=0.0, seed=3))

    add("raw: garbage CreateModel", "CreateModel", b"\xff\xff", INVALID, "bios.v1.CreateModelRequest")
    add("raw: garbage Operate frame", "Operate", [b"\x08\xff"], INVALID, "bios.v1.OperationRequest")
    add("raw: garbage Sample", "Sample", b"\x1a\xff", INVALID, "bios.v1.SampleRequest")
    return c


def cases() -> list[Case]:
    return render_cases() + train_cases()
