"""Tinker wire types <-> bios protobuf messages.

Tinker's own generated protobuf module (`tinker.proto.tinker_public_pb2`) and pydantic types are the
Tinker side; `bios.v1` is ours. Tensors travel as raw little-endian bytes on both sides, so a datum's
tokens and loss inputs are copied, never re-encoded element by element.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import grpc
import numpy as np
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as tpb

from bios import types
from bios import wire as bios_wire
from bios.v1 import train_pb2, types_pb2
from train_service import checkpoint_layout as layout

USER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ALREADY_EXISTS,
}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    # a request over an engine limit is permanent: 429 would make the SDK retry it for minutes
    grpc.StatusCode.RESOURCE_EXHAUSTED: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class GatewayError(Exception):
    """A request the gateway answers with an HTTP error; the message names the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> GatewayError:
    return GatewayError(400, message)


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)


def category(code: grpc.StatusCode) -> str:
    """Tinker's RequestErrorCategory of a failed operation."""
    return tt.RequestErrorCategory.User.value if code in USER_CODES else tt.RequestErrorCategory.Server.value


# ---- checkpoint paths: tinker://<run>/weights/<name> <-> bios://<model_id>/state/<name> -------------

_KINDS = {"weights": layout.STATE, "sampler_weights": layout.SAMPLER}
_SEGMENTS = {v: k for k, v in _KINDS.items()}
CHECKPOINT_TYPES: dict[str, Literal["training", "sampler"]] = {layout.STATE: "training", layout.SAMPLER: "sampler"}


def to_bios_path(path: str, field: str = "path") -> str:
    """tinker://<model_id>/weights/<name> -> bios://<model_id>/state/<name> (and sampler_weights/sampler)."""
    parts = path[len("tinker://") :].split("/") if isinstance(path, str) and path.startswith("tinker://") else []
    if len(parts) != 3 or parts[1] not in _KINDS or not parts[0] or not parts[2]:
        raise bad(
            f"{field}: {path!r} is not a checkpoint path (tinker://<run_id>/weights/<name> or "
            "tinker://<run_id>/sampler_weights/<name>)"
        )
    return layout.path(parts[0], _KINDS[parts[1]], parts[2])


def to_tinker_path(path: str) -> str:
    model_id, kind, name = layout.split(path)
    return f"tinker://{model_id}/{_SEGMENTS[kind]}/{name}"


def checkpoint_id(checkpoint: train_pb2.Checkpoint) -> str:
    return f"{_SEGMENTS[checkpoint.kind]}/{checkpoint.name}"


# ---- forward / forward_backward ------------------------------------------------------------------

_DTYPES = {
    tpb.DTYPE_FLOAT32: (types_pb2.DTYPE_FLOAT32, 4),
    tpb.DTYPE_INT64: (types_pb2.DTYPE_INT64, 8),
    tpb.DTYPE_INT32: (types_pb2.DTYPE_INT32, 4),
}
# Tinker's loss_fn_config keys and defaults (clip thresholds are ratios) -> ours (distances from 1).
_CLIP_DEFAULTS = {"ppo": (0.8, 1.2), "gspo": (0.8, 1.2), "cispo": (0.0, 4.0)}
_CONFIG_KEYS = {
    "cross_entropy": (),
    "importance_sampling": (),
    "dro": ("beta",),
    **{name: ("clip_low_threshold", "clip_high_threshold") for name in _CLIP_DEFAULTS},
}
_REFUSED_LOSSES = {
    "stable_reinforce": "stable_reinforce is not supported by bios: its objective uses sampling-time stability "
    "records that Tinker keeps server-side and does not specify; use importance_sampling, ppo, "
    "cispo, gspo or dro",
    "custom": "server-side custom losses are not supported; forward_backward_custom runs them on the client",
}
_PER_TOKEN_CLIPS = ("clip_low_threshold", "clip_high_threshold")


