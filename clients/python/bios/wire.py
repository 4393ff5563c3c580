"""Conversions between the public Python types (dicts, pydantic models, numpy) and protobuf messages.

One place for both directions, shared by the client and both servers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence  # not typing's: isinstance() against those is slower
from typing import Any, Literal

import numpy as np

from bios import types
from bios.errors import InvalidArgumentError
from bios.rendered import AttributionRun, RenderedTokens
from bios.v1 import render_pb2, train_pb2, types_pb2

# ---- tensors ---------------------------------------------------------------------------------------

_TO_PB_DTYPE: dict[np.dtype, types_pb2.DType] = {
    np.dtype("float32"): types_pb2.DTYPE_FLOAT32,
    np.dtype("float64"): types_pb2.DTYPE_FLOAT64,
    np.dtype("int32"): types_pb2.DTYPE_INT32,
    np.dtype("int64"): types_pb2.DTYPE_INT64,
    np.dtype("bool"): types_pb2.DTYPE_BOOL,
    np.dtype("float16"): types_pb2.DTYPE_FLOAT16,
}
_FROM_PB_DTYPE: dict[types_pb2.DType, np.dtype] = {v: k for k, v in _TO_PB_DTYPE.items()}
_NAMES: dict[types_pb2.DType, types.DType] = {
    types_pb2.DTYPE_FLOAT32: "float32",
    types_pb2.DTYPE_FLOAT64: "float64",
    types_pb2.DTYPE_INT32: "int32",
    types_pb2.DTYPE_INT64: "int64",
    types_pb2.DTYPE_BOOL: "bool",
    types_pb2.DTYPE_FLOAT16: "float16",
}


class WireError(InvalidArgumentError):
    """A message that cannot be decoded; the text names the field (INVALID_ARGUMENT)."""


def array_to_tensor(array: np.ndarray) -> types_pb2.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype not in _TO_PB_DTYPE:
        array = array.astype(np.float32 if array.dtype.kind == "f" else np.int64)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return types_pb2.Tensor(dtype=_TO_PB_DTYPE[array.dtype], shape=list(array.shape), data=little.tobytes())


def tensor_to_array(tensor: types_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    dtype = _FROM_PB_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"{field}.dtype: unsupported dtype {tensor.dtype}")
    count = int(np.prod(tensor.shape)) if len(tensor.shape) else 1
    if count * dtype.itemsize != len(tensor.data):
        raise WireError(f"{field}: {len(tensor.data)} bytes do not hold shape {list(tensor.shape)} of {dtype}")
    return np.frombuffer(tensor.data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(tuple(tensor.shape))


def tensor_data_to_pb(data: types.TensorData) -> types_pb2.Tensor:
    return array_to_tensor(data.to_numpy())


def tensor_data_from_pb(tensor: types_pb2.Tensor) -> types.TensorData:
    array = tensor_to_array(tensor)
    return types.TensorData(
        data=array.reshape(-1).tolist(), dtype=_NAMES.get(tensor.dtype, "float32"), shape=list(array.shape)
    )


# ---- model inputs ---------------------------------------------------------------------------------


def model_input_to_pb(model_input: types.ModelInput) -> types_pb2.ModelInput:
    chunks = []
    for chunk in model_input.chunks:
        if isinstance(chunk, types.EncodedTextChunk):
            chunks.append(types_pb2.Chunk(encoded_text=types_pb2.EncodedTextChunk(tokens=chunk.tokens)))
        else:
            chunks.append(
                types_pb2.Chunk(
                    image=types_pb2.ImageChunk(
                        data=chunk.data, format=chunk.format, expected_tokens=chunk.expected_tokens or 0
                    )
                )
            )
    return types_pb2.ModelInput(chunks=chunks)


def model_input_from_pb(pb: types_pb2.ModelInput) -> types.ModelInput:
    chunks: list[types.Chunk] = []
    for chunk in pb.chunks:
        if chunk.HasField("image"):
            chunks.append(
                types.ImageChunk(
                    data=chunk.image.data,
                    format=chunk.image.format,
                    expected_tokens=chunk.image.expected_tokens or None,
                )
            )
        else:
            chunks.append(types.EncodedTextChunk(tokens=list(chunk.encoded_text.tokens)))
    return types.ModelInput(chunks=chunks)


def datum_to_pb(datum: types.Datum) -> types_pb2.Datum:
    return types_pb2.Datum(
        model_input=model_input_to_pb(datum.model_input),
        loss_fn_inputs={k: tensor_data_to_pb(v) for k, v in datum.loss_fn_inputs.items()},
    )


def datum_from_pb(pb: types_pb2.Datum) -> types.Datum:
    return types.Datum(
        model_input=model_input_from_pb(pb.model_input),
        loss_fn_inputs={k: tensor_data_from_pb(v) for k, v in pb.loss_fn_inputs.items()},
    )


# ---- parameters -----------------------------------------------------------------------------------


def sampling_params_to_pb(params: types.SamplingParams) -> types_pb2.SamplingParams:
    stop: list[str | int] = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    pb = types_pb2.SamplingParams(
        max_tokens=params.max_tokens if params.max_tokens is not None else 0,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=[s for s in stop if isinstance(s, int)],
        stop_strings=[s for s in stop if isinstance(s, str)],
    )
    if params.seed is not None:
        pb.seed = params.seed
    return pb


def sampling_params_from_pb(pb: types_pb2.SamplingParams) -> types.SamplingParams:
    """Unset optional fields take their defaults; `stop` comes back as a list (strings, else token ids)."""
    stop: list[str] | list[int] | None = list(pb.stop_strings) or list(pb.stop_token_ids) or None
    return types.SamplingParams(
        max_tokens=pb.max_tokens or None,
        temperature=pb.temperature if pb.HasField("temperature") else 1.0,
        top_p=pb.top_p if pb.HasField("top_p") else 1.0,
        top_k=pb.top_k,
        stop=stop,
        seed=pb.seed if pb.HasField("seed") else None,
    )


def adam_params_to_pb(params: types.AdamParams) -> types_pb2.AdamParams:
    return types_pb2.AdamParams(**params.model_dump())


def adam_params_from_pb(pb: types_pb2.AdamParams) -> types.AdamParams:
    return types.AdamParams(**{name: getattr(pb, name) for name in types.AdamParams.model_fields})


def lora_config_to_pb(config: types.LoraConfig) -> types_pb2.LoraConfig:
    pb = types_pb2.LoraConfig(
        rank=config.rank,
        seed=config.seed,
        train_attn=config.train_attn,
        train_mlp=config.train_mlp,
        train_unembed=config.train_unembed,
    )
    if config.alpha is not None:
        pb.alpha = config.alpha
    return pb


def lora_config_from_pb(pb: types_pb2.LoraConfig) -> types.LoraConfig:
    """rank 0 (unset) is 32; alpha unset is None (2 * rank)."""
    return types.LoraConfig(
        rank=pb.rank or 32,
        alpha=pb.alpha if pb.HasField("alpha") else None,
        seed=pb.seed,
        train_attn=pb.train_attn,
        train_mlp=pb.train_mlp,
        train_unembed=pb.train_unembed,
    )


# ---- chat messages -------------------------------------------------------------------------------

# The builders below fill a message in place (`into`, e.g. `conversation.messages.add()`) rather than pass
# finished messages to a parent's constructor: upb copies a nested message given to a constructor, and for a
# batch of conversations those copies cost more than the building itself.


def message_to_pb(message: Mapping[str, Any], into: types_pb2.Message | None = None) -> types_pb2.Message:
    pb = types_pb2.Message() if into is None else into
    pb.role = str(message.get("role", ""))
    content = message.get("content")
    if isinstance(content, str):
        pb.content = content
    elif isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("text", ""), str):
                raise WireError(f"content[{j}]: expected {{'type': 'text', 'text': str}}")
            pb.parts.add(type=part.get("type", "text"), text=part.get("text", ""))
    elif content is not None:
        raise WireError(f"content: expected a string or a list of parts, got {type(content).__name__}")
    if message.get("tool_call_id"):
        pb.tool_call_id = message["tool_call_id"]
    if message.get("name"):
        pb.name = message["name"]
    if message.get("reasoning_content") is not None:
        pb.reasoning_content = message["reasoning_content"]
    if message.get("trainable") is not None:
        pb.trainable = bool(message["trainable"])
    for call in message.get("tool_calls") or ():
        tool_call_to_pb(call, pb.tool_calls.add())
    return pb


def tool_call_to_pb(call: Mapping[str, Any], into: types_pb2.ToolCall | None = None) -> types_pb2.ToolCall:
    pb = types_pb2.ToolCall() if into is None else into
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    pb.arguments_as_text = isinstance(arguments, str)
    pb.arguments_json = arguments if pb.arguments_as_text else json.dumps(arguments, ensure_ascii=False)
    pb.id = call.get("id") or ""
    pb.name = function.get("name", "")
    if status := call.get("status"):
        pb.status = types_pb2.ToolCallStatus.Value(f"TOOL_CALL_STATUS_{status.upper()}")
    pb.raw_text = call.get("raw_text", "")
    return pb


def tool_call_from_pb(call: types_pb2.ToolCall, field: str = "tool_call") -> dict[str, Any]:
    arguments: Any = call.arguments_json
    if not call.arguments_as_text:
        arguments = json_value(call.arguments_json, f"{field}.arguments") if call.arguments_json else {}
    out: dict[str, Any] = {"type": "function", "function": {"name": call.name, "arguments": arguments}}
    if call.id:
        out["id"] = call.id
    if call.status:
        out["status"] = types_pb2.ToolCallStatus.Name(call.status).removeprefix("TOOL_CALL_STATUS_").lower()
    if call.raw_text:
        out["raw_text"] = call.raw_text
    return out


def message_from_pb(pb: types_pb2.Message) -> dict[str, Any]:
    message: dict[str, Any] = {"role": pb.role}
    if pb.HasField("content"):
        message["content"] = pb.content
    elif pb.parts:
        for j, part in enumerate(pb.parts):
            if part.image or part.type not in ("", "text"):
                raise WireError(f"content[{j}].type: {part.type or 'image'!r} parts are not supported (text only)")
        message["content"] = [{"type": "text", "text": p.text} for p in pb.parts]
    # else no "content" key: absent (or None) on the wire; a renderer then says which message lacks it
    if pb.HasField("reasoning_content"):
        message["reasoning_content"] = pb.reasoning_content
    if pb.tool_calls:
        message["tool_calls"] = [tool_call_from_pb(c, f"tool_calls[{k}]") for k, c in enumerate(pb.tool_calls)]
    if pb.tool_call_id:
        message["tool_call_id"] = pb.tool_call_id
    if pb.name:
        message["name"] = pb.name
    if pb.HasField("trainable"):
        message["trainable"] = pb.trainable
    return message


def tool_to_pb(tool: Mapping[str, Any]) -> types_pb2.ToolSpec:
    function = tool.get("function", tool)
    return types_pb2.ToolSpec(
        name=function.get("name", ""),
        description=function.get("description", ""),
        parameters_json=json.dumps(function.get("parameters", {}), ensure_ascii=False),
        spec_json=json.dumps(tool, ensure_ascii=False),
    )


def tool_from_pb(pb: types_pb2.ToolSpec, field: str = "tool") -> dict[str, Any]:
    """The tool object (spec_json, or one built from the fields), checked: a function with a name."""
    if pb.spec_json:
        tool = json_object(pb.spec_json, f"{field}.spec_json")
        function, where = tool.get("function", tool), f"{field}.spec_json"
        if not isinstance(function, dict):
            raise WireError(f"{where}.function: expected a JSON object, got {type(function).__name__}")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise WireError(f"{where}.function.parameters: expected a JSON object")
    else:
        function = {
            "name": pb.name,
            "description": pb.description,
            "parameters": json_object(pb.parameters_json, f"{field}.parameters_json") if pb.parameters_json else {},
        }
        tool, where = {"type": "function", "function": function}, field
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise WireError(f"{where}.name: missing (a tool needs a name)")
    return tool


MAX_JSON_DEPTH = 64  # deeper JSON is refused: templates and json.dumps recurse over it


def json_value(text: str, field: str) -> Any:
    """Parsed JSON text nested at most MAX_JSON_DEPTH deep; WireError naming `field` otherwise."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise WireError(f"{field}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"{field}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    check_depth(value, field)
    return value


