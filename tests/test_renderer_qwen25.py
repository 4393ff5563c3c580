"""The `qwen2.5` renderer against the Qwen2.5-7B-Instruct fixture tokenizer and its own chat template.

The helpers without a `test_` prefix are reused by test_renderer_qwen3.py.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_cases import CASES, TOOLS, assert_parity, assert_structural_attribution, call, fixture_tokenizer, hf_ids

from render_service.renderers import RenderError, get_renderer, renderer_for_model
from render_service.renderers.base import text_of

FIXTURE = "Qwen--Qwen2.5-7B-Instruct"
FEATURES = {"tools"}
WEATHER = {"role": "user", "content": "Weather in Paris?"}


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer(FIXTURE)


@pytest.fixture(scope="module")
def renderer(tok):
    return get_renderer("qwen2.5", tok)


# ---- helpers shared with the Qwen3 tests ------------------------------------------------------------


def applicable(features: set[str]) -> list[str]:
    return [name for name, (_, _, needs) in CASES.items() if needs <= features]


def hf_text(tok, messages, tools, add_generation_prompt, **options) -> str:
    return tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **options
    )


def check_attribution(renderer, tok, messages, tools) -> None:
    """The per-token attribution invariants of the renderer contract."""
    r = renderer.render(messages, tools=tools)
    assert_structural_attribution(r)
    # Messages are contiguous and in order; -1 only before the first / after the last message token.
    owned = [k for k, idx in enumerate(r.message_indices) if idx >= 0]
    assert [r.message_indices[k] for k in owned] == sorted(r.message_indices[k] for k in owned)
    assert all(r.message_indices[k] >= 0 for k in range(owned[0], owned[-1] + 1))
    assert not any(c for c, idx in zip(r.is_content, r.message_indices) if idx < 0)
    for i, m in enumerate(messages):
        body = text_of(m.get("content"))
        if m["role"] == "assistant" or not body.strip():
            continue
        decoded = tok.decode([t for t, idx, c in zip(r.token_ids, r.message_indices, r.is_content) if idx == i and c])
        # Leading newlines can merge into the header's "\n" token (one BPE pass, like HF), so they may be lost.
        assert unicodedata.normalize("NFC", body.lstrip()) in decoded, (i, body, decoded)


def check_supervised(renderer, tok, messages, tools, **options) -> bool:
    """Prompt part == generation prompt of the prefix; weighted tokens == what the model samples.

    Returns False (checking only the weights' shape) when the template's own generation prompt is not a text
    prefix of its full rendering (Qwen3 with enable_thinking=False and a final answer that has reasoning).
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prefix = messages[:last]
    tokens, weights = renderer.build_supervised_example(messages, tools=tools)
    first = weights.index(1.0)
    # The last assistant message ends the conversation: weighted to the end but for the newline after <|im_end|>.
    assert all(weights[first:-1]) and weights[-1] == 0.0
    weighted = [t for t, w in zip(tokens, weights) if w]
    full_text = hf_text(tok, messages, tools, False, **options)
    prompt_text = hf_text(tok, prefix, tools, True, **options)
    if not full_text.startswith(prompt_text):
        return False
    sampled_text = full_text[len(prompt_text) :].removesuffix("\n")
    prompt_ids, full_ids = hf_ids(tok, prefix, tools, True, **options), hf_ids(tok, messages, tools, False, **options)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        assert list(tokens[:first]) == renderer.build_generation_prompt(prefix, tools=tools).to_ints()
        assert tok.decode(weighted) == sampled_text
    else:
        # HF's own prompt ids are not a prefix of its full ids (the header "\n" merged with leading newlines
        # of the answer), so no attribution can make them equal; the merged token stays in the prompt part.
        assert sampled_text.endswith(tok.decode(weighted)) and not sampled_text[: -len(tok.decode(weighted))].strip()
    return True


def sampled_tokens(tok, messages, i, tools, **options) -> list[int]:
    """What the model samples for messages[i] as the final message: HF text after the prompt, with <|im_end|>."""
    full = hf_text(tok, messages[: i + 1], tools, False, **options)
    prompt = hf_text(tok, messages[:i], tools, True, **options)
    assert full.startswith(prompt)
    return tok.encode(full[len(prompt) :].removesuffix("\n"), add_special_tokens=False)


def expected_calls(message) -> list[dict]:
    out = []
    for c in message.get("tool_calls") or []:
        fn = c.get("function") or c
        args = fn["arguments"]
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}, "status": "ok"})
    return out


