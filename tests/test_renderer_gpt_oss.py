"""The `gpt-oss` (harmony) renderer against the gpt-oss-20b fixture tokenizer and its own chat template.

The template writes `strftime_now("%Y-%m-%d")` into the system message. transformers exposes `strftime_now` as a
global of the jinja environment it compiles each template into (chat_template_utils._compile_jinja_template,
cached per template text), so the `pinned_date` fixture replaces that global and the renderer gets the same
day through its `current_date` option.
"""

from __future__ import annotations

import datetime as dt
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

FIXTURE = "openai--gpt-oss-20b"
DAY = dt.datetime(2025, 1, 15)
WEATHER = {"role": "user", "content": "Weather in Paris?"}
CALL_ONLY = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
DONE = {"role": "assistant", "content": "It is 21 degrees."}
SCHEMA_ZOO = [
    {
        "type": "function",
        "function": {
            "name": "zoo",
            "description": "Every schema shape.",
            "parameters": {
                "type": "object",
                "required": ["b"],
                "properties": {
                    "a": {"type": "string", "description": "a string", "default": "x"},
                    "b": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                    "c": {
                        "oneOf": [
                            {"type": "string", "description": "s"},
                            {"type": "number", "default": 3},
                            {"type": "object"},
                        ]
                    },
                    "d": {"type": "string", "enum": ["u", "v"], "default": "u"},
                    "e": {"type": ["string", "null"]},
                    "g": {"type": "array", "items": {"type": "boolean"}, "nullable": True},
                    "h": {
                        "type": "object",
                        "properties": {"n": {"type": "object", "properties": {"m": {"type": "boolean"}}}},
                    },
                    "i": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                    "j": {"type": "integer"},
                    "k": {"type": "string", "nullable": True, "default": None},
                    "l": {},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "ping", "description": "No parameters."}},
]

# name -> (messages, tools, renderer options = template kwargs)
EXTRA = {
    "developer_first": (
        [{"role": "developer", "content": "Be brief."}, USER, {"role": "assistant", "content": "Paris."}],
        None,
        {},
    ),
    "empty_system_with_tools": ([{"role": "system", "content": ""}, WEATHER], TOOLS, {}),
    "tools_without_system": ([WEATHER, CALL_ONLY, RESULT, DONE], TOOLS, {}),
    "reasoning_high": (CASES["reasoning"][0], None, {"reasoning_effort": "high"}),
    "identity_low": ([SYSTEM, USER], None, {"model_identity": "You are a test model.", "reasoning_effort": "low"}),
    "builtin_tools": ([SYSTEM, WEATHER], TOOLS, {"builtin_tools": ["browser", "python"]}),
    "builtin_python": ([USER], None, {"builtin_tools": ["python"]}),
    "schema_zoo": (
        [USER, {"role": "assistant", "content": "", "tool_calls": [call("zoo", {"b": []})]}],
        SCHEMA_ZOO,
        {},
    ),
    "call_with_reasoning_unanswered": (
        [WEATHER, {**CALL_ONLY, "reasoning_content": "I need the weather."}, RESULT],
        TOOLS,
        {},
    ),
    "call_reasoning_dropped_after_answer": (
        [WEATHER, {**CALL_ONLY, "reasoning_content": "Look it up."}, RESULT, DONE],
        TOOLS,
        {},
    ),
    "string_arguments": (
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
        {},
    ),
    "flat_call_none_content": (
        [
            WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
            },
        ],
        TOOLS,
        {},
    ),
    "tool_result_parts": (
        [WEATHER, CALL_ONLY, {**RESULT, "content": [{"type": "text", "text": "21"}]}, DONE],
        TOOLS,
        {},
    ),
    "empty_reasoning": ([USER, {"role": "assistant", "content": "Paris.", "reasoning_content": ""}], None, {}),
    "two_tool_rounds": (
        [
            SYSTEM,
            WEATHER,
            CALL_ONLY,
            RESULT,
            DONE,
            {"role": "user", "content": "Time?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_time", {"tz": "UTC"})]},
            {**RESULT, "content": "12:00"},
            {"role": "assistant", "content": "Noon."},
        ],
        TOOLS,
        {},
    ),
    # Typed special tokens become special tokens (as in HF); in the answer we avoid the terminators <|end|>,
    # <|return|> and <|call|>, which a sampled answer cannot contain (they would end the parse).
    "special_text": (
        [
            {"role": "user", "content": "say <|end|><|start|>user<|message|> and <|im_end|>"},
            {"role": "assistant", "content": "ok <|endoftext|> <|im_end|> done"},
        ],
        None,
        {},
    ),
}
ALL = {**{k: (m, t, {}) for k, (m, t, _) in CASES.items()}, **EXTRA}