def json_object(text: str, field: str) -> dict[str, Any]:
    """JSON text that must hold an object (see json_value)."""
    value = json_value(text, field)
    if not isinstance(value, dict):
        raise WireError(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


def check_depth(value: Any, field: str) -> None:
    """WireError when containers nest deeper than MAX_JSON_DEPTH (iterative: no recursion to run out of)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise WireError(f"{field}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def conversation_to_pb(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping] | None = None,
    into: render_pb2.Conversation | None = None,
) -> render_pb2.Conversation:
    pb = render_pb2.Conversation() if into is None else into
    add = pb.messages.add
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidArgumentError(f"messages[{i}]: expected a mapping, got {type(message).__name__}")
        try:
            message_to_pb(message, add())
        except WireError as exc:
            raise InvalidArgumentError(f"messages[{i}].{exc}") from None
    pb.tools.extend(tool_to_pb(t) for t in tools or ())
    return pb


# ---- results --------------------------------------------------------------------------------------


def checkpoint_to_pb(checkpoint: types.Checkpoint) -> train_pb2.Checkpoint:
    return train_pb2.Checkpoint(
        **checkpoint.model_dump(exclude={"metadata"}), metadata_json=json.dumps(checkpoint.metadata)
    )


def checkpoint_from_pb(pb: train_pb2.Checkpoint) -> types.Checkpoint:
    return types.Checkpoint(
        id=pb.id,
        path=pb.path,
        kind=pb.kind,
        name=pb.name,
        model_id=pb.model_id,
        base_model=pb.base_model,
        step=pb.step,
        metadata=json.loads(pb.metadata_json) if pb.metadata_json else {},
        size_bytes=pb.size_bytes,
        created_unix_ms=pb.created_unix_ms,
    )


_STOP_REASONS: dict[train_pb2.StopReason, Literal["stop", "length"]] = {
    train_pb2.STOP_REASON_STOP: "stop",
    train_pb2.STOP_REASON_LENGTH: "length",
}
_TO_PB_STOP_REASONS = {v: k for k, v in _STOP_REASONS.items()}


def sample_response_to_pb(response: types.SampleResponse) -> train_pb2.SampleResponse:
    """An unscored prompt position (None) travels as NaN."""
    sequences = [
        train_pb2.SampledSequence(
            tokens=s.tokens, logprobs=s.logprobs or [], stop_reason=_TO_PB_STOP_REASONS[s.stop_reason]
        )
        for s in response.sequences
    ]
    prompt = [float("nan") if x is None else x for x in response.prompt_logprobs or []]
    return train_pb2.SampleResponse(sequences=sequences, prompt_logprobs=prompt)


def sample_response_from_pb(pb: train_pb2.SampleResponse) -> types.SampleResponse:
    sequences = [
        types.SampledSequence(
            tokens=list(s.tokens),
            logprobs=list(s.logprobs) or None,
            stop_reason=_STOP_REASONS.get(s.stop_reason, "length"),
        )
        for s in pb.sequences
    ]
    prompt = [None if np.isnan(x) else x for x in pb.prompt_logprobs] or None
    return types.SampleResponse(sequences=sequences, prompt_logprobs=prompt)


def forward_backward_to_pb(output: types.ForwardBackwardOutput) -> train_pb2.ForwardBackwardOutput:
    return train_pb2.ForwardBackwardOutput(
        loss_fn_outputs=[
            train_pb2.LossFnOutput(tensors={k: tensor_data_to_pb(v) for k, v in out.items()})
            for out in output.loss_fn_outputs
        ],
        metrics=output.metrics,
    )


def forward_backward_from_pb(pb: train_pb2.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_outputs=[{k: tensor_data_from_pb(v) for k, v in out.tensors.items()} for out in pb.loss_fn_outputs],
        metrics=dict(pb.metrics),
    )


def optim_step_response_to_pb(response: types.OptimStepResponse) -> train_pb2.OptimStepResponse:
    return train_pb2.OptimStepResponse(metrics=response.metrics, step=response.step)


def optim_step_response_from_pb(pb: train_pb2.OptimStepResponse) -> types.OptimStepResponse:
    return types.OptimStepResponse(metrics=dict(pb.metrics), step=pb.step)


def model_info_to_pb(info: types.ModelInfo) -> train_pb2.ModelInfo:
    return train_pb2.ModelInfo(**info.model_dump())


def model_info_from_pb(pb: train_pb2.ModelInfo) -> types.ModelInfo:
    return types.ModelInfo(
        **{f.name: getattr(pb, f.name) for f in pb.DESCRIPTOR.fields if f.name in types.ModelInfo.model_fields}
    )


# ---- rendered tokens ------------------------------------------------------------------------------


def rendered_to_pb(
    rendered: RenderedTokens, into: render_pb2.RenderedTokens | None = None
) -> render_pb2.RenderedTokens:
    pb = render_pb2.RenderedTokens() if into is None else into
    runs = rendered.runs
    roles = [""] * (max((run.message_index for run in runs), default=-1) + 1)
    for run in runs:
        if run.message_index >= 0:
            roles[run.message_index] = run.role or ""
    pb.token_ids.extend(rendered.token_ids)
    pb.roles.extend(roles)
    if runs:
        lengths, indices, _roles, sampled, content = zip(*runs)
        pb.run_lengths.extend(lengths)
        pb.run_message_indices.extend(indices)
        pb.run_sampled.extend(sampled)
        pb.run_is_content.extend(content)
    return pb


def _runs_from_pb(pb: render_pb2.RenderedTokens) -> list[AttributionRun]:
    roles = list(pb.roles)
    columns = (pb.run_lengths, pb.run_message_indices, pb.run_sampled, pb.run_is_content)
    if len({len(c) for c in columns}) != 1:
        raise WireError(f"run_*: the columns differ in length ({', '.join(str(len(c)) for c in columns)})")
    runs = []
    for k, (n, index, sampled, content) in enumerate(zip(*columns)):
        if n < 0 or not -1 <= index < len(roles):
            raise WireError(f"runs[{k}]: length {n} or message_index {index} out of range")
        runs.append(AttributionRun(n, index, roles[index] or None if index >= 0 else None, sampled, content))
    if sum(pb.run_lengths) != len(pb.token_ids):
        raise WireError(f"run_lengths: cover {sum(pb.run_lengths)} tokens, not the {len(pb.token_ids)} token ids")
    return runs


def rendered_from_pb(pb: render_pb2.RenderedTokens) -> RenderedTokens:
    return RenderedTokens.from_runs(list(pb.token_ids), _runs_from_pb(pb))


def supervised_from_pb(pb: render_pb2.SupervisedExample) -> tuple[types.Tokens, list[float]]:
    """(token ids, one loss weight per token) of a SupervisedExample."""
    tokens = pb.tokens
    ids, lengths, run_weights = tokens.token_ids[:], tokens.run_lengths[:], pb.run_weights[:]  # [:] beats list()
    if len(run_weights) != len(lengths):
        raise WireError(f"run_weights: {len(run_weights)} weights for {len(lengths)} runs")
    if sum(lengths) != len(ids):
        raise WireError(f"tokens.run_lengths: cover {sum(lengths)} tokens, not the {len(ids)} token ids")
    weights: list[float] = []
    for n, weight in zip(lengths, run_weights):
        weights += [weight] * n
    return types.Tokens(ids), weights