def _tensor(t: tpb.Tensor, field: str) -> types_pb2.Tensor:
    if t.WhichOneof("encoding") == "sparse_csr":
        raise bad(f"{field}: sparse (2-D) loss inputs are not supported; send one value per token")
    if t.dtype not in _DTYPES:
        raise bad(f"{field}.dtype: {tpb.DType.Name(t.dtype)} is not supported (float32, int64 or int32)")
    if len(t.shape) > 1:
        raise bad(f"{field}: shape {list(t.shape)}: only 1-D loss inputs (one value per token) are supported")
    dtype, size = _DTYPES[t.dtype]
    if len(t.shape) == 1 and t.shape[0] * size != len(t.dense):
        raise bad(f"{field}: {len(t.dense)} bytes do not hold shape {list(t.shape)}")
    if len(t.dense) % size:
        raise bad(f"{field}: {len(t.dense)} bytes are not a whole number of {size}-byte values")
    return types_pb2.Tensor(dtype=dtype, shape=[len(t.dense) // size], data=t.dense)


def _tokens(raw: bytes, field: str) -> np.ndarray:
    if len(raw) % 4:
        raise bad(f"{field}.tokens: {len(raw)} bytes are not int32 token ids")
    return np.frombuffer(raw, dtype="<i4")


def _datum(d: tpb.Datum, i: int) -> types_pb2.Datum:
    out = types_pb2.Datum()
    for j, chunk in enumerate(d.model_input):
        kind, where = chunk.WhichOneof("chunk"), f"data[{i}].model_input[{j}]"
        if kind == "encoded_text":
            out.model_input.chunks.add().encoded_text.tokens.extend(_tokens(chunk.encoded_text.tokens, where).tolist())
        elif kind == "image":
            image = out.model_input.chunks.add().image
            image.data, image.format = chunk.image.data, chunk.image.format
            image.expected_tokens = chunk.image.expected_tokens
        else:
            raise bad(f"{where}: {kind or 'empty'} chunks are not supported")
    for name, tensor in d.loss_fn_inputs.items():
        field = f"data[{i}].loss_fn_inputs[{name!r}]"
        if name in _PER_TOKEN_CLIPS:
            raise bad(f"{field}: per-token clip thresholds are not supported; pass {name} in loss_fn_config")
        out.loss_fn_inputs[name].CopyFrom(_tensor(tensor, field))
    return out


def _loss_config(loss_fn: str, msg: tpb.ForwardBackwardRequest) -> dict[str, float]:
    config: dict[str, Any] = dict(msg.loss_fn_config)
    for key, value in msg.loss_fn_config_v2.items():  # the SDK writes both maps; v2 wins and can hold text
        config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    unknown = sorted(set(config) - set(_CONFIG_KEYS[loss_fn]))
    if unknown:
        raise bad(
            f"loss_fn_config: {loss_fn} takes {', '.join(_CONFIG_KEYS[loss_fn]) or 'no keys'}; got {', '.join(unknown)}"
        )
    for key, value in config.items():
        if not isinstance(value, float) or not math.isfinite(value):
            raise bad(f"loss_fn_config[{key!r}]: must be a finite number, got {value!r}")
    if loss_fn not in _CLIP_DEFAULTS:
        return config
    default_low, default_high = _CLIP_DEFAULTS[loss_fn]
    low, high = config.get("clip_low_threshold", default_low), config.get("clip_high_threshold", default_high)
    if not 0 <= low <= 1 <= high:
        raise bad(f"loss_fn_config: need 0 <= clip_low_threshold <= 1 <= clip_high_threshold, got {low} and {high}")
    return {"clip_epsilon_low": 1.0 - low, "clip_epsilon_high": high - 1.0}


def forward_backward_input(msg: tpb.ForwardBackwardRequest) -> train_pb2.ForwardBackwardInput:
    """A Tinker forward_backward / forward request -> our ForwardBackwardInput (validated here; the engine
    checks tokens against the model)."""
    loss_fn = msg.loss_fn
    if loss_fn in _REFUSED_LOSSES:
        raise bad(f"loss_fn: {_REFUSED_LOSSES[loss_fn]}")
    if loss_fn not in _CONFIG_KEYS:
        raise bad(f"loss_fn: unknown loss {loss_fn!r}; expected one of {', '.join(_CONFIG_KEYS)}")
    if not msg.data:
        raise bad("data: empty batch")
    data = [_datum(d, i) for i, d in enumerate(msg.data)]
    if loss_fn == "gspo":
        for datum in data:
            _default_ratio_mask(datum)
    return train_pb2.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=_loss_config(loss_fn, msg))


def _default_ratio_mask(datum: types_pb2.Datum) -> None:
    """gspo's sequence ratio runs over `sequence_ratio_mask`; without one, over the tokens that carry an
    advantage (the sampled ones: prompt tokens have none)."""
    inputs = datum.loss_fn_inputs
    if "sequence_ratio_mask" in inputs or "advantages" not in inputs:
        return  # a missing advantages is refused, naming the datum, by the train service
    advantages = inputs["advantages"]
    dtype = (
        "<f4"
        if advantages.dtype == types_pb2.DTYPE_FLOAT32
        else "<i8"
        if advantages.dtype == types_pb2.DTYPE_INT64
        else "<i4"
    )
    mask = (np.frombuffer(advantages.data, dtype) != 0).astype("<f4")
    inputs["sequence_ratio_mask"].CopyFrom(
        types_pb2.Tensor(dtype=types_pb2.DTYPE_FLOAT32, shape=[len(mask)], data=mask.tobytes())
    )


def forward_backward_output(out: train_pb2.ForwardBackwardOutput) -> bytes:
    """Our output -> Tinker's proto ForwardBackwardOutput: one ArrayRecord, each field one batched tensor."""
    record = tpb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(out.loss_fn_outputs))
    names = out.loss_fn_outputs[0].tensors.keys() if out.loss_fn_outputs else ()
    for name in names:
        chunks = [o.tensors[name].data for o in out.loss_fn_outputs]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype("<i8")
        record.fields[name].CopyFrom(
            tpb.BatchedTensor(data=b"".join(chunks), offsets=offsets.tobytes(), dtype=tpb.DTYPE_FLOAT32)
        )
    # Tinker metric keys are name:reduction; ours already are (loss:sum, tokens:sum).
    reply = tpb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", metrics=dict(out.metrics))
    reply.loss_fn_outputs.append(record)
    return reply.SerializeToString()