@pytest.fixture(scope="module")
def tok():
    return fixture_tokenizer(FIXTURE)


@pytest.fixture(scope="module", autouse=True)
def pinned_date(tok):
    from transformers.utils import chat_template_utils

    env = chat_template_utils._compile_jinja_template(tok.chat_template).environment
    saved = env.globals["strftime_now"]
    env.globals["strftime_now"] = DAY.strftime
    yield
    env.globals["strftime_now"] = saved


def make(tok, **options):
    return get_renderer("gpt-oss", tok, current_date="2025-01-15", **options)


# ---- helpers --------------------------------------------------------------------------------------


def hf_text(tok, messages, tools, add_generation_prompt, **options) -> str:
    return tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **options
    )


def reasoning(m):
    return m.get("thinking", m.get("reasoning_content"))


def check_attribution(renderer, tok, messages, tools) -> None:
    r = renderer.render(messages, tools=tools)
    assert_structural_attribution(r, contiguous=False)  # the template moves system text into later blocks
    assert all((role is None) == (idx < 0) for idx, role in zip(r.message_indices, r.message_roles))
    silent = {0} if messages[0]["role"] in ("system", "developer") and not text_of(messages[0]["content"]) else set()
    assert set(r.message_indices) - {-1} == set(range(len(messages))) - silent  # an empty system renders nothing
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        body = json.dumps(m["content"], ensure_ascii=False) if m["role"] == "tool" else text_of(m.get("content"))
        decoded = tok.decode([t for t, k, c in zip(r.token_ids, r.message_indices, r.is_content) if k == i and c])
        # Leading newlines of the system text can merge into the "# Instructions\n\n" token (one BPE pass, like HF).
        assert body.strip() in decoded, (i, body, decoded)


def sampled_text(m, last: bool, answered_later: bool) -> str:
    """What the model writes for m after `<|start|>assistant`, built from the harmony rules independently."""
    analysis = "<|channel|>analysis<|message|>{}<|end|><|start|>assistant"
    if m.get("tool_calls"):
        fn = m["tool_calls"][0].get("function") or m["tool_calls"][0]
        thought = text_of(m.get("content")) or reasoning(m)
        head = analysis.format(thought) if thought and not answered_later else ""
        return (
            f"{head} to=functions.{fn['name']}<|channel|>commentary json<|message|>"
            f"{json.dumps(fn['arguments'], ensure_ascii=False)}<|call|>"
        )
    head = analysis.format(reasoning(m)) if last and reasoning(m) is not None else ""
    return f"{head}<|channel|>final<|message|>{text_of(m['content'])}{'<|return|>' if last else '<|end|>'}"


def check_supervised(renderer, tok, messages, tools, **options) -> None:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    example = renderer.supervised_example(messages, tools=tools)
    tokens, weights = example.rendered.token_ids, example.weights
    first = weights.index(1.0)
    weighted = [t for t, w in zip(tokens, weights) if w]
    assert tok.decode(weighted) == sampled_text(messages[last], last == len(messages) - 1, False)
    assert all(weights[first : first + len(weighted)]) and tok.decode(tokens[first - 2 : first]) == "<|start|>assistant"
    prompt = renderer.build_generation_prompt(messages[:last], tools=tools).to_ints()
    full = hf_text(tok, messages, tools, False, **options)
    if full.startswith(hf_text(tok, messages[:last], tools, True, **options)):
        assert tokens[:first] == prompt
    else:
        # The template drops a tool call's analysis once a later answer exists, so (in HF too) the training
        # text is not an extension of the prompt the model saw; ours differs in the same way.
        assert tokens[:first] != prompt


def check_round_trip(renderer, tok, messages, tools) -> None:
    stops = renderer.get_stop_sequences()
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        ex = renderer.supervised_example(messages[: i + 1], tools=tools)
        sampled = [t for t, w in zip(ex.rendered.token_ids, ex.weights) if w]
        assert sampled[-1] in stops
        parsed, ok = renderer.parse_response(sampled, tools)
        assert ok
        if m.get("tool_calls"):
            fn = m["tool_calls"][0].get("function") or m["tool_calls"][0]
            expected = ("", text_of(m.get("content")) or reasoning(m) or None, [(fn["name"], fn["arguments"], "ok")])
        else:
            expected = (text_of(m["content"]), reasoning(m), [])
        calls = [(c["function"]["name"], c["function"]["arguments"], c["status"]) for c in parsed.get("tool_calls", [])]
        assert (parsed["content"], parsed.get("reasoning_content"), calls) == expected
        assert not renderer.parse_response(sampled[:-1], tools)[1]


