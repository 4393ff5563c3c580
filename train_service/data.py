"""A forward / forward_backward request's data -> validated rows, within the engine's limits."""

from __future__ import annotations

import numpy as np

from bios import wire
from bios.errors import InvalidArgumentError, ResourceExhaustedError
from bios.v1 import types_pb2
from train_service.passes import Rows
from train_service.scheduler import Limits


def _integer_ids(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise InvalidArgumentError(f"{field}: token ids must be integers")
    elif array.dtype.kind not in "iu":
        raise InvalidArgumentError(f"{field}: token ids must be integers, got {array.dtype}")
    return array.astype(np.int64)


def decode_data(
    data: list[types_pb2.Datum], vocab_size: int, needed: tuple[str, ...], max_context: int, limits: Limits
) -> Rows:
    """Validate a request's data; every error names the datum and the field, or the limit."""
    if not data:
        raise InvalidArgumentError("data: empty batch")
    longest = min(max_context, limits.max_pass_tokens)
    ids_list, targets_list, inputs_list, total = [], [], [], 0
    for i, datum in enumerate(data):
        where = f"data[{i}]"
        ids: list[int] = []
        for chunk in datum.model_input.chunks:
            if not chunk.HasField("encoded_text"):
                raise InvalidArgumentError(f"{where}.model_input: image chunks are not supported by this model")
            ids += chunk.encoded_text.tokens
        n = len(ids)
        if n == 0:
            raise InvalidArgumentError(f"{where}.model_input: no tokens")
        if n > max_context:
            raise InvalidArgumentError(f"{where}.model_input: {n} tokens exceed the model context ({max_context})")
        if n > longest:
            raise ResourceExhaustedError(f"{where}.model_input: {n} tokens exceed max_pass_tokens ({longest})")
        total += n
        if total > limits.max_request_tokens:
            raise ResourceExhaustedError(
                f"data: more than max_request_tokens ({limits.max_request_tokens}) tokens "
                "in one request; split it into several requests"
            )
        array = np.asarray(ids, dtype=np.int64)
        if array.min() < 0 or array.max() >= vocab_size:
            bad = int(array.max() if array.max() >= vocab_size else array.min())
            raise InvalidArgumentError(
                f"{where}.model_input: token id {bad} is outside the vocabulary [0, {vocab_size})"
            )
        fields = {}
        for key in ("target_tokens", *needed):
            if key not in datum.loss_fn_inputs:
                raise InvalidArgumentError(f"{where}.loss_fn_inputs: missing {key!r}")
            name = f"{where}.loss_fn_inputs[{key!r}]"
            value = wire.tensor_to_array(datum.loss_fn_inputs[key], name).reshape(-1)
            if len(value) != n:
                raise InvalidArgumentError(f"{name}: length {len(value)} differs from model_input length {n}")
            if key != "target_tokens" and not np.isfinite(value).all():
                raise InvalidArgumentError(f"{name}: contains NaN or infinity")
            fields[key] = value
        targets = _integer_ids(fields.pop("target_tokens"), f"{where}.loss_fn_inputs['target_tokens']")
        if targets.min() < 0 or targets.max() >= vocab_size:
            raise InvalidArgumentError(
                f"{where}.loss_fn_inputs['target_tokens']: token id outside the vocabulary [0, {vocab_size})"
            )
        ids_list.append(array)
        targets_list.append(targets)
        inputs_list.append({k: v.astype(np.float32) for k, v in fields.items()})
    return Rows(ids_list, targets_list, inputs_list)