# ---- optimizer -----------------------------------------------------------------------------------


def adam_params(params: Any) -> types_pb2.AdamParams:
    if not isinstance(params, tt.AdamParams):
        raise bad(f"optim_params: only Adam is supported, got {getattr(params, 'type', type(params).__name__)}")
    return bios_wire.adam_params_to_pb(
        types.AdamParams(
            learning_rate=params.learning_rate,
            beta1=params.beta1,
            beta2=params.beta2,
            eps=params.eps,
            weight_decay=params.weight_decay,
            grad_clip_norm=params.grad_clip_norm,
        )
    )


def optim_step_metrics(response: train_pb2.OptimStepResponse) -> dict[str, float]:
    """Ours (grad_norm, learning_rate, step) under Tinker's name:reduction keys."""
    reductions = {"step": "max"}
    return {f"{key}:{reductions.get(key, 'mean')}": value for key, value in response.metrics.items()}


# ---- sampling ------------------------------------------------------------------------------------


def model_input(prompt: tt.ModelInput, field: str = "prompt") -> types_pb2.ModelInput:
    out = types_pb2.ModelInput()
    for j, chunk in enumerate(prompt.chunks):
        if isinstance(chunk, tt.EncodedTextChunk):
            out.chunks.add().encoded_text.tokens.extend(chunk.tokens)
        elif isinstance(chunk, tt.ImageChunk):
            image = out.chunks.add().image
            image.data, image.format, image.expected_tokens = chunk.data, chunk.format, chunk.expected_tokens or 0
        else:
            raise bad(f"{field}.chunks[{j}]: {getattr(chunk, 'type', type(chunk).__name__)} chunks are not supported")
    return out


def sampling_params(params: tt.SamplingParams, eos_token_ids: list[int]) -> types_pb2.SamplingParams:
    """Tinker's `stop=None` stops at the end-of-sequence tokens, `stop=[]` runs to max_tokens."""
    if params.max_tokens is None:
        raise bad("sampling_params.max_tokens: required")
    stop = params.stop
    stops: list[Any] = list(eos_token_ids) if stop is None else [stop] if isinstance(stop, str) else list(stop)
    out = types_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=max(params.top_k, 0),
        stop_token_ids=[s for s in stops if isinstance(s, int)],
        stop_strings=[s for s in stops if isinstance(s, str)],
    )
    if params.seed is not None:
        out.seed = params.seed
    return out


def check_sample_request(request: tt.SampleRequest) -> None:
    unsupported = {
        "topk_prompt_logprobs": request.topk_prompt_logprobs,
        "topk_sample_logprobs": request.topk_sample_logprobs,
        "prompt_alt_tokens_k": request.prompt_alt_tokens_k,
        "target_prompt_logprobs": request.target_prompt_logprobs is not None,
    }
    for field, value in unsupported.items():
        if value:
            raise bad(f"{field}: not supported by bios")
    last_n = request.prompt_logprobs_last_n
    if last_n is not None and not (request.prompt_logprobs and 1 <= last_n < request.prompt.length):
        raise bad(f"prompt_logprobs_last_n: needs prompt_logprobs and 1 <= N < len(prompt), got {last_n}")


_STOP = {train_pb2.STOP_REASON_STOP: tpb.STOP_REASON_STOP, train_pb2.STOP_REASON_LENGTH: tpb.STOP_REASON_LENGTH}


def sample_response(result: train_pb2.SampleResponse, prompt_logprobs_last_n: int | None) -> bytes:
    reply = tpb.SampleResponse()
    for s in result.sequences:
        reply.sequences.add(
            stop_reason=_STOP.get(s.stop_reason, tpb.STOP_REASON_LENGTH),
            tokens=np.asarray(s.tokens, "<i4").tobytes(),
            logprobs=np.asarray(s.logprobs, "<f4").tobytes(),
        )
    if result.prompt_logprobs:
        logprobs = np.asarray(result.prompt_logprobs, "<f4")
        if prompt_logprobs_last_n is not None:  # earlier positions unscored, as Tinker answers them
            logprobs[: len(logprobs) - prompt_logprobs_last_n] = np.nan
        reply.prompt_logprobs = logprobs.tobytes()
    return reply.SerializeToString()
