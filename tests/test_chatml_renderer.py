"""The `ultrasafe` ChatML renderer: exact ids, per-token attribution, weights, prompts, parsing."""

from __future__ import annotations

import pytest

from bios import types
from bios_cookbook import renderers

MESSAGES = [
    {"role": "system", "content": "Answer concisely; at most one sentence per response"},
    {"role": "user", "content": "What is the longest-lived rodent species?"},
    {"role": "assistant", "content": "The naked mole rat, which can live over 30 years."},
    {"role": "user", "content": "How do they live so long?"},
    {"role": "assistant", "content": "They evolved multiple protective mechanisms."},
]


@pytest.fixture(scope="module")
def renderer(qwen3_tokenizer):
    return renderers.get_renderer("ultrasafe", qwen3_tokenizer)


def test_alias_chatml_is_the_same_renderer(qwen3_tokenizer):
    assert type(renderers.get_renderer("chatml", qwen3_tokenizer)) is type(
        renderers.get_renderer("ultrasafe", qwen3_tokenizer)
    )


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_ids_equal_apply_chat_template(renderer, qwen3_tokenizer, n):
    tok = qwen3_tokenizer
    for add in (False, True):
        expected = tok.apply_chat_template(MESSAGES[:n], tokenize=False, add_generation_prompt=add)
        ids = tok.encode(expected, add_special_tokens=False)
        assert renderer.render(MESSAGES[:n], add_generation_prompt=add).token_ids == ids


def test_seed_prompt_prefix_and_stop_sequence(renderer, qwen3_tokenizer):
    prompt = renderer.build_generation_prompt(MESSAGES[:-1])
    assert isinstance(prompt, types.ModelInput)
    assert prompt.to_ints()[:3] == [151644, 8948, 198]
    assert renderer.get_stop_sequences() == [151645]
    assert qwen3_tokenizer.decode(prompt.to_ints()).endswith("<|im_start|>assistant\n")
    assert repr(prompt).startswith("ModelInput(chunks=[EncodedTextChunk(tokens=[151644, 8948, 198,")


def test_supervised_weights_cover_last_answer_and_its_end_token(renderer, qwen3_tokenizer):
    tokens, weights = renderer.build_supervised_example(MESSAGES)
    trained = [t for t, w in zip(tokens, weights) if w]
    assert qwen3_tokenizer.decode(trained) == MESSAGES[-1]["content"] + "<|im_end|>"
    assert set(weights) == {0.0, 1.0} and len(weights) == len(tokens)
    # Both seed styles: slicing (seed 000) and .to_ints() (seed 004).
    assert tokens[:-1] == tokens.to_ints()[:-1]
    # The supervised prompt part is exactly the generation prompt of the prefix.
    first = weights.index(1.0)
    assert list(tokens[:first]) == renderer.build_generation_prompt(MESSAGES[:-1]).to_ints()


def test_attribution(renderer):
    rendered = renderer.render(MESSAGES)
    n = len(rendered.token_ids)
    assert len(rendered.message_indices) == len(rendered.is_content) == len(rendered.sampled_mask) == n
    assert set(rendered.message_indices) == set(range(len(MESSAGES)))
    # is_content == sampled_mask on assistant tokens; sampled only on assistant tokens.
    for role, sampled, content in zip(rendered.message_roles, rendered.sampled_mask, rendered.is_content):
        if role == "assistant":
            assert sampled == content
        else:
            assert not sampled
    spans = rendered.content_token_spans_by_role()
    assert set(spans) == {"system", "user", "assistant"} and len(spans["user"]) == 2
    user_mask = rendered.content_mask_for_roles({"user"})
    assert sum(user_mask) > 0 and not any(m and r != "user" for m, r in zip(user_mask, rendered.message_roles))


@pytest.mark.parametrize(
    "what,expected", [("last_assistant_message", {4}), ("all_assistant_messages", {2, 4}), ("last_assistant_turn", {4})]
)
def test_train_on_what(renderer, what, expected):
    example = renderer.supervised_example(MESSAGES, what)
    weighted = {i for i, w in zip(example.rendered.message_indices, example.weights) if w}
    assert weighted == expected


def test_content_sft_roles_supervise_bodies_not_wrappers(renderer, qwen3_tokenizer):
    example = renderer.supervised_example(MESSAGES, content_sft_roles={"user"})
    text = qwen3_tokenizer.decode(
        [
            t
            for t, w, r in zip(example.rendered.token_ids, example.weights, example.rendered.message_roles)
            if w and r == "user"
        ]
    )
    assert text == MESSAGES[1]["content"] + MESSAGES[3]["content"]


def test_parse_response_round_trip(renderer, qwen3_tokenizer):
    answer = "Naked mole rats resist cancer."
    tokens = qwen3_tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    message, ok = renderer.parse_response(tokens)
    assert ok and message == {"role": "assistant", "content": answer}
    message, ok = renderer.parse_response(tokens[:-1])
    assert not ok and message["content"] == answer


def test_prefill_is_attributed_to_the_new_assistant_message(renderer, qwen3_tokenizer):
    rendered = renderer.render_generation_prompt(MESSAGES[:-1], prefill="They")
    assert qwen3_tokenizer.decode(rendered.token_ids).endswith("<|im_start|>assistant\nThey")
    assert rendered.message_indices[-1] == len(MESSAGES) - 1 and rendered.sampled_mask[-1]


@pytest.mark.parametrize(
    "bad,field",
    [
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}], "messages[1].role"),
        ("hello", "messages"),
    ],
)
def test_malformed_messages_name_index_and_field(renderer, bad, field):
    with pytest.raises(renderers.RenderError, match=field.replace("[", r"\[").replace("]", r"\]")):
        renderer.render(bad)


def test_format_colorized_marks_completion(renderer, qwen3_tokenizer):
    from bios_cookbook.utils.format_colorized import format_colorized

    tokens, weights = renderer.build_supervised_example(MESSAGES)
    shown = format_colorized(tokens, weights, qwen3_tokenizer)
    assert "\033[31m" + MESSAGES[-1]["content"] in shown and "↵" in shown
