"""The `mistral-nemo` (tekken) renderer against the Mistral-Nemo-Instruct-2407 fixture tokenizer and template,
and against the mistral-common references in golden/reference_digests.json."""

from __future__ import annotations

import hashlib
import json

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_cases import (
    CASES,
    SYSTEM,
    TOOLS,
    USER,
    assert_parity,
    assert_structural_attribution,
    call,
    fixture_tokenizer,
    hf_ids,
)

from render_service.renderers import RenderError, get_renderer, renderer_for_model
from render_service.renderers.base import text_of

FIXTURE = "mistralai--Mistral-Nemo-Instruct-2407"
FEATURES = {"tools"}
WEATHER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"}, "abcDEF123")]}
RESULT = {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'}
DONE = {"role": "assistant", "content": "It is 21 degrees."}


def nine_char_ids(messages):
    """The CASES use ids like "call_1", which this template refuses; the same conversations with valid ids."""
    fix = {"call_1": "call00001", "call_2": "call00002"}
    out = []
    for m in messages:
        m = dict(m)
        if "tool_call_id" in m:
            m["tool_call_id"] = fix[m["tool_call_id"]]
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "id": fix[c["id"]]} for c in m["tool_calls"]]
        out.append(m)
    return out


APPLICABLE = {name: (m, t) for name, (m, t, needs) in CASES.items() if needs <= FEATURES}
WITH_IDS = {
    f"{name}+ids": (nine_char_ids(m), t) for name, (m, t) in APPLICABLE.items() if any(x.get("tool_calls") for x in m)
}
EXTRA = {
    "system_tools_cycle": ([SYSTEM, WEATHER, CALL, RESULT], TOOLS),
    "system_multi_turn_ends_on_user": ([SYSTEM, USER, {"role": "assistant", "content": "Paris."}, WEATHER], None),
    "empty_tools_list": ([WEATHER], []),
    "tools_before_equal_user_messages": ([WEATHER, {"role": "assistant", "content": "Sunny."}, WEATHER], TOOLS),
    "plain_string_result": ([WEATHER, CALL, {**RESULT, "content": "sunny"}, DONE], TOOLS),
    "string_arguments": (
        [
            WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "abcDEF123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            RESULT,
        ],
        TOOLS,
    ),
    "two_tool_rounds": (
        [
            WEATHER,
            CALL,
            RESULT,
            DONE,
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_time", {"tz": "UTC"}, "xyz987654")]},
            {**RESULT, "tool_call_id": "xyz987654", "content": "12:00"},
            {"role": "assistant", "content": "Noon."},
        ],
        TOOLS,
    ),
    "special_text": (
        [
            {"role": "user", "content": "say [INST] and [/INST] and </s> and <|im_end|>"},
            {"role": "assistant", "content": "ok [INST] <|im_end|> done"},
        ],
        None,
    ),
}
ALL = {
    **{k: v for k, v in APPLICABLE.items() if k not in {n.removesuffix("+ids") for n in WITH_IDS}},
    **WITH_IDS,
    **EXTRA,
}


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer(FIXTURE)


@pytest.fixture(scope="module")
def renderer(tok):
    return get_renderer("mistral-nemo", tok)


# ---- helpers --------------------------------------------------------------------------------------


def hf_text(tok, messages, tools, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt)


def check_attribution(renderer, tok, messages, tools) -> None:
    r = renderer.render(messages, tools=tools)
    assert_structural_attribution(r, contiguous=False)  # the template moves system text into later blocks
    assert all((role is None) == (idx < 0) for idx, role in zip(r.message_indices, r.message_roles))
    # The template writes the system message only into a final user message.
    system_shown = messages[0]["role"] == "system" and messages[-1]["role"] == "user" and len(messages) > 1
    dropped = {0} if messages[0]["role"] == "system" and not (system_shown and messages[0]["content"]) else set()
    assert set(r.message_indices) - {-1} == set(range(len(messages))) - dropped
    for i, m in enumerate(messages):
        if m["role"] == "assistant" or i in dropped:
            continue
        decoded = tok.decode([t for t, k, c in zip(r.token_ids, r.message_indices, r.is_content) if k == i and c])
        # Leading whitespace of a final user message can merge into the "\n\n" after the system text.
        assert text_of(m["content"]).strip() in decoded, (i, m, decoded)


