"""Public value types of the bios API (pydantic models; no torch needed)."""

from __future__ import annotations

from typing import Any, Literal, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

_NUMPY_DTYPES = {
    "int64": np.int64,
    "int32": np.int32,
    "float32": np.float32,
    "float64": np.float64,
    "bool": np.bool_,
    "float16": np.float16,
}


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def __str__(self) -> str:  # print() shows the same `ModelInput(chunks=[...])` form as repr()
        return repr(self)


class EncodedTextChunk(_Base):
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


class ImageChunk(_Base):
    data: bytes
    format: str
    expected_tokens: int | None = None
    type: Literal["image"] = "image"

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise ValueError("ImageChunk.expected_tokens: unknown, so the chunk's length is unknown")
        return self.expected_tokens


Chunk = Union[EncodedTextChunk, ImageChunk]


class ModelInput(_Base):
    chunks: list[Chunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Sequence[int]) -> "ModelInput":
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError("ModelInput.to_ints: only text chunks have token ids")
            out += chunk.tokens
        return out

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append_int(self, token: int) -> "ModelInput":
        return ModelInput.from_ints(self.to_ints() + [token])


class Tokens(list):
    """Token ids of a text-only model input: a plain list (slice it, index it) that also answers
    `to_ints()` and `chunks` like a ModelInput, so both seed styles of using supervised examples work."""

    def to_ints(self) -> list[int]:
        return list(self)

    def to_model_input(self) -> ModelInput:
        return ModelInput.from_ints(self)

    @property
    def chunks(self) -> list[Chunk]:
        return self.to_model_input().chunks

    @property
    def length(self) -> int:
        return len(self)


DType = Literal["int64", "int32", "float32", "float64", "bool", "float16"]


class TensorData(_Base):
    """A flat list of numbers plus dtype and shape (row-major)."""

    data: list[float] | list[int] | list[bool]
    dtype: DType
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "TensorData":
        array = np.asarray(array)
        kinds: dict[str, DType] = {"i": "int64", "u": "int64", "b": "bool"}
        dtype = kinds.get(array.dtype.kind, "float32")
        if array.dtype in (np.float64, np.float16):  # kept: only other float widths become float32
            dtype = "float64" if array.dtype == np.float64 else "float16"
        return cls(data=array.reshape(-1).tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> "TensorData":
        return cls.from_numpy(tensor.detach().cpu().numpy())

    @classmethod
    def coerce(cls, value: Any) -> "TensorData":
        """Plain lists, numpy arrays and torch tensors become TensorData (ints -> int64, floats -> float32)."""
        if isinstance(value, TensorData):
            return value
        if hasattr(value, "detach") and hasattr(value, "numpy"):
            return cls.from_torch(value)
        array: np.ndarray = np.asarray(value)
        if array.dtype == object:
            raise ValueError("expected a rectangular array of numbers")
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        return cls.from_numpy(array)

    def to_numpy(self) -> np.ndarray:
        array: np.ndarray = np.asarray(self.data, dtype=_NUMPY_DTYPES[self.dtype])
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self):
        import torch  # noqa: PLC0415 - optional: the light client has no torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()


class Datum(_Base):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("model_input", mode="before")
    @classmethod
    def _tokens_as_model_input(cls, value: Any) -> Any:
        return value.to_model_input() if isinstance(value, Tokens) else value

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _coerce_inputs(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("loss_fn_inputs: expected a dict of name -> array")
        out = {}
        for key, item in value.items():
            try:
                out[key] = TensorData.coerce(item)
            except ValueError as exc:
                raise ValueError(f"loss_fn_inputs[{key!r}]: {exc}") from None
        return out


class SamplingParams(_Base):
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | list[int] | None = None
    seed: int | None = None


class AdamParams(_Base):
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


class LoraConfig(_Base):
    rank: int = 32
    alpha: float | None = None
    seed: int = 0
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False


StopReason = Literal["stop", "length"]


class SampledSequence(_Base):
    tokens: list[int]
    logprobs: list[float] | None = None
    stop_reason: StopReason


class SampleResponse(_Base):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None


class ForwardBackwardOutput(_Base):
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


class OptimStepResponse(_Base):
    metrics: dict[str, float]
    step: int


class TrainingResult(_Base):
    loss: float
    metrics: dict[str, float]
    step: int


class Checkpoint(_Base):
    id: str
    path: str
    kind: str
    name: str
    model_id: str
    base_model: str
    step: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    size_bytes: int = 0
    created_unix_ms: int = 0


# Seed 001 calls save_state's result a StateResult: it is a Checkpoint.
StateResult = Checkpoint
SaveWeightsForSamplerResponse = Checkpoint


class LoadStateResponse(_Base):
    step: int


class ModelInfo(_Base):
    model_id: str
    base_model: str
    lora_rank: int
    step: int
    tokenizer: str
    renderer: str
    vocab_size: int
    device: str = ""
    dtype: str = ""
    max_request_tokens: int = 0
    max_pass_tokens: int = 0
    max_context: int = 0
    device_memory_allocated_bytes: int = 0
    device_memory_peak_bytes: int = 0
    lora_parameters: int = 0
