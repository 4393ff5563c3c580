"""Llama 3.1 / 3.2 renderers: ids == apply_chat_template on the fixture tokenizers, attribution, supervised
examples, parse_response round trips, template options and a hypothesis property test."""

from __future__ import annotations

import copy
import json
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_cases import (
    CASES,
    TOOLS,
    assert_bodies_attributed,
    assert_parity,
    assert_supervised_is_prompt_then_sample,
    call,
    decode,
    fixture_tokenizer,
    hf_ids,
)

from render_service.renderers import RenderError, get_renderer, renderer_for_model
from render_service.renderers.registry import canonical_name

DIRS = {"llama3.1": "meta-llama--Llama-3.1-8B-Instruct", "llama3.2": "meta-llama--Llama-3.2-1B-Instruct"}
DATE = "26 Jul 2024"  # pinned: the 3.2 template would otherwise use today's date
EOT, EOM, PYTHON_TAG = "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"
BUILTIN = ["brave_search", "wolfram_alpha", "code_interpreter"]


def setup(variant: str, **options):
    tok = fixture_tokenizer(DIRS[variant])
    return get_renderer(variant, tok, **{"date_string": DATE, **options}), tok, {"date_string": DATE, **options}


def template_raises(tok, messages, tools, **options) -> bool:
    try:
        hf_ids(tok, messages, tools, False, **options)
    except Exception:  # noqa: BLE001 - any template failure
        return True
    return False


def call_json(message: dict) -> str:
    fn = message["tool_calls"][0]["function"]
    return json.dumps({"name": fn["name"], "parameters": fn["arguments"]}, ensure_ascii=False)


def sampled_text(message: dict, end: str = EOT) -> str:
    """What the model writes for an assistant message: trimmed content or the JSON call, then the end token."""
    return (call_json(message) if message.get("tool_calls") else message["content"].strip()) + end


def body_text(message: dict) -> str:
    """The rendered body of a non-assistant message: trimmed, or a JSON string for tool results."""
    if message["role"] in ("tool", "ipython"):
        return json.dumps(message["content"], ensure_ascii=False)
    return message["content"].strip()


def check_attribution(renderer, tok, messages, tools) -> None:
    assert_bodies_attributed(renderer, tok, messages, tools, body_text)


def check_supervised(renderer, tok, messages, tools) -> None:
    assert_supervised_is_prompt_then_sample(
        renderer, tok, messages, tools, lambda messages, last: sampled_text(messages[last])
    )


def sampled_tokens(renderer, messages, j, tools) -> list[int]:
    """The tokens the model samples for messages[j]: after its generation prompt, through the stop token."""
    full = renderer.render(messages[: j + 1], tools)
    prompt = renderer.build_generation_prompt(messages[:j], tools=tools).to_ints()
    assert full.token_ids[: len(prompt)] == prompt
    sampled = [t for t, k, s in zip(full.token_ids, full.message_indices, full.sampled_mask) if k == j and s]
    assert sampled == full.token_ids[len(prompt) :]
    return sampled


def check_round_trip(renderer, messages, tools) -> None:
    stops = renderer.get_stop_sequences()
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        tokens = sampled_tokens(renderer, messages, j, tools)
        assert tokens[-1] in stops and not any(t in stops for t in tokens[:-1])
        parsed, ok = renderer.parse_response(tokens, tools)
        assert ok
        if m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            (got,) = parsed["tool_calls"]
            assert got["status"] == "ok" and got["function"] == {"name": fn["name"], "arguments": fn["arguments"]}
            assert parsed["content"] == ""  # the template drops content next to a tool call
        else:
            assert parsed == {"role": "assistant", "content": m["content"].strip()}
        truncated, ok = renderer.parse_response(tokens[:-1], tools)
        assert not ok
        if m.get("tool_calls"):
            assert truncated["tool_calls"][0]["status"] == "unclosed"