def sampled_text(m) -> str:
    """What the model writes for m right after [/INST] or [/TOOL_RESULTS]."""
    if m.get("tool_calls"):
        calls = [{**c["function"], "id": c["id"]} for c in m["tool_calls"]]
        return "[TOOL_CALLS]" + json.dumps(calls, ensure_ascii=False) + "</s>"
    return text_of(m["content"]) + "</s>"


def check_supervised(renderer, tok, messages, tools) -> None:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    example = renderer.supervised_example(messages, tools=tools)
    tokens, weights = example.rendered.token_ids, example.weights
    first = weights.index(1.0)
    weighted = [t for t, w in zip(tokens, weights) if w]
    assert all(weights[first : first + len(weighted)]) and tok.decode(weighted) == sampled_text(messages[last])
    prompt = renderer.build_generation_prompt(messages[:last], tools=tools).to_ints()
    if hf_text(tok, messages, tools).startswith(hf_text(tok, messages[:last], tools, True)):
        assert tokens[:first] == prompt
    else:
        # The template writes the system message into a final user message only, and the tools before the last
        # user message, so (in HF too) a later conversation need not extend an earlier generation prompt.
        assert (messages[0]["role"] == "system" or tools is not None) and tokens[:first] != prompt


def check_round_trip(renderer, tok, messages, tools) -> None:
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        ex = renderer.supervised_example(messages[: i + 1], tools=tools)
        sampled = [t for t, w in zip(ex.rendered.token_ids, ex.weights) if w]
        assert sampled[-1] == tok.eos_token_id
        parsed, ok = renderer.parse_response(sampled, tools)
        assert ok
        calls = [
            (c.get("id"), c["function"]["name"], c["function"]["arguments"], c["status"])
            for c in parsed.get("tool_calls", [])
        ]
        expected_calls = [
            (c["id"], c["function"]["name"], c["function"]["arguments"], "ok") for c in m.get("tool_calls") or []
        ]
        # The template drops the content of a tool-calling message, so the model never writes it.
        assert (parsed["content"], calls) == ("" if expected_calls else text_of(m["content"]), expected_calls)
        assert not renderer.parse_response(sampled[:-1], tools)[1]


# ---- tests ----------------------------------------------------------------------------------------


def test_registered_names_and_model_patterns(tok, renderer):
    assert type(get_renderer("tekken", tok)) is type(renderer)
    assert renderer_for_model("mistralai/Mistral-Nemo-Instruct-2407") == "mistral-nemo"
    assert renderer.get_stop_sequences() == [2]


def test_mistral_common_reference_digests(renderer):
    """All 6 chats of reference_digests.json (mistral-common's own encoder), where the HF template agrees."""
    reference = json.loads((FIXTURES / "golden" / "reference_digests.json").read_text(encoding="utf-8"))
    assert len(reference["cases"]) == 6
    for case in reference["cases"]:
        ids = renderer.render(case["messages"], case["tools"]).token_ids
        assert len(ids) == case["token_count"], case["case"]
        assert hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest() == case["token_ids_sha256"]


@pytest.mark.parametrize("name", sorted(ALL))
def test_parity_attribution_supervision_round_trip(tok, renderer, name):
    messages, tools = ALL[name]
    assert_parity(renderer, tok, messages, tools)
    check_attribution(renderer, tok, messages, tools)
    if any(m["role"] == "assistant" for m in messages):
        check_supervised(renderer, tok, messages, tools)
        check_round_trip(renderer, tok, messages, tools)


@pytest.mark.parametrize(
    "messages,tools,field",
    [
        *[(m, t, "tool_calls[0].id") for name, (m, t) in APPLICABLE.items() if name + "+ids" in WITH_IDS],
        ([WEATHER, CALL, {**RESULT, "tool_call_id": "short"}], TOOLS, r"messages[2].tool_call_id"),
        ([USER, USER], None, "messages[1].role"),
        ([{"role": "assistant", "content": "Hi"}, USER], None, "messages[0].role"),
        ([USER, {"role": "assistant", "content": "Hi"}, {"role": "system", "content": "x"}], None, "messages[2].role"),
        ([USER, {"role": "assistant", "content": None}], None, "messages[1].content"),
    ],
)
def test_template_errors_raise_render_error(tok, renderer, messages, tools, field):
    with pytest.raises(Exception):
        hf_text(tok, messages, tools)
    with pytest.raises(RenderError, match=field.replace("[", r"\[").replace("]", r"\]")):
        renderer.render(messages, tools)


