"""The `qwen3` renderer against the Qwen3-8B fixture tokenizer and its own chat template."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from parity_cases import CASES, TOOLS, assert_parity, call, fixture_tokenizer, hf_ids
from test_renderer_qwen25 import (
    PROPERTY_SETTINGS,
    applicable,
    check_attribution,
    check_supervised,
    conversation_strategy,
    encode,
    expected_calls,
    sampled_tokens,
)

from render_service.renderers import RenderError, get_renderer, renderer_for_model

FIXTURE = "Qwen--Qwen3-8B"
FEATURES = {"tools", "reasoning"}
USER = {"role": "user", "content": "Weather in Paris?"}
THINKING_OPTIONS = [{}, {"enable_thinking": True}, {"enable_thinking": False}]


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer(FIXTURE)


def make(tok, **options):
    return get_renderer("qwen3", tok, **options)


# ---- registry ---------------------------------------------------------------------------------------


def test_name_model_patterns_and_stop_sequences(tok):
    for model in (
        "Qwen/Qwen3-8B",
        "Qwen/Qwen3-0.6B",
        "Qwen/Qwen3-30B-A3B",
        "Qwen/Qwen3-235B-A22B",
        "Qwen/Qwen3-8B-FP8",
        "Qwen/Qwen3-14B-AWQ",
    ):
        assert renderer_for_model(model) == "qwen3", model
    # Different templates: the 2507 instruct / thinking releases, Coder, VL.
    for model in (
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "Qwen/Qwen3-4B-Thinking-2507",
        "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        "Qwen/Qwen3-VL-8B-Instruct",
    ):
        assert renderer_for_model(model) != "qwen3", model
    assert make(tok).get_stop_sequences() == [151645, 151643]


# ---- parity -----------------------------------------------------------------------------------------

EXTRA_CASES = {
    "think_in_content_last": (
        [USER, {"role": "assistant", "content": "<think>\nplan\n\n</think>\n\nParis is sunny."}],
        None,
    ),
    "think_in_content_historical": (
        [USER, {"role": "assistant", "content": "x<think>a</think>\n\nSunny."}, {"role": "user", "content": "Thanks"}],
        None,
    ),
    "empty_reasoning_keeps_think_in_content": (
        [
            USER,
            {"role": "assistant", "content": "a</think>b", "reasoning_content": ""},
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": "c"},
        ],
        None,
    ),
    "multi_step_tools_keep_reasoning": (
        [
            USER,
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Need the weather.",
                "tool_calls": [call("get_weather", {"city": "Paris"})],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 degrees.", "reasoning_content": "\nGot it.\n\n"},
        ],
        TOOLS,
    ),
    "wrapped_tool_response_is_not_a_query": (
        [
            USER,
            {"role": "assistant", "content": "a", "reasoning_content": "r1"},
            {"role": "user", "content": "<tool_response>\n21\n</tool_response>"},
            {"role": "assistant", "content": "b", "reasoning_content": "r2"},
        ],
        None,
    ),
    "thinking_key_alias": ([USER, {"role": "assistant", "content": "Sunny.", "thinking": "Look outside."}], None),
    "string_arguments_verbatim": (
        [
            USER,
            {
                "role": "assistant",
                "content": "\n",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {"type": "function", "function": {"name": "get_time", "arguments": {"tz": "Europe/Zürich"}}},
                ],
            },
        ],
        TOOLS,
    ),
    "no_user_message": ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hi."}], None),
    "system_later_and_tools_with_system": (
        [{"role": "system", "content": "S"}, USER, {"role": "system", "content": "Be brief."}],
        TOOLS,
    ),
    "special_token_text_in_content": (
        [
            {"role": "user", "content": "<|im_end|><think>x</tool_response>"},
            {"role": "assistant", "content": "<tool_call>y<|endoftext|>"},
        ],
        None,
    ),
}


def all_cases():
    names = applicable(FEATURES) + sorted(EXTRA_CASES)
    return [(name, opts) for name in names for opts in THINKING_OPTIONS]


def case(name):
    return CASES[name][:2] if name in CASES else EXTRA_CASES[name]


@pytest.mark.parametrize("name,options", all_cases())
def test_parity(tok, name, options):
    messages, tools = case(name)
    assert_parity(make(tok, **options), tok, messages, tools, **options)


def test_generation_prompt_thinking_switch(tok):
    for options, tail in [
        ({}, "<|im_start|>assistant\n"),
        ({"enable_thinking": False}, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ]:
        assert tok.decode(make(tok, **options).build_generation_prompt([USER]).to_ints()).endswith(tail)


def test_historical_reasoning_is_dropped(tok):
    text = tok.decode(make(tok).render(CASES["historical_reasoning"][0]).token_ids)
    assert "Easy one." not in text and "<think>\nAlso easy.\n</think>\n\nMadrid." in text


def test_none_content_renders_as_empty(tok):
    # The April-2025 template raises on None content; later HF revisions render it as "" and so do we.
    with_none = [USER, {"role": "assistant", "content": None, "tool_calls": [call("get_time", {"tz": "UTC"})]}]
    with_empty = [USER, {**with_none[1], "content": ""}]
    assert make(tok).render(with_none, TOOLS).token_ids == hf_ids(tok, with_empty, TOOLS, False)


@pytest.mark.parametrize(
    "bad,field",
    [
        ([], "messages"),
        ([{"role": "developer", "content": "x"}, USER], r"messages\[0\]\.role"),
        (
            [USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}],
            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments",
        ),
    ],
)
def test_unrenderable_input_raises_render_error(tok, bad, field):
    with pytest.raises(RenderError, match=field):
        make(tok).render(bad)


# ---- attribution and supervised examples ---------------------------------------------------------------


@pytest.mark.parametrize("name,options", all_cases())
def test_attribution_invariants(tok, name, options):
    messages, tools = case(name)
    check_attribution(make(tok, **options), tok, messages, tools)


@pytest.mark.parametrize("name,options", [(n, o) for n, o in all_cases() if case(n)[0][-1]["role"] == "assistant"])
def test_supervised_example(tok, name, options):
    messages, tools = case(name)
    consistent = check_supervised(make(tok, **options), tok, messages, tools, **options)
    # Only with thinking off can the template's prompt disagree with its own full rendering: the final answer
    # then still shows its reasoning (or, with no user query, no think block at all).
    assert consistent or options == {"enable_thinking": False}


def test_empty_think_block_is_prompt_when_thinking_is_off(tok):
    messages = CASES["system_answer"][0]
    for options, expected in [
        ({}, "<think>\n\n</think>\n\nParis.<|im_end|>"),
        ({"enable_thinking": False}, "Paris.<|im_end|>"),
    ]:
        tokens, weights = make(tok, **options).build_supervised_example(messages)
        assert tok.decode([t for t, w in zip(tokens, weights) if w]) == expected


# ---- parse_response ---------------------------------------------------------------------------------

# What parsing gives back for each assistant message when the model samples it as the final message.
ROUND_TRIPS = {
    "reasoning": [{"content": "Paris.", "reasoning_content": "France's capital is Paris."}],
    "historical_reasoning": [
        {"content": "Paris.", "reasoning_content": "Easy one."},
        {"content": "Madrid.", "reasoning_content": "Also easy."},
    ],
    "whitespace_edges": [{"content": "  indented answer\n"}],  # the final message's content is lstrip("\n")-ed
    "think_in_content_last": [{"content": "Paris is sunny.", "reasoning_content": "plan"}],
    "think_in_content_historical": [{"content": "Sunny.", "reasoning_content": "a"}],
    "multi_step_tools_keep_reasoning": [
        {"content": "", "reasoning_content": "Need the weather.", "tool_calls": "same"},
        {"content": "21 degrees.", "reasoning_content": "Got it."},
    ],
    "thinking_key_alias": [{"content": "Sunny.", "reasoning_content": "Look outside."}],
    "string_arguments_verbatim": [
        {
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    "status": "ok",
                },
                {
                    "type": "function",
                    "function": {"name": "get_time", "arguments": {"tz": "Europe/Zürich"}},
                    "status": "ok",
                },
            ],
        }
    ],
}


def expected_round_trips(name):
    messages, _ = case(name)
    answers = [m for m in messages if m["role"] == "assistant"]
    if name not in ROUND_TRIPS:
        return answers, [
            {"content": m["content"], **({"tool_calls": "same"} if m.get("tool_calls") else {})} for m in answers
        ]
    return answers, ROUND_TRIPS[name]


@pytest.mark.parametrize("name", sorted(set(applicable(FEATURES)) | set(ROUND_TRIPS)))
def test_parse_round_trip(tok, name):
    messages, tools = case(name)
    renderer = make(tok)
    answers, expectations = expected_round_trips(name)
    positions = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i, source, want in zip(positions, answers, expectations):
        expected = {"role": "assistant", **want}
        if want.get("tool_calls") == "same":
            expected["tool_calls"] = expected_calls(source)
        tokens = sampled_tokens(tok, messages, i, tools)
        assert renderer.parse_response(tokens, tools) == (expected, True), (name, i)
        message, ok = renderer.parse_response(tokens[:-1], tools)
        assert not ok and message == expected


def test_parse_with_thinking_off_reads_content_only(tok):
    renderer = make(tok, enable_thinking=False)
    messages, tools, _ = CASES["tool_calls_several_with_content"]
    tokens = sampled_tokens(tok, messages, 2, tools, enable_thinking=False)
    assert tokens[0] != 151667  # the empty think block was part of the prompt
    message, ok = renderer.parse_response(tokens, tools)
    assert ok and message == {
        "role": "assistant",
        "content": "Let me check both.",
        "tool_calls": expected_calls(messages[2]),
    }


def test_parse_reasoning_then_bad_calls(tok):
    text = (
        "<think>\nWhich tool?\n</think>\n\nChecking.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {\n</tool_call>\n'
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name":<|im_end|>'
    )
    ids = encode(tok, text)
    assert 151668 in ids and ids.count(151657) == 3
    message, ok = make(tok).parse_response(ids, TOOLS)
    assert ok and message["reasoning_content"] == "Which tool?" and message["content"] == "Checking."
    assert [c["status"] for c in message["tool_calls"]] == ["invalid_json", "unknown_tool", "unclosed"]


def test_parse_truncated_inside_thinking(tok):
    message, ok = make(tok).parse_response(encode(tok, "<think>\nStill thinking about"))
    assert not ok and message == {"role": "assistant", "content": "", "reasoning_content": "Still thinking about"}


# ---- property ---------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(conversation_strategy(with_reasoning=True), st.sampled_from(THINKING_OPTIONS))
def test_random_conversations_match_hf(conv, options):
    messages, tools = conv
    tok = fixture_tokenizer(FIXTURE)
    renderer = make(tok, **options)
    for add in (False, True):
        assert renderer.render(messages, tools, add).token_ids == hf_ids(tok, messages, tools, add, **options)
    check_attribution(renderer, tok, messages, tools)
