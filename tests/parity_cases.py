"""Conversation cases every renderer family is checked on, and the parity assertion against HF.

Reference = the fixture tokenizer's own chat template: `apply_chat_template(..., tokenize=False)` then
`encode(add_special_tokens=False)`, exactly what HF does when it tokenizes a chat.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from conftest import need_fixtures

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a timezone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]


def call(name: str, arguments: dict, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


SYSTEM = {"role": "system", "content": "You are a careful assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "Paris."}
LONG = " ".join(f"Sentence {i} talks about topic {i % 7} in some detail." for i in range(120))

# name -> (messages, tools, features the family must support for the case to apply)
CASES: dict[str, tuple[list[dict], list[dict] | None, set[str]]] = {
    "single_user": ([USER], None, set()),
    "system_user": ([SYSTEM, USER], None, set()),
    "system_answer": ([SYSTEM, USER, ANSWER], None, set()),
    "no_system_answer": ([USER, ANSWER], None, set()),
    "multi_turn": (
        [
            SYSTEM,
            USER,
            ANSWER,
            {"role": "user", "content": "And of Spain?"},
            {"role": "assistant", "content": "Madrid."},
        ],
        None,
        set(),
    ),
    "reasoning": (
        [USER, {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital is Paris."}],
        None,
        {"reasoning"},
    ),
    "historical_reasoning": (
        [
            USER,
            {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy one."},
            {"role": "user", "content": "And of Spain?"},
            {"role": "assistant", "content": "Madrid.", "reasoning_content": "Also easy."},
        ],
        None,
        {"reasoning"},
    ),
    "tools_declared": ([SYSTEM, {"role": "user", "content": "Weather in Paris?"}], TOOLS, {"tools"}),
    "tool_call_single": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees in Paris."},
        ],
        TOOLS,
        {"tools"},
    ),
    "tool_calls_several_with_content": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather and time in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check both.",
                "tool_calls": [
                    call("get_weather", {"city": "Paris", "unit": "c"}),
                    call("get_time", {"tz": "Europe/Paris"}, "call_2"),
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
            {"role": "assistant", "content": "21 degrees, and it is 14:05."},
        ],
        TOOLS,
        {"tools"},
    ),
    "whitespace_edges": (
        [
            {"role": "user", "content": "\n\nleading and trailing newlines\n\n"},
            {"role": "assistant", "content": "\n  indented answer\n"},
        ],
        None,
        set(),
    ),
    "unicode": (
        [
            {"role": "user", "content": "Emoji 👩‍👩‍👧 and 日本語のテキスト, café, é vs é"},
            {"role": "assistant", "content": "中文回答 🎉 — naïve coöperation"},
        ],
        None,
        set(),
    ),
    "digits_and_code": (
        [
            {"role": "user", "content": "Compute 123456789 * 987654321 in code."},
            {"role": "assistant", "content": "```python\ndef f(x):\n\treturn x ** 2  # 1e10\n```\n= 42"},
        ],
        None,
        set(),
    ),
    "long": ([SYSTEM, {"role": "user", "content": LONG}, {"role": "assistant", "content": LONG[::-1]}], None, set()),
}


@lru_cache(maxsize=None)
def fixture_tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need_fixtures() / "tokenizers" / directory))


def hf_ids(tokenizer: Any, messages: list[dict], tools, add_generation_prompt: bool, **options: Any) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **options
    )
    return tokenizer.encode(text, add_special_tokens=False)


def assert_parity(renderer: Any, tokenizer: Any, messages: list[dict], tools, **options: Any) -> None:
    """Full conversation and generation prompt (before the last assistant message) == HF ids."""
    full = renderer.render(messages, tools=tools).token_ids
    assert full == hf_ids(tokenizer, messages, tools, False, **options), "full conversation differs from HF"
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    prefix = messages[:last_assistant] if last_assistant is not None else messages
    prompt = renderer.build_generation_prompt(prefix, tools=tools).to_ints()
    assert prompt == hf_ids(tokenizer, prefix, tools, True, **options), "generation prompt differs from HF"


def assert_structural_attribution(r: Any, contiguous: bool = True) -> None:
    """The renderer contract's structural invariants (seed 002) on a RenderedTokens: parallel arrays,
    is_content == sampled on assistant tokens, nothing sampled elsewhere, scaffolding (-1) never body or
    sampled, and (for templates that keep each message in one place) never inside a message's token range."""
    n = len(r.token_ids)
    assert len(r.message_indices) == len(r.message_roles) == len(r.sampled_mask) == len(r.is_content) == n
    for idx, role, sampled, content in zip(r.message_indices, r.message_roles, r.sampled_mask, r.is_content):
        assert sampled == content if role == "assistant" else not sampled
        assert not (idx < 0 and (content or sampled))
    for i in set(r.message_indices) - {-1} if contiguous else ():
        where = [k for k, idx in enumerate(r.message_indices) if idx == i]
        assert -1 not in r.message_indices[where[0] : where[-1] + 1]


def decode(tok: Any, ids: Any) -> str:
    return tok.decode(list(ids), clean_up_tokenization_spaces=False)


def assert_bodies_attributed(renderer: Any, tok: Any, messages: list[dict], tools: Any, body_of: Any) -> None:
    """The structural invariants hold, and every non-assistant message's body (as `body_of` says the template
    writes it) is found among that message's is_content tokens."""
    r = renderer.render(messages, tools)
    assert_structural_attribution(r)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            got = decode(tok, [t for t, k, c in zip(r.token_ids, r.message_indices, r.is_content) if k == i and c])
            assert body_of(m) in got, (i, got)


def assert_supervised_is_prompt_then_sample(
    renderer: Any, tok: Any, messages: list[dict], tools: Any, sampled: Any
) -> None:
    """The unweighted head is the generation prompt of the messages before the last assistant message, and the
    weighted tokens decode to `sampled(messages, last)`: what the model writes for that message."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    example = renderer.supervised_example(messages, tools=tools)
    ids, weights = example.rendered.token_ids, example.weights
    first = weights.index(1.0)
    assert ids[:first] == renderer.build_generation_prompt(messages[:last], tools=tools).to_ints()
    assert decode(tok, [t for t, w in zip(ids, weights) if w]) == sampled(messages, last)
