"""Declarative conversation templates (seed 003): loading, validation, attribution, and the bundled chatml.json
reproducing the `ultrasafe` renderer exactly."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_cases import fixture_tokenizer

from render_service.renderers import RenderError, get_renderer
from render_service.renderers.declarative import TEMPLATES_DIR, DeclarativeRenderer
from render_service.renderers.declarative_schema import (
    ConversationTemplate,
    EmptyFormatter,
    ListFormatter,
    StringFormatter,
    TemplateComponent,
)

CHATML = TEMPLATES_DIR / "chatml.json"
CONVERSATION = [
    {"role": "system", "content": "Answer concisely."},
    {"role": "user", "content": "What is the longest-lived rodent?"},
    {"role": "assistant", "content": "The naked mole rat."},
    {"role": "user", "content": "How long?"},
    {"role": "assistant", "content": "Over 30 years."},
]
TRAIN_ON = ("last_assistant_message", "last_assistant_turn", "all_assistant_messages", "all_messages")


@pytest.fixture(scope="module")
def chatml(qwen3_tokenizer):
    return get_renderer("declarative", qwen3_tokenizer, template=CHATML)


def assert_same_as_ultrasafe(declarative, ultrasafe, messages):
    for gen in (False, True):
        expected = ultrasafe.render(messages, add_generation_prompt=gen)
        assert declarative.render(messages, add_generation_prompt=gen) == expected
    if any(m["role"] == "assistant" for m in messages):
        for what in TRAIN_ON:
            a, b = declarative.supervised_example(messages, what), ultrasafe.supervised_example(messages, what)
            assert a.rendered.token_ids == b.rendered.token_ids and a.weights == b.weights


def test_chatml_json_reproduces_ultrasafe(chatml, qwen3_tokenizer):
    ultrasafe = get_renderer("ultrasafe", qwen3_tokenizer)
    for n in range(1, len(CONVERSATION) + 1):
        assert_same_as_ultrasafe(chatml, ultrasafe, CONVERSATION[:n])
    assert chatml.get_stop_sequences() == ultrasafe.get_stop_sequences()
    prompt = chatml.build_generation_prompt(CONVERSATION[:-1])
    assert prompt.to_ints() == ultrasafe.build_generation_prompt(CONVERSATION[:-1]).to_ints()
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert_same_as_ultrasafe(chatml, ultrasafe, developer)


def test_bundled_name_and_object_and_dict_forms(qwen3_tokenizer, chatml):
    by_name = get_renderer("declarative", qwen3_tokenizer, template="chatml")
    obj = ConversationTemplate.from_file(CHATML)
    by_obj = get_renderer("declarative", qwen3_tokenizer, template=obj)
    by_dict = get_renderer("declarative", qwen3_tokenizer, template=json.loads(CHATML.read_text()))
    for r in (by_name, by_obj, by_dict):
        assert r.render(CONVERSATION) == chatml.render(CONVERSATION)
    assert obj.template_name == "chatml"


def test_declarative_colon_path_name(qwen3_tokenizer, chatml):
    try:
        renderer = get_renderer(f"declarative:{CHATML}", qwen3_tokenizer)
    except RenderError as exc:
        if "unknown renderer" in str(exc):
            pytest.skip("registry.get_renderer does not resolve 'declarative:<path>' names yet")
        raise
    assert renderer.render(CONVERSATION) == chatml.render(CONVERSATION)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["system", "user", "assistant"]),
            st.text(max_size=20) | st.sampled_from(["<|im_end|>", "\n", " <|im_start|>user"]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_property_chatml_json_equals_ultrasafe(qwen3_tokenizer, chatml, pairs):
    messages = [{"role": r, "content": c} for r, c in pairs]
    assert_same_as_ultrasafe(chatml, get_renderer("ultrasafe", qwen3_tokenizer), messages)


def test_from_file_yaml_and_errors(tmp_path):
    yaml = pytest.importorskip("yaml")
    data = json.loads(CHATML.read_text())
    path = tmp_path / "chatml.yaml"
    path.write_text(yaml.safe_dump(data))
    assert ConversationTemplate.from_file(path) == ConversationTemplate.from_file(CHATML)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RenderError, match="not valid JSON"):
        ConversationTemplate.from_file(bad)
    bad.write_text(
        json.dumps(
            {
                **data,
                "user_formatter": {"type": "string", "template": [{"type": "string", "content": "no placeholder"}]},
            }
        )
    )
    with pytest.raises(RenderError, match="needs a .*content.* placeholder"):
        ConversationTemplate.from_file(bad)
    bad.write_text(
        json.dumps({"user_formatter": {"type": "string", "template": [{"type": "widget", "content": "SECRET"}]}})
    )
    with pytest.raises(RenderError, match="user_formatter") as info:  # errors name fields, never echo input
        ConversationTemplate.from_file(bad)
    assert "SECRET" not in str(info.value)
    with pytest.raises(RenderError, match="cannot read"):
        ConversationTemplate.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"type": "string", "content": ""}, "cannot be empty"),
        ({"type": "string", "content": "{{name}}"}, "unknown placeholder"),
        ({"type": "token_id", "content": "x"}, "int or a list of ints"),
        ({"type": "widget", "content": "x"}, "type"),
    ],
)
def test_component_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemplateComponent(**kwargs)


def test_formatter_validation():
    with pytest.raises(ValueError, match="must not contain placeholders"):
        EmptyFormatter(template=[TemplateComponent(type="string", content="{{content}}")])
    with pytest.raises(ValueError, match="needs a"):
        StringFormatter(template=[TemplateComponent(type="string", content="plain")])


# A richer template on the Llama fixture: bos/eos token components, a token_id component, a mask=false header,
# a reasoning placeholder, tools and tool-call formatters, a separator and a special stopper.
def llama_like() -> ConversationTemplate:
    def header(role):
        return [
            TemplateComponent(type="token", content="<|start_header_id|>"),
            TemplateComponent(type="string", content=f"{role}"),
            TemplateComponent(type="token_id", content=128007),  # <|end_header_id|>
            TemplateComponent(type="string", content="\n\n"),
        ]

    return ConversationTemplate(
        template_name="llama-like",
        special_starter=TemplateComponent(type="token", content="bos_token"),
        system_formatter=StringFormatter(
            template=header("system") + [TemplateComponent(type="string", content="{{content}}<|eot_id|>")]
        ),
        user_formatter=StringFormatter(
            template=header("user") + [TemplateComponent(type="string", content="{{content}}<|eot_id|>")]
        ),
        assistant_formatter=StringFormatter(
            template=header("assistant")
            + [
                TemplateComponent(type="string", content="<think>{{reasoning_content}}</think>{{content}}"),
                TemplateComponent(type="token", content="eos_token"),
                TemplateComponent(type="string", content="[after-stop]"),
            ]
        ),
        role_formatters={
            "tool": StringFormatter(
                template=header("ipython") + [TemplateComponent(type="string", content="{{content}}<|eot_id|>")]
            )
        },
        tools_formatter=ListFormatter(
            template=[TemplateComponent(type="string", content="TOOL {{content}}")], separator="\n"
        ),
        tool_call_formatter=StringFormatter(template=[TemplateComponent(type="string", content="CALL{{content}}")]),
        separator=TemplateComponent(type="string", content="\n"),
        special_stopper=TemplateComponent(type="string", content="<|end_of_text|>"),
    )


def test_rich_template_attribution():
    tok = fixture_tokenizer("meta-llama--Llama-3.1-8B-Instruct")
    renderer = DeclarativeRenderer(tok, template=llama_like())
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "think",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "Done.", "reasoning_content": "think"},
    ]
    stopper = renderer.render(messages[:2] + [{"role": "assistant", "content": "x"}], tools)
    assert stopper.message_indices[-1] == -1 and not stopper.sampled_mask[-1]  # eos already ended the turn
    text = "".join(s.text for s in renderer.segments(messages, tools, False))
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>TOOL {")
    assert text.endswith("<think>think</think>Done.<|eot_id|>[after-stop]<|end_of_text|>")
    rendered = renderer.render(messages, tools)
    assert rendered.token_ids == tok.encode(text, add_special_tokens=False)
    assert renderer.get_stop_sequences() == [tok.convert_tokens_to_ids("<|eot_id|>")]
    for i in (2, 4):
        sampled = tok.decode(
            [t for t, j, s in zip(rendered.token_ids, rendered.message_indices, rendered.sampled_mask) if j == i and s]
        )
        assert sampled == (
            'think</think>CALL{"name": "f", "arguments": {"a": 1}}<|eot_id|>'
            if i == 2
            else "think</think>Done.<|eot_id|>"
        )
    for role, s, c in zip(rendered.message_roles, rendered.sampled_mask, rendered.is_content):
        assert s == c if role == "assistant" else not s
    tool_body = tok.decode(
        [t for t, j, c in zip(rendered.token_ids, rendered.message_indices, rendered.is_content) if j == 3 and c]
    )
    assert tool_body == "42"
    # The generation prompt is the assistant header (up to the first placeholder), after the separator.
    assert renderer.generation_prompt_text() == "<|start_header_id|>assistant<|end_header_id|>\n\n<think>"
    tokens, weights = renderer.build_supervised_example(messages, tools=tools)
    first = weights.index(1.0)
    assert list(tokens[:first]) == renderer.build_generation_prompt(messages[:-1], tools=tools).to_ints()
    # Round trip of what the model samples.
    sampled_ids = tok.encode("think</think>Done.<|eot_id|>", add_special_tokens=False)
    message, ok = renderer.parse_response(sampled_ids)
    assert ok and message == {"role": "assistant", "content": "Done.", "reasoning_content": "think"}
    assert renderer.parse_response(sampled_ids[:-1])[1] is False


def test_missing_formatters_raise_clear_errors(qwen3_tokenizer, chatml):
    with pytest.raises(RenderError, match="tool_call_formatter"):
        chatml.render(
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}],
                },
            ]
        )
    with pytest.raises(RenderError, match="tools_formatter"):
        chatml.render([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {"name": "f"}}])
    bare = ConversationTemplate(
        user_formatter=StringFormatter(template=[TemplateComponent(type="string", content="{{content}}")]),
        assistant_formatter=StringFormatter(template=[TemplateComponent(type="string", content="{{content}}")]),
    )
    with pytest.raises(RenderError, match=r"messages\[0\].role.*'system'"):
        DeclarativeRenderer(qwen3_tokenizer, template=bare).render([{"role": "system", "content": "x"}])
    with pytest.raises(RenderError, match="pass template="):
        get_renderer("declarative", qwen3_tokenizer)
    with pytest.raises(RenderError, match="has none"):
        DeclarativeRenderer(
            qwen3_tokenizer,
            template=bare.model_copy(update={"special_starter": TemplateComponent(type="token", content="bos_token")}),
        ).render([{"role": "user", "content": "x"}])
