"""The generic `chat_template` renderer on every fixture tokenizer: ids == apply_chat_template always, and the
attribution recovered from sentinel-marked renders (with its fallbacks) satisfies the attribution invariants."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_cases import CASES, TOOLS, assert_parity, call, fixture_tokenizer, hf_ids

from render_service.renderers import RenderError, get_renderer
from render_service.renderers.chat_template import attribution_methods

FIXTURE_DIRS = sorted(p.name for p in (FIXTURES / "tokenizers").iterdir()) if FIXTURES.is_dir() else []

# Family-specific cases the shared CASES cannot express (templates that need 9-char ids / string arguments).
EXTRA = {
    "tool_cycle_9char_id": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"}, "abcDEF123")]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees."},
        ],
        TOOLS,
    ),
    "string_arguments": (
        [
            {"role": "user", "content": "Weather in Paris?"},
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
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        TOOLS,
    ),
    "string_arguments_empty_content": (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "abcDEF123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        TOOLS,
    ),
    "parts_content": (
        [
            {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hi."},
        ],
        None,
    ),
}
ALL_CASES = {**{k: (m, t) for k, (m, t, _) in CASES.items()}, **EXTRA}

# Where full attribution (markers on every message) is NOT reached, and why. Everything else is 'markers'.
EXPECTED_METHODS = {
    # Qwen's templates write `if message.content` before tool calls: the empty content is left unmarked.
    ("Qwen--Qwen2.5-7B-Instruct", "tool_call_single"): {1: "markers_stripped"},
    ("Qwen--Qwen3-8B", "tool_call_single"): {1: "markers_stripped"},
    ("Qwen--Qwen2.5-7B-Instruct", "tool_cycle_9char_id"): {1: "markers_stripped"},
    ("Qwen--Qwen3-8B", "tool_cycle_9char_id"): {1: "markers_stripped"},
    ("Qwen--Qwen2.5-7B-Instruct", "string_arguments_empty_content"): {1: "markers_stripped"},
    ("Qwen--Qwen3-8B", "string_arguments_empty_content"): {1: "markers_stripped"},
    # Qwen3 lstrips the last answer; Llama `|trim`s every message: markers go around the stripped core.
    # (the second guess strips every message with outer whitespace: the user's newlines become scaffolding)
    ("Qwen--Qwen3-8B", "whitespace_edges"): {0: "markers_stripped", 1: "markers_stripped"},
    ("meta-llama--Llama-3.1-8B-Instruct", "whitespace_edges"): {0: "markers_stripped", 1: "markers_stripped"},
    ("meta-llama--Llama-3.2-1B-Instruct", "whitespace_edges"): {0: "markers_stripped", 1: "markers_stripped"},
    # Nemo renders the system prompt only inside a final user turn: after an answer it is not rendered at all.
    ("mistralai--Mistral-Nemo-Instruct-2407", "system_answer"): {0: "none"},
    ("mistralai--Mistral-Nemo-Instruct-2407", "multi_turn"): {0: "none"},
    ("mistralai--Mistral-Nemo-Instruct-2407", "long"): {0: "none"},
    # Llama `|trim`s a parts list: the template writes the list's Python repr (escaping the markers).
    ("meta-llama--Llama-3.1-8B-Instruct", "parts_content"): {0: "none"},
    ("meta-llama--Llama-3.2-1B-Instruct", "parts_content"): {0: "none"},
}


def hf_text(tok, messages, tools, gen=False):
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)


def renders(tok, messages, tools) -> bool:
    try:
        hf_text(tok, messages, tools)
        return True
    except Exception:
        return False


def body_forms(text: str) -> list[str]:
    """How a template may write a body: verbatim, stripped, or JSON-escaped (tojson on a string)."""
    return [text, text.strip(), json.dumps(text, ensure_ascii=False)[1:-1]]


def check_invariants(renderer, tok, messages, tools, methods) -> None:
    rendered = renderer.render(messages, tools)
    n = len(rendered.token_ids)
    assert len(rendered.message_indices) == len(rendered.message_roles) == n
    assert len(rendered.sampled_mask) == len(rendered.is_content) == n
    for role, sampled, content in zip(rendered.message_roles, rendered.sampled_mask, rendered.is_content):
        assert sampled == content if role == "assistant" else not sampled
    # Scaffolding outside messages (-1) is only a head (bos, injected system/tools block) and a tail.
    inside = [k for k, i in enumerate(rendered.message_indices) if i >= 0]
    if inside:
        assert all(i >= 0 for i in rendered.message_indices[inside[0] : inside[-1] + 1])
    # Body text (checked on the segments: a token merging scaffolding with a body's first byte starts outside it).
    segments = renderer.segments(messages, tools, False)
    text = "".join(s.text for s in segments)
    for i, m in enumerate(messages):
        if methods[i] not in ("markers", "markers_stripped"):
            continue  # prefix_diff / none: the template rewrote this body, nothing verbatim to find
        body = "".join(s.text for s in segments if s.message_index == i and s.is_content)
        content = m.get("content")
        parts = [p["text"] for p in content] if isinstance(content, list) else [content or ""]
        for part in parts:
            if any(f in text for f in body_forms(part)):  # else the template drops it (gpt-oss: content
                assert any(f in body for f in body_forms(part)), (i, part, body)  # before a later answer)


def supervised_check(renderer, tok, messages, tools) -> None:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return
    full = hf_ids(tok, messages, tools, False)
    prompt = hf_ids(tok, messages[:last], tools, True) if last else None
    tokens, weights = renderer.build_supervised_example(messages, tools=tools)
    assert list(tokens) == full and len(weights) == len(full)
    first = weights.index(1.0)
    if prompt is not None and full[: len(prompt)] == prompt:  # the template is prefix-stable here
        assert list(tokens[:first]) == renderer.build_generation_prompt(messages[:last], tools=tools).to_ints()
    trained = tok.decode([t for t, w in zip(tokens, weights) if w])
    content = messages[last].get("content") or ""
    assert content.strip() in trained


@pytest.mark.parametrize("directory", FIXTURE_DIRS)
@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_fixture_case(directory, case):
    tok = fixture_tokenizer(directory)
    messages, tools = ALL_CASES[case]
    renderer = get_renderer("chat_template", tok)
    if not renders(tok, messages, tools):
        with pytest.raises(RenderError, match="chat template"):
            renderer.render(messages, tools)
        return
    assert_parity(renderer, tok, messages, tools)
    methods = attribution_methods(tok, messages, tools)
    expected = ["markers"] * len(messages)
    for i, method in EXPECTED_METHODS.get((directory, case), {}).items():
        expected[i] = method
    assert methods == expected
    check_invariants(renderer, tok, messages, tools, methods)
    supervised_check(renderer, tok, messages, tools)


def test_default_alias_is_the_generic_renderer():
    tok = fixture_tokenizer("Qwen--Qwen2.5-7B-Instruct")
    assert type(get_renderer("default", tok)) is type(get_renderer("chat_template", tok))


def test_assistant_sampled_text_ends_with_the_turn_end_token():
    expected_end = {
        "Qwen--Qwen2.5-7B-Instruct": "<|im_end|>",
        "Qwen--Qwen3-8B": "<|im_end|>",
        "meta-llama--Llama-3.1-8B-Instruct": "<|eot_id|>",
        "deepseek-ai--DeepSeek-V3": "<｜end▁of▁sentence｜>",
        "mistralai--Mistral-Nemo-Instruct-2407": "</s>",
        "openai--gpt-oss-20b": "<|end|>",
    }
    messages = CASES["multi_turn"][0]
    for directory, end in expected_end.items():
        if directory not in FIXTURE_DIRS:
            continue
        tok = fixture_tokenizer(directory)
        rendered = get_renderer("chat_template", tok).render(messages)
        for i in (2, 4):
            sampled = tok.decode(
                [
                    t
                    for t, j, s in zip(rendered.token_ids, rendered.message_indices, rendered.sampled_mask)
                    if j == i and s
                ]
            )
            last_end = "<|return|>" if directory.startswith("openai") and i == 4 else end
            assert sampled.startswith(("Paris.", "Madrid.", "<|channel|>final<|message|>", "<think>"))
            assert sampled.endswith(last_end), (directory, sampled)
        # The generation prompt is scaffolding outside messages (Nemo has none: its prompt ends with [/INST]).
        prompt = get_renderer("chat_template", tok).render(messages[:4], add_generation_prompt=True)
        assert prompt.message_indices[-1] == (3 if directory.startswith("mistral") else -1)
        assert not prompt.is_content[-1]


# ---- fallbacks on templates that transform content -------------------------------------------------------------

SPLIT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COUNTING_REVERSED_TEMPLATE = (  # not prefix-stable (count at the top) and content reversed: nothing to attribute
    "{{ messages|length }}\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content|reverse }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_transforming_template_falls_back_to_prefix_diff():
    tok = fixture_tokenizer("Qwen--Qwen2.5-7B-Instruct")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello!"}]
    renderer = get_renderer("chat_template", tok, chat_template=SPLIT_TEMPLATE)
    assert_parity(renderer, tok, messages, None, chat_template=SPLIT_TEMPLATE)
    assert attribution_methods(tok, messages, chat_template=SPLIT_TEMPLATE) == ["markers", "prefix_diff"]
    tokens, weights = renderer.build_supervised_example(messages)
    assert tok.decode([t for t, w in zip(tokens, weights) if w]) == "Hello!<|im_end|>"


def test_unattributable_template_keeps_exact_ids():
    tok = fixture_tokenizer("Qwen--Qwen2.5-7B-Instruct")
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    opts = {"chat_template": COUNTING_REVERSED_TEMPLATE}
    renderer = get_renderer("chat_template", tok, **opts)
    assert renderer.render(messages).token_ids == hf_ids(tok, messages, None, False, **opts)
    assert attribution_methods(tok, messages, **opts) == ["none", "none"]
    rendered = renderer.render(messages)
    assert not any(rendered.is_content) and not any(rendered.sampled_mask)


def test_template_error_is_a_render_error():
    tok = fixture_tokenizer("meta-llama--Llama-3.1-8B-Instruct")
    messages, tools, _ = CASES["tool_calls_several_with_content"]
    with pytest.raises(RenderError, match="single tool-calls"):
        get_renderer("chat_template", tok).render(messages, tools)


def test_private_use_text_in_content_disables_markers_but_not_ids():
    tok = fixture_tokenizer("Qwen--Qwen2.5-7B-Instruct")
    messages = [{"role": "user", "content": "odd \U000f0001 char"}, {"role": "assistant", "content": "ok"}]
    renderer = get_renderer("chat_template", tok)
    assert_parity(renderer, tok, messages, None)
    assert attribution_methods(tok, messages) == ["prefix_diff", "prefix_diff"]


# ---- property test --------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["<|im_end|>", "<|eot_id|>", "</s>", "[INST]", "\n\n", " x ", "<think>a</think>b", ""]
)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        messages.append({"role": "assistant", "content": draw(TEXT)})
    return messages[: len(messages) - draw(st.integers(0, 1))]


@pytest.mark.parametrize("directory", FIXTURE_DIRS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_property_random_conversations(directory, messages):
    tok = fixture_tokenizer(directory)
    renderer = get_renderer("chat_template", tok)
    if not renders(tok, messages, None):
        with pytest.raises(RenderError):
            renderer.render(messages)
        return
    for gen in (False, True):
        assert renderer.render(messages, add_generation_prompt=gen).token_ids == hf_ids(tok, messages, None, gen)
    check_invariants(renderer, tok, messages, None, attribution_methods(tok, messages))


def test_detected_stop_tokens():
    from render_service.renderers.chat_template import detected_stop_tokens

    expected = {
        "Qwen--Qwen2.5-7B-Instruct": {"<|im_end|>"},
        "meta-llama--Llama-3.1-8B-Instruct": {"<|eot_id|>"},
        "openai--gpt-oss-20b": {"<|return|>", "<|end|>"},
        "mistralai--Mistral-Nemo-Instruct-2407": {"</s>"},
        "deepseek-ai--DeepSeek-V3": {"<｜end▁of▁sentence｜>"},
    }
    for directory, tokens in expected.items():
        if directory in FIXTURE_DIRS:
            tok = fixture_tokenizer(directory)
            assert set(tok.convert_ids_to_tokens(detected_stop_tokens(tok))) == tokens, directory