# ---- every shared case ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(DIRS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_cases(variant, case):
    renderer, tok, options = setup(variant)
    messages, tools, _features = CASES[case]
    if template_raises(tok, messages, tools, **options):
        # Only several calls in one message: the template raises "only supports single tool-calls".
        with pytest.raises(RenderError, match=r"messages\[2\]\.tool_calls: .*exactly one tool call"):
            renderer.render(messages, tools)
        return
    assert_parity(renderer, tok, messages, tools, **options)
    check_attribution(renderer, tok, messages, tools)
    if any(m["role"] == "assistant" for m in messages):
        check_supervised(renderer, tok, messages, tools)
        check_round_trip(renderer, messages, tools)


# ---- template options and family-specific cases ------------------------------------------------------------

WEATHER = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "21 degrees."},
]
SYSTEM = {"role": "system", "content": "  Be brief.\n"}


@pytest.mark.parametrize("variant", sorted(DIRS))
@pytest.mark.parametrize("messages", [WEATHER, [SYSTEM, *WEATHER]], ids=["no_system", "system"])
def test_tools_in_system_message(variant, messages):
    renderer, tok, options = setup(variant, tools_in_user_message=False)
    assert_parity(renderer, tok, messages, TOOLS, **options)
    check_attribution(renderer, tok, messages, TOOLS)
    check_supervised(renderer, tok, messages, TOOLS)
    check_round_trip(renderer, messages, TOOLS)
    assert "You have access to the following functions" in decode(tok, renderer.render(messages, TOOLS).token_ids)


@pytest.mark.parametrize("variant", sorted(DIRS))
def test_custom_tools_option_replaces_tools(variant):
    renderer, tok, options = setup(variant, custom_tools=[TOOLS[1]])
    assert renderer.render(WEATHER, TOOLS).token_ids == hf_ids(tok, WEATHER, TOOLS, False, **options)
    assert '"get_time"' in decode(tok, renderer.render(WEATHER).token_ids)


def test_builtin_tools_python_tag_and_eom():
    messages = [
        SYSTEM,
        {"role": "user", "content": "Search the news."},
        {"role": "assistant", "tool_calls": [call("brave_search", {"query": "news today"})]},
        {"role": "ipython", "content": "Headline: calm day."},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "content": "5C"},
        {"role": "assistant", "content": "A calm, cold day."},
    ]
    renderer, tok, options = setup("llama3.1", builtin_tools=BUILTIN)
    for tools in (None, TOOLS):
        assert_parity(renderer, tok, messages, tools, **options)
        check_attribution(renderer, tok, messages, tools)
    text = decode(tok, renderer.render(messages, TOOLS).token_ids)
    assert "Tools: brave_search, wolfram_alpha\n\n" in text
    assert f'{PYTHON_TAG}brave_search.call(query="news today"){EOM}' in text
    # Builtin calls round-trip by <|python_tag|>; every tool-call turn ends with <|eom_id|>.
    for j, expected in ((2, ("brave_search", {"query": "news today"})), (4, ("get_weather", {"city": "Oslo"}))):
        tokens = sampled_tokens(renderer, messages, j, TOOLS)
        assert tokens[-1] == tok.convert_tokens_to_ids(EOM)
        parsed, ok = renderer.parse_response(tokens, TOOLS)
        assert ok and [
            (c["function"]["name"], c["function"]["arguments"], c["status"]) for c in parsed["tool_calls"]
        ] == [(*expected, "ok")]
    # llama3.2's template has no builtin tools: the option is ignored, as the template ignores it.
    r32, tok32, options32 = setup("llama3.2", builtin_tools=BUILTIN)
    plain = messages[:2]
    assert r32.render(plain).token_ids == hf_ids(tok32, plain, None, False, **options32)


