"""bridge_to_next_turn: earlier tokens kept verbatim, the next turn appended exactly as a full re-render writes it,
and refusals (None + reason) whenever that cannot be exact."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from parity_cases import TOOLS, call, fixture_tokenizer

from render_service.renderers import get_renderer
from render_service.renderers.bridge import bridge_to_next_turn
from render_service.renderers.registry import canonical_name

HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
ANSWER = {"role": "assistant", "content": "Paris."}
NEXT = [{"role": "user", "content": "And of Spain?"}]


def sample_turn(renderer, history, answer, tools=None):
    """(prompt ids, completion ids) as sampling would produce them: the rendered answer after the prompt, up to
    and including its stop token. None when the full render does not start with the prompt (BPE merge)."""
    prompt = renderer.build_generation_prompt(history, tools=tools).to_ints()
    full = renderer.render([*history, answer], tools)
    i = len(history)
    end = max(k for k, (j, s) in enumerate(zip(full.message_indices, full.sampled_mask)) if j == i and s) + 1
    if full.token_ids[: len(prompt)] != prompt:
        return None
    return prompt, full.token_ids[len(prompt) : end]


def families(qwen3_tokenizer):
    """(name, renderer) for ChatML and, when registered, the Qwen2.5 / Llama 3.1 families and the generic one."""
    out = [("ultrasafe", get_renderer("ultrasafe", qwen3_tokenizer))]
    for name, fixture in (
        ("qwen2.5", "Qwen--Qwen2.5-7B-Instruct"),
        ("llama3.1", "meta-llama--Llama-3.1-8B-Instruct"),
        ("chat_template", "Qwen--Qwen2.5-7B-Instruct"),
        ("chat_template", "meta-llama--Llama-3.1-8B-Instruct"),
    ):
        try:
            canonical_name(name)
        except Exception:
            continue
        out.append((f"{name}/{fixture}", get_renderer(name, fixture_tokenizer(fixture))))
    return out


def test_bridge_equals_full_render(qwen3_tokenizer):
    for name, renderer in families(qwen3_tokenizer):
        prompt, completion = sample_turn(renderer, HISTORY, ANSWER)
        full = renderer.render([*HISTORY, ANSWER, *NEXT], add_generation_prompt=True)
        for history in (HISTORY, None):
            bridged, reason = bridge_to_next_turn(renderer, prompt, completion, NEXT, history=history)
            assert bridged is not None, (name, reason)
            assert reason == "ok"
            n = len(prompt) + len(completion)
            assert bridged.token_ids[:n] == prompt + completion
            assert bridged.token_ids == full.token_ids, name
            # Earlier tokens: -1 / not sampled / not content; new tokens: indices into NEXT, then the prompt.
            assert set(bridged.message_indices[:n]) == {-1}
            assert not any(bridged.sampled_mask[:n] + bridged.is_content[:n])
            assert 0 in bridged.message_indices[n:] and bridged.message_indices[-1] == -1
            user_body = [
                t for t, i, c in zip(bridged.token_ids, bridged.message_indices, bridged.is_content) if i == 0 and c
            ]
            assert renderer.tokenizer.decode(user_body) == "And of Spain?"
            assert not any(bridged.sampled_mask)


def test_bridge_tool_results(qwen3_tokenizer):
    for name, renderer in families(qwen3_tokenizer):
        if name.startswith("ultrasafe"):
            continue  # ChatML ignores tool calls: nothing to parse them back from
        history = [{"role": "user", "content": "Weather in Paris?"}]
        answer = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}
        results = [{"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
        prompt, completion = sample_turn(renderer, history, answer, TOOLS)
        bridged, reason = bridge_to_next_turn(renderer, prompt, completion, results, TOOLS, history=history)
        if bridged is None:  # the generic renderer's parse_response returns content only: no tool call
            assert name.startswith("chat_template") and "re-render failed" in reason, (name, reason)
            continue
        full = renderer.render([*history, answer, *results], TOOLS, add_generation_prompt=True)
        assert bridged.token_ids == full.token_ids, name


def test_refusals(qwen3_tokenizer):
    renderer = get_renderer("ultrasafe", qwen3_tokenizer)
    prompt, completion = sample_turn(renderer, HISTORY, ANSWER)
    cases = [
        ((prompt, completion[:-1], NEXT), "did not end with a stop token"),
        (([], completion, NEXT), "prev_prompt_ids is empty"),
        ((prompt, completion, []), "new_messages is empty"),
        ((prompt, completion, [{"role": "assistant", "content": "x"}]), "assistant message"),
    ]
    for args, reason in cases:
        result, why = bridge_to_next_turn(renderer, *args)
        assert result is None and reason in why
    # A non-canonical sampled tokenization: same text, different ids -> a full re-render would differ.
    tok = renderer.tokenizer
    odd = [i for ch in "Paris." for i in tok.encode(ch, add_special_tokens=False)] + [completion[-1]]
    assert odd != completion and tok.decode(odd) == tok.decode(completion)
    result, why = bridge_to_next_turn(renderer, prompt, odd, NEXT)
    assert result is None and "does not reproduce" in why
    # A ModelInput prompt works like its ids.
    model_input = renderer.build_generation_prompt(HISTORY)
    assert bridge_to_next_turn(renderer, model_input, completion, NEXT)[0].token_ids[: len(prompt)] == prompt
    # A history that does not render to prev_prompt_ids.
    result, why = bridge_to_next_turn(renderer, prompt, completion, NEXT, history=HISTORY[1:])
    assert result is None and "prev_prompt_ids" in why


def test_qwen3_drops_historical_reasoning_so_the_bridge_refuses():
    tok = fixture_tokenizer("Qwen--Qwen3-8B")
    names = [n for n in ("qwen3", "chat_template") if _registered(n)]
    answer = {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy."}
    for name in names:
        renderer = get_renderer(name, tok)
        prompt, completion = sample_turn(renderer, HISTORY, answer)
        assert "Easy." in tok.decode(completion)
        result, why = bridge_to_next_turn(renderer, prompt, completion, NEXT, history=HISTORY)
        # The generic renderer cannot even attribute the rewritten turn (markers and prefix-diff both fail).
        assert result is None and ("does not reproduce" in why or "no attribution" in why), (name, why)


NUMBERED = (  # each turn carries its position: the appended text depends on how long the history is
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'user' %}({{ loop.index }}) {% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_history_dependent_suffix_needs_history():
    tok = fixture_tokenizer("Qwen--Qwen2.5-7B-Instruct")
    renderer = get_renderer("chat_template", tok, chat_template=NUMBERED)
    prompt, completion = sample_turn(renderer, HISTORY, ANSWER)
    result, why = bridge_to_next_turn(renderer, prompt, completion, NEXT)
    assert result is None and "pass history=" in why
    result, why = bridge_to_next_turn(renderer, prompt, completion, NEXT, history=HISTORY)
    assert why == "ok"
    assert result.token_ids == renderer.render([*HISTORY, ANSWER, *NEXT], add_generation_prompt=True).token_ids
    assert tok.decode(result.token_ids[len(prompt) + len(completion) :]).endswith(
        "user\n(4) And of Spain?<|im_end|>\n<|im_start|>assistant\n"
    )


def _registered(name):
    try:
        canonical_name(name)
        return True
    except Exception:
        return False


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=25) | st.sampled_from(
    ["<|im_end|>", "\n", " ", "<|im_start|>user"]
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=TEXT, user=TEXT, next_user=TEXT, use_history=st.booleans(), truncate=st.booleans())
def test_property_bridge_extends_previous_tokens(qwen3_tokenizer, answer, user, next_user, use_history, truncate):
    renderer = get_renderer("ultrasafe", qwen3_tokenizer)
    history = [{"role": "user", "content": user}]
    sampled = sample_turn(renderer, history, {"role": "assistant", "content": answer})
    assume(sampled is not None)
    prompt, completion = sampled
    if truncate:
        completion = completion[:-1]
    new = [{"role": "user", "content": next_user}]
    result, why = bridge_to_next_turn(renderer, prompt, completion, new, history=history if use_history else None)
    if result is None:
        assert why != "ok"
        return
    n = len(prompt) + len(completion)
    assert result.token_ids[:n] == prompt + completion
    assert len(result.message_indices) == len(result.sampled_mask) == len(result.is_content) == len(result.token_ids)
    # Equal to the full render of what was actually sampled (a truncated completion may still end in a typed
    # "<|im_end|>": then the parsed answer is shorter).
    parsed, _ = renderer.parse_response(completion)
    full = renderer.render([*history, parsed, *new], add_generation_prompt=True)
    assert result.token_ids == full.token_ids