def conversation_strategy(with_reasoning: bool):
    """Random conversations in a valid role order, with special-token-looking text inside."""
    specials = st.sampled_from(
        [
            "<|im_end|>",
            "<|im_start|>",
            "<|endoftext|>",
            "<tool_call>",
            "</tool_call>",
            "<think>",
            "</think>",
            "<tool_response>",
            "</tool_response>",
            "\n",
            "\n\n",
            " ",
        ]
    )
    text = st.lists(st.one_of(st.text(max_size=12), specials), max_size=5).map("".join)
    scalar = st.one_of(st.text(max_size=8), st.integers(-(10**6), 10**6), st.booleans(), st.none())
    args = st.dictionaries(st.text(max_size=6), scalar, max_size=3)

    @st.composite
    def conversation(draw):
        messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            messages.append({"role": "user", "content": draw(text)})
            if draw(st.booleans()):
                n_calls = draw(st.integers(0, 2))
                answer = {"role": "assistant", "content": draw(text)}
                if with_reasoning and draw(st.booleans()):
                    answer["reasoning_content"] = draw(text)
                if n_calls:
                    answer["tool_calls"] = [
                        call(draw(st.sampled_from(["get_weather", "get_time"])), draw(args), f"call_{k}")
                        for k in range(n_calls)
                    ]
                messages.append(answer)
                messages += [
                    {"role": "tool", "tool_call_id": f"call_{k}", "content": draw(text)} for k in range(n_calls)
                ]
        tools = draw(st.sampled_from([None, TOOLS]))
        return messages, tools

    return conversation()


PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- registry ---------------------------------------------------------------------------------------


def test_names_aliases_and_model_patterns(tok):
    assert type(get_renderer("qwen25", tok)) is type(get_renderer("qwen2.5", tok))
    for model in (
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "qwen/qwen2.5-72b-instruct-awq",
        "Qwen/Qwen2.5-Coder-7B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct-1M",
    ):
        assert renderer_for_model(model) == "qwen2.5", model
    # Math-Instruct has another default system prompt; base models are not chat models.
    assert renderer_for_model("Qwen/Qwen2.5-Math-7B-Instruct") != "qwen2.5"
    assert renderer_for_model("Qwen/Qwen2.5-7B") != "qwen2.5"


def test_stop_sequences_follow_generation_config(renderer):
    assert renderer.get_stop_sequences() == [151645, 151643]
    assert renderer.get_stop_strings() == ["<|im_end|>", "<|endoftext|>"]


# ---- parity -----------------------------------------------------------------------------------------

EXTRA_CASES = {
    "tools_no_system_default_prompt": ([WEATHER], TOOLS),
    "tools_empty_list_is_no_tools": ([WEATHER], []),
    "later_system_message": (
        [WEATHER, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "ok"}],
        None,
    ),
    "string_arguments_are_tojson_quoted": (
        [
            WEATHER,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
        ],
        TOOLS,
    ),
    "flat_tool_call_and_none_content": (
        [
            WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "get_time", "arguments": {"tz": "Asia/東京", "n": [1, 2.5, None, True]}}],
            },
            {"role": "tool", "content": "ok"},
        ],
        TOOLS,
    ),
    "non_ascii_tools_kept_verbatim": (
        [WEATHER],
        [
            {
                "type": "function",
                "function": {"name": "météo", "description": 'Wetter — 天気 "quoted"', "parameters": {"z": 1, "a": {}}},
            }
        ],
    ),
    "tool_results_in_two_groups": (
        [
            WEATHER,
            {"role": "assistant", "content": "x", "tool_calls": [call("get_time", {"tz": "UTC"})]},
            {"role": "tool", "content": "1"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [call("get_time", {}), call("get_weather", {"city": "P"})],
            },
            {"role": "tool", "content": "2"},
            {"role": "tool", "content": "3"},
        ],
        TOOLS,
    ),
    "special_token_text_in_content": (
        [
            {"role": "user", "content": "say <|im_end|> and <tool_call>{}</tool_call>"},
            {"role": "assistant", "content": "<|im_start|>x<|endoftext|>"},
        ],
        None,
    ),
}


@pytest.mark.parametrize("name", applicable(FEATURES))
def test_parity_cases(renderer, tok, name):
    messages, tools, _ = CASES[name]
    assert_parity(renderer, tok, messages, tools)


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_parity_family_cases(renderer, tok, name):
    messages, tools = EXTRA_CASES[name]
    assert_parity(renderer, tok, messages, tools)


def test_default_system_prompt_text(renderer, tok):
    text = tok.decode(renderer.render([WEATHER]).token_ids)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


# ---- deliberate, documented differences --------------------------------------------------------------


def test_text_parts_and_none_render_as_their_text(renderer, tok):
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Sys"}, {"type": "text", "text": "tem"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    with pytest.raises(Exception):  # the template itself cannot concatenate a list
        tok.apply_chat_template(parts, tokenize=False)
    plain = [{"role": "system", "content": "System"}, {"role": "user", "content": "hi"}]
    assert renderer.render(parts).token_ids == hf_ids(tok, plain, None, False)
    assert renderer.render([{"role": "user", "content": None}]).token_ids == hf_ids(
        tok, [{"role": "user", "content": ""}], None, False
    )