@pytest.mark.parametrize("arguments,field", [({"query": 3}, r"arguments\.query"), ("[1]", r"arguments: a builtin")])
def test_builtin_call_arguments_must_be_strings(arguments, field):
    renderer, _, _ = setup("llama3.1", builtin_tools=BUILTIN)
    bad = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [call("wolfram_alpha", arguments)]},
    ]
    with pytest.raises(RenderError, match=r"messages\[1\]\.tool_calls\[0\]\.function\." + field):
        renderer.render(bad)


@pytest.mark.parametrize("variant", sorted(DIRS))
def test_dates(variant):
    tok = fixture_tokenizer(DIRS[variant])
    messages = [{"role": "user", "content": "hi"}]
    renderer = get_renderer(variant, tok)  # the template's own default
    assert renderer.render(messages, add_generation_prompt=True).token_ids == hf_ids(tok, messages, None, True)
    default = "26 Jul 2024" if variant == "llama3.1" else datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {default}\n" in decode(tok, renderer.render(messages).token_ids)
    pinned = get_renderer(variant, tok, date_string="01 Jan 2030")
    assert pinned.render(messages).token_ids == hf_ids(tok, messages, None, False, date_string="01 Jan 2030")


@pytest.mark.parametrize("variant", sorted(DIRS))
def test_later_system_and_developer_turns_render_in_place(variant):
    renderer, tok, options = setup(variant)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "system", "content": " mid "},
        {"role": "developer", "content": "dev"},
        {"role": "assistant", "content": "b"},
    ]
    assert_parity(renderer, tok, messages, None, **options)
    check_attribution(renderer, tok, messages, None)


@pytest.mark.parametrize("variant", sorted(DIRS))
def test_inputs_the_template_renders_differently(variant):
    """String arguments, part lists, None content and empty tool_calls: we equal HF on the normalised input."""
    renderer, tok, options = setup(variant)
    normalised = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "21"},
        {"role": "assistant", "content": ""},
    ]
    given_ = copy.deepcopy(normalised)
    given_[0]["content"] = [{"type": "text", "text": "sys"}]
    given_[1]["content"] = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    given_[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    given_[4] = {"role": "assistant", "content": None, "tool_calls": []}
    assert renderer.render(given_, TOOLS).token_ids == hf_ids(tok, normalised, TOOLS, False, **options)
    assert template_raises(tok, [normalised[1], {"role": "assistant", "content": "", "tool_calls": []}], None)


@pytest.mark.parametrize(
    "bad,tools,field",
    [
        ([], None, r"messages: empty"),
        ([{"role": "system", "content": "s"}], TOOLS, r"messages: tools go into the first user message"),
        ([{"role": "assistant", "content": "hi"}], TOOLS, r"messages\[0\]\.role: tools go into the first user"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [call("get_time", "{not json")]},
            ],
            None,
            r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: not valid JSON",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"arguments": {}}}],
                },
            ],
            None,
            r"messages\[1\]\.tool_calls\[0\]\.function\.name",
        ),
        ([{"role": "user", "content": "x", "tool_calls": [call("get_time", {})]}], None, r"messages\[0\]\.tool_calls"),
    ],
)
def test_render_errors_name_message_and_field(bad, tools, field):
    renderer, _, _ = setup("llama3.1")
    with pytest.raises(RenderError, match=field):
        renderer.render(bad, tools)


# ---- parsing -------------------------------------------------------------------------------------------------


def parse(text: str, variant="llama3.1", tools=TOOLS, **options):
    renderer, tok, _ = setup(variant, **options)
    return renderer.parse_response(tok.encode(text, add_special_tokens=False), tools)


def test_stop_sequences():
    for variant in DIRS:
        renderer, tok, _ = setup(variant)
        assert renderer.get_stop_sequences() == [128009, 128008]
        assert renderer.get_stop_strings() == [EOT, EOM]


