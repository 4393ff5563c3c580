"""Chat JSONL -> Datum: seed 004's shape, streaming, and line-numbered errors."""

from __future__ import annotations

import io
import json

import pytest

from bios.types import Datum
from render_service.datasets import batched, datum_from_conversation, iter_jsonl_data
from render_service.renderers import get_renderer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
CONV2 = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.fixture(scope="module")
def renderer(qwen3_tokenizer):
    return get_renderer("ultrasafe", qwen3_tokenizer)


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def expected_datum(renderer, messages, train_on_what="last_assistant_message"):
    tokens, weights = renderer.build_supervised_example(messages, train_on_what)
    return list(tokens[:-1]), list(tokens[1:]), list(weights[1:])


def unpack(datum: Datum):
    return (
        datum.model_input.to_ints(),
        list(datum.loss_fn_inputs["target_tokens"].data),
        list(datum.loss_fn_inputs["weights"].data),
    )


def test_seed_shape_and_blank_lines(tmp_path, renderer):
    path = write(tmp_path, [json.dumps({"messages": CONV}), "", "   ", json.dumps({"messages": CONV2})])
    data = list(iter_jsonl_data(path, renderer))
    assert len(data) == 2 and all(isinstance(d, Datum) for d in data)
    assert unpack(data[0]) == expected_datum(renderer, CONV)
    assert unpack(data[1]) == expected_datum(renderer, CONV2)
    inputs, targets, weights = unpack(data[0])
    assert len(inputs) == len(targets) == len(weights) and inputs[1:] == targets[:-1]
    assert data[0].loss_fn_inputs["target_tokens"].dtype == "int64"
    assert data[0].loss_fn_inputs["weights"].dtype == "float32"
    decoded = renderer.tokenizer.decode([t for t, w in zip(targets, weights) if w])
    assert decoded == "Paris.<|im_end|>"


def test_tools_render_with_a_family_that_has_them_and_are_refused_by_one_that_has_not(
    tmp_path, renderer, qwen3_tokenizer
):
    path = write(tmp_path, [json.dumps({"messages": CONV}), json.dumps({"messages": CONV2, "tools": TOOLS})])
    qwen3 = get_renderer("qwen3", qwen3_tokenizer)
    data = list(iter_jsonl_data(path, qwen3))
    tokens, weights = qwen3.build_supervised_example(CONV2, tools=TOOLS)
    assert unpack(data[1]) == (list(tokens[:-1]), list(tokens[1:]), list(weights[1:]))
    assert unpack(data[1]) != expected_datum(qwen3, CONV2)  # the tools are in the prompt
    with pytest.raises(ValueError, match=r"line 2: field tools: the ultrasafe renderer cannot represent tools"):
        list(iter_jsonl_data(path, renderer))


def test_train_on_what_and_max_length(tmp_path, renderer):
    path = write(tmp_path, [json.dumps({"messages": CONV2})])
    (datum,) = iter_jsonl_data(path, renderer, train_on_what="all_assistant_messages")
    assert unpack(datum) == expected_datum(renderer, CONV2, "all_assistant_messages")
    (short,) = iter_jsonl_data(path, renderer, max_length=8)
    assert len(short.model_input.to_ints()) == 7 and unpack(short)[0] == unpack(datum)[0][:7]
    with pytest.raises(ValueError, match="train_on_what"):
        next(iter_jsonl_data(path, renderer, train_on_what="everything"))


def test_file_objects_text_and_binary(renderer):
    text = json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": CONV2}) + "\n"
    from_text = [unpack(d) for d in iter_jsonl_data(io.StringIO(text), renderer)]
    from_bytes = [unpack(d) for d in iter_jsonl_data(io.BytesIO(text.encode()), renderer)]
    assert from_text == from_bytes == [expected_datum(renderer, CONV), expected_datum(renderer, CONV2)]


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"messages": [', r"line 3: invalid JSON"),
        ("[1, 2]", r"line 3: expected a JSON object"),
        ('{"conversation": []}', r"line 3: field 'messages' is missing"),
        ('{"messages": "hi"}', r"line 3: field 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}', r"line 3: field 'tools'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"line 3: field messages\[0\]\.role: unknown role"),
        ('{"messages": [{"role": "user", "content": 5}]}', r"line 3: field messages\[0\]\.content"),
    ],
)
def test_bad_lines_name_line_and_field(tmp_path, renderer, line, match):
    path = write(tmp_path, [json.dumps({"messages": CONV}), "", line, json.dumps({"messages": CONV})])
    stream = iter_jsonl_data(path, renderer)
    assert unpack(next(stream)) == expected_datum(renderer, CONV)  # lines before the bad one still stream
    with pytest.raises(ValueError, match=match) as info:
        next(stream)
    assert str(path) in str(info.value)


def test_invalid_utf8_names_the_line(renderer):
    data = json.dumps({"messages": CONV}).encode() + b"\n" + b'{"messages": "\xff"}\n'
    stream = iter_jsonl_data(io.BytesIO(data), renderer)
    next(stream)
    with pytest.raises(ValueError, match="line 2: not valid UTF-8"):
        next(stream)


class CountingFile(io.RawIOBase):
    """An endless JSONL source that counts how many lines were read: streaming must read lazily."""

    def __init__(self):
        self.lines_read = 0
        self.line = (json.dumps({"messages": CONV}) + "\n").encode()

    def readline(self, size=-1):
        self.lines_read += 1
        return self.line


def test_streams_lazily_from_an_unbounded_source(renderer):
    source = CountingFile()
    stream = iter_jsonl_data(source, renderer)
    first = [next(stream) for _ in range(3)]
    assert len(first) == 3 and source.lines_read == 3
    batches = batched(stream, 2)
    assert [len(b) for b in (next(batches), next(batches))] == [2, 2] and source.lines_read == 7


def test_batched():
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched([], 3)) == []
    with pytest.raises(ValueError):
        list(batched([1], 0))


def test_datum_from_conversation_too_short(renderer):
    with pytest.raises(ValueError, match="at least 2"):
        datum_from_conversation(renderer, CONV, max_length=1)
