"""A renderer follows its tokenizer: a family paired with another family's tokenizer is refused naming both, a
model directory gets the family its path names, and a renderer that cannot represent a field refuses it."""

from __future__ import annotations

import re

import pytest

from render_service.model_registry import resolve
from render_service.renderers import RenderError, get_renderer
from render_service.tokenizers import get_tokenizer

LLAMA = "meta-llama--Llama-3.2-1B-Instruct"
CALL = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


def test_a_family_over_another_familys_tokenizer_is_refused_naming_both(qwen3_tokenizer, fixtures_dir):
    with pytest.raises(
        RenderError,
        match=r"^renderer: 'llama3.2' does not match the tokenizer 'ultrasafe/usf-mini': "
        r"its special token '<\|begin_of_text\|>'",
    ):
        get_renderer("llama3.2", qwen3_tokenizer, tokenizer_name="ultrasafe/usf-mini")
    llama = get_tokenizer(str(fixtures_dir / "tokenizers" / LLAMA))
    with pytest.raises(RenderError, match=r"'ultrasafe' does not match the tokenizer .*Llama-3.2.*'<\|im_start\|>'"):
        get_renderer("ultrasafe", llama)
    assert get_renderer("llama3.2", llama).render([{"role": "user", "content": "hi"}]).token_ids[0] == 128000
    # families that share the Qwen tokens pair with the Qwen3 tokenizer; the generic one follows any tokenizer
    for name in ("ultrasafe", "qwen2.5", "qwen3", "chat_template"):
        get_renderer(name, qwen3_tokenizer)


def test_the_render_service_names_the_tokenizer_as_the_caller_did(client):
    from bios.errors import InvalidArgumentError

    renderer = client.render_client("llama3.2", "ultrasafe/usf-mini")
    with pytest.raises(
        InvalidArgumentError, match="renderer: 'llama3.2' does not match the tokenizer 'ultrasafe/usf-mini'"
    ):
        renderer.build_generation_prompt([{"role": "user", "content": "hi"}])


def test_a_model_directory_gets_the_family_its_path_names(fixtures_dir, tmp_path):
    assert resolve(str(fixtures_dir / "tokenizers" / LLAMA)).renderer == "llama3.2"
    assert resolve(str(fixtures_dir / "tokenizers" / "Qwen--Qwen3-8B")).renderer == "qwen3"
    snapshot = tmp_path / "models--meta-llama--Llama-3.1-8B-Instruct" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert resolve(str(snapshot)).renderer == "llama3.1"
    assert resolve(str(tmp_path)).renderer == "chat_template"  # nothing to go by: the tokenizer's own template


@pytest.mark.parametrize(
    "messages,tools,field",
    [
        ([{"role": "user", "content": "x"}, CALL], None, "messages[1].tool_calls"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": "z"}],
            None,
            "messages[1].reasoning_content",
        ),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], TOOLS, "tools"),
    ],
)
def test_chatml_refuses_what_it_cannot_represent(qwen3_tokenizer, messages, tools, field):
    renderer = get_renderer("ultrasafe", qwen3_tokenizer)
    with pytest.raises(RenderError, match=rf"^{re.escape(field)}: the ultrasafe renderer cannot represent"):
        renderer.build_supervised_example(messages, tools=tools)
    # a family whose format has them renders them
    tokens, _ = get_renderer("qwen3", qwen3_tokenizer).build_supervised_example(messages, tools=tools)
    assert len(tokens) > 5