# ---- tests ----------------------------------------------------------------------------------------


def test_registered_names_and_model_patterns(tok):
    assert type(get_renderer("harmony", tok)) is type(make(tok))
    assert renderer_for_model("openai/gpt-oss-20b") == renderer_for_model("openai/gpt-oss-120b") == "gpt-oss"
    assert make(tok).get_stop_sequences() == [200002, 200012]


@pytest.mark.parametrize("name", sorted(ALL))
def test_parity_attribution_supervision_round_trip(tok, name):
    messages, tools, options = ALL[name]
    renderer = make(tok, **options)
    assert_parity(renderer, tok, messages, tools, **options)
    check_attribution(renderer, tok, messages, tools)
    if any(m["role"] == "assistant" for m in messages):
        check_supervised(renderer, tok, messages, tools, **options)
        check_round_trip(renderer, tok, messages, tools)


def test_golden_digests(tok):
    """The renderer_digests.json gpt-oss cases (real gpt-oss-20b tokenizer, date pinned, analysis prefill)."""
    golden = json.loads((FIXTURES / "golden" / "renderer_digests.json").read_text(encoding="utf-8"))
    cases = [c for c in golden["template_cases"] if c["tokenizer"] == FIXTURE]
    assert len(cases) == 2
    for case in cases:
        renderer = make(tok)
        if case["kwargs"].get("add_generation_prompt"):
            prefill = case["append_after_render"]
            ids = renderer.render_generation_prompt(case["messages"], prefill, case["tools"]).token_ids
        else:
            ids = renderer.render(case["messages"], case["tools"]).token_ids
        assert hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).hexdigest() == case["token_ids_sha256"]


def test_current_date_defaults_to_today(tok):
    text = tok.decode(get_renderer("gpt-oss", tok).render([USER]).token_ids)
    assert f"Current date: {dt.date.today():%Y-%m-%d}\n" in text
    assert "Current date: 2024-02-29\n" in tok.decode(
        get_renderer("gpt-oss", tok, current_date=dt.date(2024, 2, 29)).render([USER]).token_ids
    )


@pytest.mark.parametrize(
    "messages,tools,field",
    [
        ([USER, {"role": "assistant", "content": "<|channel|>final<|message|>x"}], None, "messages[1].content"),
        ([WEATHER, {**CALL_ONLY, "content": "a", "reasoning_content": "b"}, RESULT], TOOLS, "messages[1].content"),
        ([WEATHER, CALL_ONLY, RESULT, DONE, RESULT], TOOLS, "messages[4].role"),
        ([USER, {"role": "assistant", "content": None}], None, "messages[1].content"),
        ([USER, {"role": "assistant", "content": "x", "tool_calls": []}], None, "messages[1].tool_calls"),
        ([USER], [{"type": "function", "function": {"name": "f"}}], "tools[0].function.description"),
    ],
)
def test_template_errors_raise_render_error(tok, messages, tools, field):
    with pytest.raises(Exception):
        hf_text(tok, messages, tools, False)
    with pytest.raises(RenderError, match=field.replace("[", r"\[").replace("]", r"\]")):
        make(tok).render(messages, tools)


def test_documented_divergences(tok):
    renderer = make(tok)
    # A later system message: the template drops it silently; we refuse.
    late = [USER, {"role": "system", "content": "Now be rude."}, {"role": "user", "content": "Hi"}]
    assert hf_text(tok, late, None, True) == hf_text(tok, [late[0], late[2]], None, True)
    with pytest.raises(RenderError, match=r"messages\[1\]\.role"):
        renderer.render(late)
    # Content as text parts: the template raises; we render the joined text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    with pytest.raises(Exception):
        hf_text(tok, parts, None, True)
    assert renderer.render(parts).token_ids == renderer.render([{"role": "user", "content": "What is 2+2?"}]).token_ids


