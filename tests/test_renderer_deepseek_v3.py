"""DeepSeek-V3 renderer: ids == apply_chat_template on the fixture tokenizer, attribution, supervised examples,
parse_response round trips, the documented template divergences, and a hypothesis property test.

The fixture template raises on dict tool-call arguments and never resets its first-call / first-output flags.
`fixed_template()` is the fixture template with exactly those two things changed (dicts through `tojson`, flags
reset per tool-calling message, <｜tool▁outputs▁end｜> as the header after outputs), so the renderer is compared
with real Jinja output on every conversation, and with the untouched fixture template wherever it can render.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache

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

DIR = "deepseek-ai--DeepSeek-V3"
EOS, CALLS_BEGIN, CALLS_END = "<｜end▁of▁sentence｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def setup():
    tok = fixture_tokenizer(DIR)
    return get_renderer("deepseek-v3", tok), tok


@lru_cache(maxsize=None)
def fixed_template() -> str:
    text = fixture_tokenizer(DIR).chat_template
    args = "tool['function']['arguments']"
    edits = [
        ("namespace(is_first=false,", "namespace(header='', is_first=false,", 1),
        (
            "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}",
            "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}"
            "{%- if ns.is_tool %}{%- set ns.header = '<｜tool▁outputs▁end｜>' -%}"
            "{%- else %}{%- set ns.header = '<｜Assistant｜>' -%}{%- endif %}"
            "{%- set ns.is_first = false -%}{%- set ns.is_output_first = true -%}{%- set ns.is_tool = false -%}",
            1,
        ),
        ("{{'<｜Assistant｜><｜tool▁calls▁begin｜>", "{{ns.header + '<｜tool▁calls▁begin｜>", 1),
        (
            "{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜>",
            "{{ns.header + message['content'] + '<｜tool▁calls▁begin｜>",
            1,
        ),
        (args, f"({args} if {args} is string else {args} | tojson)", 3),
    ]
    for old, new, count in edits:
        assert text.count(old) == count, old
        text = text.replace(old, new)
    return text


def stringified(messages):
    """The messages with dict arguments written as HF's tojson would, for the untouched fixture template."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls") or []:
            if not isinstance(c["function"]["arguments"], str):
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    return out


def tool_turns(messages) -> int:
    return sum(1 for m in messages if m["role"] == "assistant" and m.get("tool_calls"))


def assert_matches_templates(renderer, tok, messages, tools) -> None:
    """Fixed template always; the untouched fixture template wherever it renders consistently."""
    assert_parity(renderer, tok, messages, tools, chat_template=fixed_template())
    if tool_turns(messages) <= 1:
        plain = stringified(messages)
        assert renderer.render(messages, tools).token_ids == hf_ids(tok, plain, tools, False)
        assert_parity(renderer, tok, plain, tools)


def args_of(call_: dict):
    arguments = call_["function"]["arguments"]
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def rendered_content(messages, j) -> str:
    """messages[j]'s content as rendered: text before the last </think> is dropped unless it follows outputs."""
    m = messages[j]
    content = m.get("content") or ""
    before = [x["role"] for x in messages[:j] if x["role"] != "system"]  # systems are hoisted
    return content if m.get("tool_calls") or before[-1:] == ["tool"] else content.split("</think>")[-1]


def args_text(call_: dict) -> str:
    arguments = call_["function"]["arguments"]
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def sampled_text(messages, j) -> str:
    m = messages[j]
    text = rendered_content(messages, j)
    if m.get("tool_calls"):
        calls = [
            f"{CALL_BEGIN}function{SEP}{c['function']['name']}\n```json\n{args_text(c)}\n```{CALL_END}"
            for c in m["tool_calls"]
        ]
        text += CALLS_BEGIN + "\n".join(calls) + CALLS_END
    return text + EOS


def check_attribution(renderer, tok, messages, tools) -> None:
    assert_bodies_attributed(renderer, tok, messages, tools, lambda m: (m["content"] or "").strip())


def check_supervised(renderer, tok, messages, tools) -> None:
    assert_supervised_is_prompt_then_sample(renderer, tok, messages, tools, sampled_text)


def check_round_trip(renderer, messages, tools) -> None:
    eos = renderer.get_stop_sequences()
    for j, m in enumerate(messages):
        if m["role"] != "assistant" or "</think>" in rendered_content(messages, j):
            continue  # a sampled </think> starts the answer, so such kept text cannot come back verbatim
        full = renderer.render(messages[: j + 1], tools)
        prompt = renderer.build_generation_prompt(messages[:j], tools=tools).to_ints()
        tokens = [t for t, k, s in zip(full.token_ids, full.message_indices, full.sampled_mask) if k == j and s]
        assert full.token_ids[: len(prompt)] == prompt and full.token_ids[len(prompt) :] == tokens
        assert tokens[-1] in eos and not any(t in eos for t in tokens[:-1])
        parsed, ok = renderer.parse_response(tokens, tools)
        assert ok and parsed["content"] == rendered_content(messages, j) and "reasoning_content" not in parsed
        got = [(c["function"]["name"], c["function"]["arguments"], c["status"]) for c in parsed.get("tool_calls", [])]
        assert got == [(c["function"]["name"], args_of(c), "ok") for c in m.get("tool_calls") or []]
        assert not renderer.parse_response(tokens[:-1], tools)[1]


