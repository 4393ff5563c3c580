"""bios.wire: every conversion that has both directions round-trips (to_pb -> from_pb == the original).

Proto `float` fields are 32-bit, so the float values here are exactly representable in float32.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from bios import types, wire
from bios.v1 import types_pb2


def test_lora_config_round_trips():
    for config in (
        types.LoraConfig(),
        types.LoraConfig(rank=8, alpha=16.0, seed=7, train_attn=False, train_mlp=True, train_unembed=True),
    ):
        assert wire.lora_config_from_pb(wire.lora_config_to_pb(config)) == config
    assert wire.lora_config_from_pb(types_pb2.LoraConfig()).rank == 32  # 0 on the wire means the default


def test_adam_params_round_trip():
    for params in (
        types.AdamParams(learning_rate=0.0625, beta1=0.875, beta2=0.9375, eps=2.0**-40),
        types.AdamParams(learning_rate=0.5, beta1=0.5, beta2=0.75, eps=0.125, weight_decay=0.25, grad_clip_norm=1.0),
    ):
        assert wire.adam_params_from_pb(wire.adam_params_to_pb(params)) == params


def test_sampling_params_round_trip():
    for params in (
        types.SamplingParams(),
        types.SamplingParams(max_tokens=9, temperature=0.0, top_p=0.5, top_k=4, stop=["\n\n", "END"], seed=3),
        types.SamplingParams(max_tokens=1, stop=[2, 5]),
    ):
        assert wire.sampling_params_from_pb(wire.sampling_params_to_pb(params)) == params
    # a single stop string comes back as the one-element list it means
    assert wire.sampling_params_from_pb(wire.sampling_params_to_pb(types.SamplingParams(stop="x"))).stop == ["x"]


def _tensor_data(dtype: str) -> types.TensorData:
    values = {"bool": [True, False, True, True, False, False]}.get(dtype, [0, 1, -2, 3, 65504, 5])
    if dtype.startswith("float"):
        values = [0.5, -1.25, 3.0, 65504.0, 2.0**-14, -0.0]
    return types.TensorData(data=values, dtype=dtype, shape=[2, 3])


@pytest.mark.parametrize("dtype", ["int64", "int32", "float32", "float64", "bool", "float16"])
def test_tensor_data_round_trips_dtype_and_values(dtype):
    data = _tensor_data(dtype)
    back = wire.tensor_data_from_pb(wire.tensor_data_to_pb(data))
    assert back == data
    assert back.to_numpy().dtype == data.to_numpy().dtype


def test_float16_keeps_its_dtype_and_exact_values():
    array = np.array([[0.1, -3.5e-5, 65504.0], [np.inf, -0.0, 1.0 / 3.0]], dtype=np.float16)
    pb = wire.array_to_tensor(array)
    assert pb.dtype == types_pb2.DTYPE_FLOAT16 and pb.data == array.astype("<f2").tobytes()
    back = wire.tensor_to_array(pb)
    assert back.dtype == np.float16 and back.tobytes() == array.tobytes()
    data = types.TensorData.from_numpy(array)
    assert data.dtype == "float16"
    again = wire.tensor_data_from_pb(wire.tensor_data_to_pb(data))
    assert again.dtype == "float16" and again.to_numpy().tobytes() == array.tobytes()


def test_datum_round_trips():
    datum = types.Datum(
        model_input=types.ModelInput(
            chunks=[
                types.EncodedTextChunk(tokens=[1, 2, 3]),
                types.ImageChunk(data=b"\x89PNG", format="png", expected_tokens=4),
                types.EncodedTextChunk(tokens=[4]),
            ]
        ),
        loss_fn_inputs={
            "target_tokens": [2, 3, 4, 5, 6, 7, 8, 9],
            "weights": types.TensorData(data=[0.0, 1.0] * 4, dtype="float32", shape=[8]),
        },
    )
    assert wire.datum_from_pb(wire.datum_to_pb(datum)) == datum


def test_model_input_round_trips():
    model_input = types.ModelInput(
        chunks=[types.ImageChunk(data=b"x", format="jpeg"), types.EncodedTextChunk(tokens=[9, 8])]
    )
    assert wire.model_input_from_pb(wire.model_input_to_pb(model_input)) == model_input


def test_checkpoint_round_trips():
    checkpoint = types.Checkpoint(
        id="bios://model-1/state/a",
        path="bios://model-1/state/a",
        kind="state",
        name="a",
        model_id="model-1",
        base_model="ultrasafe/usf-mini",
        step=3,
        metadata={"epoch": 1, "tags": ["x"]},
        size_bytes=123,
        created_unix_ms=456,
    )
    assert wire.checkpoint_from_pb(wire.checkpoint_to_pb(checkpoint)) == checkpoint


def test_model_info_round_trips():
    info = types.ModelInfo(
        model_id="model-1",
        base_model="b",
        lora_rank=8,
        step=2,
        tokenizer="t",
        renderer="r",
        vocab_size=100,
        device="cpu",
        dtype="float32",
        max_request_tokens=10,
        max_pass_tokens=5,
        max_context=64,
        device_memory_allocated_bytes=7,
        device_memory_peak_bytes=8,
        lora_parameters=9,
    )
    assert wire.model_info_from_pb(wire.model_info_to_pb(info)) == info


def test_results_round_trip():
    sample = types.SampleResponse(
        sequences=[
            types.SampledSequence(tokens=[1, 2], logprobs=[-0.5, -0.25], stop_reason="stop"),
            types.SampledSequence(tokens=[3], stop_reason="length"),
        ],
        prompt_logprobs=[None, -1.5, -0.125],
    )
    assert wire.sample_response_from_pb(wire.sample_response_to_pb(sample)) == sample
    assert math.isnan(wire.sample_response_to_pb(sample).prompt_logprobs[0])
    plain = types.SampleResponse(sequences=[types.SampledSequence(tokens=[4], stop_reason="length")])
    assert wire.sample_response_from_pb(wire.sample_response_to_pb(plain)) == plain

    output = types.ForwardBackwardOutput(
        loss_fn_outputs=[{"logprobs": types.TensorData(data=[-0.5, -2.0], dtype="float32", shape=[2])}],
        metrics={"loss:sum": 2.5, "tokens:sum": 2.0},
    )
    assert wire.forward_backward_from_pb(wire.forward_backward_to_pb(output)) == output

    step = types.OptimStepResponse(metrics={"grad_norm": 0.75}, step=4)
    assert wire.optim_step_response_from_pb(wire.optim_step_response_to_pb(step)) == step


def test_messages_round_trip():
    message = {
        "role": "assistant",
        "content": "hi",
        "reasoning_content": "think",
        "trainable": True,
        "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": {"x": 1}}}],
    }
    assert wire.message_from_pb(wire.message_to_pb(message)) == message
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    assert wire.tool_from_pb(wire.tool_to_pb(tool)) == tool


def test_wire_imports_no_torch_transformers_or_service():
    probe = (
        "import sys, bios.wire; bad = [m for m in ('torch', 'transformers', 'peft', 'train_service', "
        "'render_service', 'tinker_gateway', 'bios_server') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