@pytest.mark.parametrize(
    "text,status,ok",
    [
        ('{"name": "get_weather", "parameters": {"city": ' + EOT, "invalid_json", True),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "unclosed", False),
        ('{"name": "launch", "parameters": {}}' + EOT, "unknown_tool", True),
        ('{"name": "get_time", "parameters": {"tz": "UTC"}}' + EOM, "ok", True),
        (PYTHON_TAG + '{"name": "get_time", "parameters": {"tz": "UTC"}}' + EOM, "ok", True),
        (PYTHON_TAG + 'brave_search.call(query="x", "oops")' + EOM, "invalid_json", True),
        (PYTHON_TAG + 'brave_search.call(query="x"' + EOM, "ok", True),  # not a call: raw code_interpreter code
    ],
)
def test_parse_tool_call_statuses(text, status, ok):
    message, stopped = parse(text, builtin_tools=BUILTIN)
    assert stopped is ok and message["tool_calls"][0]["status"] == status


def test_parse_code_interpreter_and_plain_content():
    message, ok = parse(PYTHON_TAG + "print(1 + 1)" + EOM, builtin_tools=BUILTIN)
    code = {"name": "code_interpreter", "arguments": {"code": "print(1 + 1)"}}
    assert ok and message["tool_calls"][0]["function"] == code
    message, ok = parse("Hello , world ." + EOT)
    assert ok and message == {"role": "assistant", "content": "Hello , world ."}
    message, ok = parse("cut short")
    assert not ok and message["content"] == "cut short"


# ---- registry ------------------------------------------------------------------------------------------------


def test_names_aliases_and_model_patterns():
    assert canonical_name("llama3") == "llama3.1" and canonical_name("llama3.2") == "llama3.2"
    for model, name in [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama3.1"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.1"),
        ("meta-llama/Llama-3.2-1B-Instruct", "llama3.2"),
        ("meta-llama/Llama-3.2-3B-Instruct", "llama3.2"),
    ]:
        assert renderer_for_model(model) == name
    assert renderer_for_model("meta-llama/Llama-3.2-11B-Vision-Instruct") != "llama3.2"


# ---- property: random conversations render exactly like HF -----------------------------------------------------

SPECIALS = ["<|eot_id|>", "<|start_header_id|>", "<|python_tag|>", "<|im_end|>", "\n", "\n\n", " ", "{", '"']
TEXT = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), st.sampled_from(SPECIALS)), max_size=5
).map("".join)
ARGS = st.dictionaries(st.sampled_from(["city", "tz", "n"]), st.one_of(TEXT, st.integers()), max_size=2)


@st.composite
def conversations(draw):
    with_tools = draw(st.booleans())
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if with_tools and draw(st.booleans()):
            name = draw(st.sampled_from(["get_weather", "get_time"]))
            messages += [
                {"role": "assistant", "content": "", "tool_calls": [call(name, draw(ARGS))]},
                {"role": draw(st.sampled_from(["tool", "ipython"])), "content": draw(TEXT)},
            ]
        messages.append({"role": "assistant", "content": draw(TEXT)})
    if draw(st.booleans()):
        messages.pop()
    return messages, (TOOLS if with_tools else None)


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.sampled_from(sorted(DIRS)), st.booleans(), st.booleans())
def test_random_conversations_match_hf(conversation, variant, in_user, generation_prompt):
    messages, tools = conversation
    renderer, tok, options = setup(variant, tools_in_user_message=in_user)
    rendered = renderer.render(messages, tools, add_generation_prompt=generation_prompt)
    assert rendered.token_ids == hf_ids(tok, messages, tools, generation_prompt, **options)
    check_attribution(renderer, tok, messages, tools)
    if any(m["role"] == "assistant" for m in messages):
        check_supervised(renderer, tok, messages, tools)
    # Typed special tokens in an answer (e.g. "<|eot_id|>") end it early when sampled: no round trip then.
    if not any("<|" in json.dumps(m, ensure_ascii=False) for m in messages if m["role"] == "assistant"):
        check_round_trip(renderer, messages, tools)