# ---- every shared case ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_cases(case):
    renderer, tok = setup()
    messages, tools, _features = CASES[case]
    assert_matches_templates(renderer, tok, messages, tools)
    check_attribution(renderer, tok, messages, tools)
    if any(m["role"] == "assistant" for m in messages):
        check_supervised(renderer, tok, messages, tools)
        check_round_trip(renderer, messages, tools)


def test_fixture_template_raises_on_dict_arguments():
    _, tok = setup()
    messages, tools, _ = CASES["tool_call_single"]
    with pytest.raises(TypeError):
        hf_ids(tok, messages, tools, False)


# ---- family-specific cases -------------------------------------------------------------------------------------

USER = {"role": "user", "content": "Weather in Paris and Oslo?"}
ROUND_1 = [
    {"role": "assistant", "content": "Checking.", "tool_calls": [call("get_weather", {"city": "Paris"})]},
    {"role": "tool", "content": "21C"},
]
ROUND_2 = [
    {
        "role": "assistant",
        "content": "Now Oslo.",
        "tool_calls": [call("get_weather", {"city": "Oslo"}, "c2"), call("get_time", {"tz": "CET"}, "c3")],
    },
    {"role": "tool", "content": "5C"},
    {"role": "tool", "content": "14:05"},
]
FAMILY = {
    "systems_hoisted": [
        {"role": "system", "content": "One."},
        USER,
        {"role": "system", "content": "Two. "},
        {"role": "assistant", "content": "ok"},
    ],
    "think_stripped": [USER, {"role": "assistant", "content": "<think>hmm</think>first</think>\n\nAnswer."}],
    "think_kept_after_outputs": [USER, *ROUND_1, {"role": "assistant", "content": "x</think>It is 21C."}],
    "string_arguments_verbatim": [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", '{"city":"Paris"}')]},
        {"role": "tool", "content": "21C"},
    ],
    "two_tool_rounds": [USER, *ROUND_1, *ROUND_2, {"role": "assistant", "content": "21C and 5C."}],
    "tool_round_after_user": [
        USER,
        *ROUND_1,
        {"role": "assistant", "content": "21C."},
        {"role": "user", "content": "Oslo?"},
        *ROUND_2,
        {"role": "assistant", "content": "5C."},
    ],
    "user_after_outputs": [USER, *ROUND_1, {"role": "user", "content": "Go on."}],
    "assistant_after_assistant": [USER, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
}


@pytest.mark.parametrize("case", sorted(FAMILY))
def test_family_cases(case):
    renderer, tok = setup()
    messages = FAMILY[case]
    assert_matches_templates(renderer, tok, messages, TOOLS)
    check_attribution(renderer, tok, messages, TOOLS)
    for generation_prompt in (False, True):
        ids = renderer.render(messages, TOOLS, generation_prompt).token_ids
        assert ids == hf_ids(tok, messages, TOOLS, generation_prompt, chat_template=fixed_template())
    if messages[-1]["role"] == "assistant":
        check_supervised(renderer, tok, messages, TOOLS)
    check_round_trip(renderer, messages, TOOLS)


def test_second_tool_round_is_where_the_fixture_template_breaks():
    renderer, tok = setup()
    messages = FAMILY["two_tool_rounds"]
    broken = decode(tok, hf_ids(tok, stringified(messages), TOOLS, False))
    ours = decode(tok, renderer.render(messages, TOOLS).token_ids)
    assert "Now Oslo." not in broken and "Now Oslo." in ours
    assert "<｜tool▁outputs▁end｜>Now Oslo.<｜tool▁calls▁begin｜>" in ours


def test_inputs_the_template_cannot_render():
    """None / part-list content and empty tool_calls: we equal HF on the normalised input."""
    renderer, tok = setup()
    normalised = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_time", '{"tz": "UTC"}')]},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": ""},
    ]
    given_ = copy.deepcopy(normalised)
    given_[0]["content"] = [{"type": "text", "text": "sys"}]
    given_[1]["content"] = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    given_[2]["content"] = None
    given_[4] = {"role": "assistant", "content": None, "tool_calls": []}
    assert renderer.render(given_).token_ids == hf_ids(tok, normalised, None, False)
    with pytest.raises(Exception):  # noqa: B017 - the template itself fails on content None
        hf_ids(tok, given_[:3], None, False)


@pytest.mark.parametrize(
    "bad,field",
    [
        ([], r"messages: empty"),
        ([{"role": "developer", "content": "d"}], r"messages\[0\]\.role: 'developer'"),
        ([{"role": "user", "content": "x"}, {"role": "ipython", "content": "d"}], r"messages\[1\]\.role: 'ipython'"),
        ([{"role": "user", "content": "x", "tool_calls": [call("get_time", {})]}], r"messages\[0\]\.tool_calls"),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [call("get_time", {}), {"type": "function", "function": {"arguments": "{}"}}],
                },
            ],
            r"messages\[1\]\.tool_calls\[1\]\.function\.name",
        ),
    ],
)
def test_render_errors_name_message_and_field(bad, field):
    renderer, _ = setup()
    with pytest.raises(RenderError, match=field):
        renderer.render(bad)