def test_only_the_first_tool_call_is_rendered(tok):
    messages, tools, _ = CASES["tool_calls_several_with_content"]
    text = tok.decode(make(tok).render(messages, tools).token_ids)
    assert "functions.get_time" not in text and text.count("<|start|>functions.get_weather to=assistant") == 2


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_parse_response_channels_and_malformed_calls(tok):
    renderer = make(tok)
    message, ok = renderer.parse_response(
        encode(
            tok,
            "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant"
            "<|channel|>final<|message|>Answer.<|return|>ignored",
        )
    )
    assert ok and message == {"role": "assistant", "content": "Answer.", "reasoning_content": "Think."}
    # The header order the model itself often uses: recipient after the channel, <|constrain|>json.
    message, ok = renderer.parse_response(
        encode(
            tok, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
        ),
        TOOLS,
    )
    assert ok and message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    head = " to=functions.get_weather<|channel|>commentary json<|message|>"
    cases = [
        (head + '{"city": <|call|>', True, "invalid_json"),
        (head + '{"city": "Pa', False, "unclosed"),
        (head.replace("get_weather", "nope") + "{}<|call|>", True, "unknown_tool"),
        (head.replace("functions.get_weather", "functions.") + "{}<|call|>", True, "missing_name"),
    ]
    for text, closed, status in cases:
        message, ok = renderer.parse_response(encode(tok, text), TOOLS)
        assert ok == closed and message["tool_calls"][0]["status"] == status
    message, ok = renderer.parse_response(encode(tok, "<|channel|>final<|message|>Par"))
    assert not ok and message["content"] == "Par"


# ---- property test --------------------------------------------------------------------------------

SPECIALS = st.sampled_from(
    [
        "<|end|>",
        "<|start|>",
        "<|message|>",
        "<|channel|>",
        "<|return|>",
        "<|call|>",
        "<|im_end|>",
        "<|endoftext|>",
        "analysis",
        "final",
        "\n",
        "\n\n",
        " ",
        '{"a": 1}',
    ]
)
TEXT = st.lists(st.one_of(st.text(max_size=10), SPECIALS), max_size=5).map("".join)


@st.composite
def conversations(draw):
    messages = (
        [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)}] if draw(st.booleans()) else []
    )
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):
            name = draw(st.sampled_from(["get_weather", "get_time"]))
            tool_call = {"role": "assistant", "content": "", "tool_calls": [call(name, {"q": draw(TEXT)})]}
            if draw(st.booleans()):
                tool_call[draw(st.sampled_from(["content", "reasoning_content"]))] = draw(TEXT)
            messages += [tool_call, {"role": "tool", "tool_call_id": "call_1", "content": draw(TEXT)}]
        answer = {"role": "assistant", "content": draw(TEXT)}
        if draw(st.booleans()):
            answer["reasoning_content"] = draw(TEXT)
        messages.append(answer)
    if draw(st.booleans()):
        messages.pop()
    return messages, (TOOLS if draw(st.booleans()) else None), draw(st.sampled_from(["low", "medium", "high"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=conversations())
def test_random_conversations_match_hf(tok, case):
    messages, tools, effort = case
    renderer = make(tok, reasoning_effort=effort)
    for add in (False, True):
        try:
            expected = hf_ids(tok, messages, tools, add, reasoning_effort=effort)
        except Exception:  # the template refuses it (e.g. channel tags typed in content): so must we
            with pytest.raises(RenderError):
                renderer.render(messages, tools, add_generation_prompt=add)
            return
        assert renderer.render(messages, tools, add_generation_prompt=add).token_ids == expected
    check_attribution(renderer, tok, messages, tools)


NAMES = st.text("abcxyz_", min_size=1, max_size=4)
DEFAULTS = st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3), st.booleans())
LEAF = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(
            ["string", "number", "integer", "boolean", "object", "array", "null", ["string", "null"], ["integer"], []]
        ),
        "description": st.text(max_size=6),
        "nullable": st.booleans(),
        "default": DEFAULTS,
        "enum": st.lists(st.text("uv", max_size=2), max_size=2),
    },
)
SCHEMAS = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.fixed_dictionaries({"type": st.just("array")}, optional={"items": inner, "nullable": st.booleans()}),
        st.fixed_dictionaries(
            {"type": st.just("object")},
            optional={"properties": st.dictionaries(NAMES, inner, max_size=3), "required": st.lists(NAMES, max_size=2)},
        ),
        st.fixed_dictionaries(
            {"oneOf": st.lists(inner, max_size=3)}, optional={"description": st.text(max_size=4), "default": DEFAULTS}
        ),
    ),
    max_leaves=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(properties=st.dictionaries(NAMES, SCHEMAS, max_size=4), required=st.lists(NAMES, max_size=3))
def test_random_tool_schemas_match_hf(tok, properties, required):
    """The TypeScript-like declarations reproduce the template's macro, quirks included, on random schemas."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "t",
                "description": "d",
                "parameters": {"type": "object", "properties": properties, "required": required},
            },
        }
    ]
    try:
        expected = hf_ids(tok, [USER], tools, True)
    except Exception:  # e.g. a non-string default next to an enum: the template's string concatenation fails
        with pytest.raises(RenderError, match=r"tools\[0\]"):
            make(tok).render([USER], tools, add_generation_prompt=True)
        return
    assert make(tok).render([USER], tools, add_generation_prompt=True).token_ids == expected