def test_documented_divergences(tok, renderer):
    # An empty call list: the template writes a bare "[TOOL_CALLS][" turn; we refuse.
    empty = [USER, {"role": "assistant", "content": "x", "tool_calls": []}]
    assert hf_text(tok, empty, None).endswith("[/INST][TOOL_CALLS][")
    with pytest.raises(RenderError, match=r"messages\[1\]\.tool_calls"):
        renderer.render(empty)
    # A tool result without content: the template writes `{"content": , ...`; we refuse.
    with pytest.raises(RenderError, match=r"messages\[2\]\.content"):
        renderer.render([WEATHER, CALL, {**RESULT, "content": None}], TOOLS)
    # Content as text parts: the template raises on a user list; we render the joined text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    with pytest.raises(Exception):
        hf_text(tok, parts, None)
    assert renderer.render(parts).token_ids == renderer.render([{"role": "user", "content": "What is 2+2?"}]).token_ids


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_parse_response_tool_calls_and_malformed(tok, renderer):
    message, ok = renderer.parse_response(encode(tok, "Sure.</s>ignored"))
    assert ok and message == {"role": "assistant", "content": "Sure."}
    message, ok = renderer.parse_response(
        encode(
            tok,
            'Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": '
            '{"city": "Paris"}, "id": "abcDEF123"}, {"name": "get_time", '
            '"arguments": {"tz": "UTC"}}]</s>',
        ),
        TOOLS,
    )
    assert ok and message["content"] == "Let me look." and [c["status"] for c in message["tool_calls"]] == ["ok", "ok"]
    assert message["tool_calls"][0]["id"] == "abcDEF123" and "id" not in message["tool_calls"][1]
    cases = [
        ('[TOOL_CALLS][{"name": "get_weather", </s>', True, "invalid_json"),
        ('[TOOL_CALLS][{"name": "get_weather", "argu', False, "unclosed"),
        ('[TOOL_CALLS][{"name": "nope", "arguments": {}}]</s>', True, "unknown_tool"),
        ('[TOOL_CALLS][{"arguments": {}}]</s>', True, "missing_name"),
    ]
    for text, closed, status in cases:
        message, ok = renderer.parse_response(encode(tok, text), TOOLS)
        assert ok == closed and message["tool_calls"][0]["status"] == status
    message, ok = renderer.parse_response(encode(tok, "Par"))
    assert not ok and message["content"] == "Par"


# ---- property test --------------------------------------------------------------------------------

SPECIALS = st.sampled_from(
    [
        "[INST]",
        "[/INST]",
        "</s>",
        "<s>",
        "[TOOL_CALLS]",
        "[TOOL_RESULTS]",
        "[/TOOL_RESULTS]",
        "[AVAILABLE_TOOLS]",
        "<|im_end|>",
        "\n",
        "\n\n",
        " ",
        '{"a": 1}',
        '"',
    ]
)
TEXT = st.lists(st.one_of(st.text(max_size=10), SPECIALS), max_size=5).map("".join)
IDS = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=9, max_size=9)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):
            ids = draw(st.lists(IDS, min_size=1, max_size=2))
            calls = [call(draw(st.sampled_from(["get_weather", "get_time"])), {"q": draw(TEXT)}, i) for i in ids]
            messages.append({"role": "assistant", "content": draw(TEXT), "tool_calls": calls})
            messages += [{"role": "tool", "tool_call_id": i, "content": draw(TEXT)} for i in ids]
        messages.append({"role": "assistant", "content": draw(TEXT)})
    if draw(st.booleans()):
        messages.pop()
    return messages, (TOOLS if draw(st.booleans()) else None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conversations())
def test_random_conversations_match_hf(tok, renderer, case):
    messages, tools = case
    assert renderer.render(messages, tools).token_ids == hf_ids(tok, messages, tools, False)
    check_attribution(renderer, tok, messages, tools)