# ---- parsing ---------------------------------------------------------------------------------------------------


def parse(text: str, tools=TOOLS):
    renderer, tok = setup()
    return renderer.parse_response(tok.encode(text, add_special_tokens=False), tools)


def one_call(name: str, body: str) -> str:
    return f"{CALLS_BEGIN}{CALL_BEGIN}function{SEP}{name}\n```json\n{body}\n```{CALL_END}{CALLS_END}{EOS}"


@pytest.mark.parametrize(
    "text,status,ok",
    [
        (one_call("get_weather", '{"city": "Paris"'), "invalid_json", True),
        (one_call("launch", "{}"), "unknown_tool", True),
        (f'{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_weather\n```json\n{{"city"', "unclosed", False),
        (f"{CALLS_BEGIN}{CALL_BEGIN}function get_time{CALL_END}{CALLS_END}{EOS}", "missing_name", True),
        (f'{CALLS_BEGIN}{CALL_BEGIN}function{SEP}get_time\n{{"tz": "UTC"}}{CALL_END}{CALLS_END}{EOS}', "ok", True),
        (f"{CALLS_BEGIN}{EOS}", "missing_name", True),
        (f"Let me see.{CALLS_BEGIN}", "unclosed", False),
    ],
)
def test_parse_tool_call_statuses(text, status, ok):
    message, stopped = parse(text)
    assert stopped is ok and message["tool_calls"][0]["status"] == status


def test_parse_reasoning_content_and_truncation():
    message, ok = parse("<think>\nLook it up.\n</think>\n\nSure." + one_call("get_time", '{"tz": "UTC"}'))
    assert ok and message["reasoning_content"] == "Look it up." and message["content"] == "\n\nSure."
    assert message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": {"tz": "UTC"}}
    message, ok = parse("Half an ans")
    assert not ok and message == {"role": "assistant", "content": "Half an ans"}


def test_stop_sequences():
    renderer, tok = setup()
    assert renderer.get_stop_sequences() == [tok.eos_token_id] == [1]


def test_names_aliases_and_model_patterns():
    assert canonical_name("deepseekv3") == "deepseek-v3"
    for model in ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-0324", "deepseek-ai/DeepSeek-V3-Base"):
        assert renderer_for_model(model) == "deepseek-v3"
    assert renderer_for_model("deepseek-ai/DeepSeek-V3.1") != "deepseek-v3"  # a different template


# ---- property: random conversations render exactly like HF -----------------------------------------------------

SPECIALS = [
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜end▁of▁sentence｜>",
    "</think>",
    "<|im_end|>",
    "\n",
    "\n\n",
    " ",
    "```",
]
TEXT = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=12), st.sampled_from(SPECIALS)), max_size=5
).map("".join)
ARGS = st.one_of(
    st.dictionaries(st.sampled_from(["city", "tz", "n"]), st.one_of(TEXT, st.integers()), max_size=2),
    st.sampled_from(['{"city": "Paris"}', "{}", '{"tz":"UTC"}']),
)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        for _ in range(draw(st.integers(0, 2))):
            names = draw(st.lists(st.sampled_from(["get_weather", "get_time"]), min_size=1, max_size=2))
            messages.append(
                {
                    "role": "assistant",
                    "content": draw(TEXT),
                    "tool_calls": [call(n, draw(ARGS), f"c{k}") for k, n in enumerate(names)],
                }
            )
            messages += [{"role": "tool", "content": draw(TEXT)} for _ in names]
        messages.append({"role": "assistant", "content": draw(TEXT)})
        if draw(st.booleans()):
            messages.append({"role": "system", "content": draw(TEXT)})
    if draw(st.booleans()):
        messages.pop()
    return messages


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.booleans())
def test_random_conversations_match_hf(messages, generation_prompt):
    renderer, tok = setup()
    rendered = renderer.render(messages, TOOLS, add_generation_prompt=generation_prompt)
    assert rendered.token_ids == hf_ids(tok, messages, TOOLS, generation_prompt, chat_template=fixed_template())
    if tool_turns(messages) <= 1:
        assert rendered.token_ids == hf_ids(tok, stringified(messages), TOOLS, generation_prompt)
    check_attribution(renderer, tok, messages, TOOLS)
    roles = [m["role"] for m in messages]
    # A system message after the last answer is hoisted in front of it, so its prompt is not the prefix's.
    if "assistant" in roles and "system" not in roles[max(i for i, r in enumerate(roles) if r == "assistant") :]:
        check_supervised(renderer, tok, messages, TOOLS)
    # Typed special tokens in an answer (e.g. "<｜end▁of▁sentence｜>") end it early when sampled.
    if not any(
        s in json.dumps(m, ensure_ascii=False)
        for m in messages
        if m["role"] == "assistant"
        for s in ("<｜", "</think>")
    ):
        check_round_trip(renderer, messages, TOOLS)