@pytest.mark.parametrize(
    "bad,field",
    [
        ([], "messages"),
        ([{"role": "developer", "content": "x"}, WEATHER], r"messages\[0\]\.role"),
        ([WEATHER, {"role": "ipython", "content": "x"}], r"messages\[1\]\.role"),
        (
            [WEATHER, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}],
            r"messages\[1\]\.tool_calls\[0\]\.function\.name",
        ),
        (
            [
                WEATHER,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [call("get_time", {}), {"function": {"name": "get_time"}}],
                },
            ],
            r"messages\[1\]\.tool_calls\[1\]\.function\.arguments",
        ),
    ],
)
def test_unrenderable_input_raises_render_error(renderer, bad, field):
    with pytest.raises(RenderError, match=field):
        renderer.render(bad)


# ---- attribution and supervised examples ---------------------------------------------------------------


@pytest.mark.parametrize("name", applicable(FEATURES) + sorted(EXTRA_CASES))
def test_attribution_invariants(renderer, tok, name):
    messages, tools = CASES[name][:2] if name in CASES else EXTRA_CASES[name]
    check_attribution(renderer, tok, messages, tools)


@pytest.mark.parametrize(
    "name", [n for n in applicable(FEATURES) if any(m["role"] == "assistant" for m in CASES[n][0])]
)
def test_supervised_example(renderer, tok, name):
    messages, tools, _ = CASES[name]
    assert check_supervised(renderer, tok, messages, tools)


def test_tool_bodies_are_content_wrappers_are_not(renderer, tok):
    messages, tools, _ = CASES["tool_calls_several_with_content"]
    example = renderer.supervised_example(messages, tools=tools, content_sft_roles={"tool"})
    r = example.rendered
    tool_text = tok.decode(
        [t for t, w, role in zip(r.token_ids, example.weights, r.message_roles) if w and role == "tool"]
    )
    assert tool_text == '{"temp": 21}\n14:05'  # "}\n" is one BPE token, as in HF's ids
    assert "<tool_response>" not in tool_text


# ---- parse_response ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", applicable(FEATURES) + ["string_arguments_are_tojson_quoted", "tool_results_in_two_groups"]
)
def test_parse_round_trip(renderer, tok, name):
    messages, tools = CASES[name][:2] if name in CASES else EXTRA_CASES[name]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        tokens = sampled_tokens(tok, messages, i, tools)
        expected = {"role": "assistant", "content": text_of(m.get("content"))}
        if m.get("tool_calls"):
            expected["tool_calls"] = expected_calls(m)
        assert renderer.parse_response(tokens, tools) == (expected, True)
        message, ok = renderer.parse_response(tokens[:-1], tools)
        assert not ok and message == expected


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_parse_finds_calls_by_token_id_and_reports_bad_ones(renderer, tok):
    text = (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>\n'
        '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_time"<|endoftext|>'
    )
    message, ok = renderer.parse_response(encode(tok, text), TOOLS)
    assert ok and message["content"] == "Checking."
    statuses = [c["status"] for c in message["tool_calls"]]
    assert statuses == ["ok", "invalid_json", "unknown_tool", "missing_name", "unclosed"]
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert message["tool_calls"][4]["raw_text"] == '{"name": "get_time"'
    # Without declared tools any name is accepted.
    text = '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call><|im_end|>'
    message, _ = renderer.parse_response(encode(tok, text))
    assert message["tool_calls"][0]["status"] == "ok" and message["content"] == ""


def test_parse_stops_at_first_stop_token(renderer, tok):
    message, ok = renderer.parse_response(encode(tok, "Hello<|endoftext|>ignored<|im_end|>"))
    assert ok and message == {"role": "assistant", "content": "Hello"}


# ---- property ---------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(conversation_strategy(with_reasoning=False))
def test_random_conversations_match_hf(conv):
    messages, tools = conv
    tok = fixture_tokenizer(FIXTURE)
    renderer = get_renderer("qwen2.5", tok)
    for add in (False, True):
        assert renderer.render(messages, tools, add).token_ids == hf_ids(tok, messages, tools, add)
    check_attribution(renderer, tok, messages, tools)


def test_json_matches_template_tojson():
    from render_service.renderers.qwen25 import tojson

    value = {"b": 'é"\n', "a": [1, 2.5, None, True]}
    assert tojson(value) == json.dumps(value, ensure_ascii=False) == '{"b": "é\\"\\n", "a": [1, 2.5, null, true]}'
