"""Multi-LoRA layers: every adapter on a shared base is chosen per row of the batch, never globally.

A `LoraLinear` wraps one frozen `nn.Linear` of the base model and holds no adapter of its own. Each
pass hands the model a routing: contiguous row ranges of the batch, each with the `Adapter` (or None,
the plain base) whose weights those rows use. A layer called outside a routed pass raises, so there is
no default adapter that a forgotten switch could leak. A row only ever meets its own adapter's
parameters, so gradients and optimizer state stay per adapter by construction.

Adapters are stored in PEFT's format (`base_model.model.<module>.lora_A.weight`, an `adapter_config.json`
written by peft's LoraConfig), so `PeftModel.from_pretrained(base, directory)` loads a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig

from bios.errors import InvalidArgumentError

_PREFIX = "base_model.model."


class Segment(NamedTuple):
    """Rows [start, stop) of the batch use `adapter` (None: the plain base model)."""

    adapter: "Adapter | None"
    start: int
    stop: int


class Router:
    """The routing of the pass in progress on one base model (all passes run on one engine thread)."""

    def __init__(self) -> None:
        self.segments: tuple[Segment, ...] | None = None

    @contextlib.contextmanager
    def route(self, segments: list[Segment]) -> Iterator[None]:
        if self.segments is not None:
            raise RuntimeError("LoRA routing: a pass is already in progress on this base model")
        position = 0
        for segment in segments:
            if segment.start != position or segment.stop <= segment.start:
                raise RuntimeError(f"LoRA routing: segments must tile the batch, got {segments}")
            position = segment.stop
        self.segments = tuple(segments)
        try:
            yield
        finally:
            self.segments = None


@dataclass
class LoraWeights:
    """One adapter's factors for one layer: delta(x) = scale * B(A(x))."""

    A: torch.nn.Parameter  # (rank, in_features)
    B: torch.nn.Parameter  # (out_features, rank)
    scale: float

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # Under CUDA autocast both matmuls run in bf16; on CPU everything is fp32.
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale


class LoraLinear(torch.nn.Module):
    """A frozen base Linear plus whichever adapter each row of the current pass is routed to."""

    def __init__(self, base: torch.nn.Linear, path: str, router: Router):
        super().__init__()
        self.base_layer = base
        self.path = path
        self.router = router

    @property
    def weight(self) -> torch.Tensor:  # callers that read the head's shape
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, segments: tuple[Segment, ...] | list[Segment] | None = None) -> torch.Tensor:
        segments = self.router.segments if segments is None else segments
        if segments is None:
            raise RuntimeError(f"LoRA layer {self.path} called outside a routed pass")
        out = self.base_layer(x)
        if segments[-1].stop != x.shape[0]:
            raise RuntimeError(f"LoRA routing covers {segments[-1].stop} rows, the batch has {x.shape[0]}")
        for adapter, start, stop in segments:
            lora = adapter.layers.get(self.path) if adapter is not None else None
            if lora is not None:
                # In place on the rows' slice (a view): no copy of the whole output per layer. Linear's backward
                # needs its input and weight, not this output, so autograd allows it.
                out[start:stop] += lora.delta(x[start:stop]).to(out.dtype)
        return out


class Adapter:
    """One LoRA adapter: its config and its factors for every layer it targets, fp32 on the base's device."""

    def __init__(self, name: str, config: PeftLoraConfig, layers: dict[str, LoraWeights]):
        self.name = name
        self.config = config
        self.layers = layers

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for w in self.layers.values() for p in (w.A, w.B)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT key names, tensors on the CPU (device-independent checkpoints)."""
        out = {}
        for path, w in self.layers.items():
            out[f"{_PREFIX}{path}.lora_A.weight"] = w.A.detach().to("cpu", torch.float32).contiguous()
            out[f"{_PREFIX}{path}.lora_B.weight"] = w.B.detach().to("cpu", torch.float32).contiguous()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], field: str) -> None:
        """Copy PEFT-format tensors in; every key and shape must match this adapter exactly."""
        expected = {
            f"{_PREFIX}{path}.lora_{ab}.weight": getattr(w, ab) for path, w in self.layers.items() for ab in ("A", "B")
        }
        state = {_strip_adapter_name(k): v for k, v in state.items()}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise InvalidArgumentError(
                f"{field}: adapter tensors do not match this model's LoRA layers "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for key, param in expected.items():
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise InvalidArgumentError(
                    f"{field}: {key} has shape {list(value.shape)}, this model's LoRA layer has {list(param.shape)}"
                )
            if not torch.isfinite(value).all():
                raise InvalidArgumentError(f"{field}: {key} contains NaN or infinity")
        for key, param in expected.items():
            param.copy_(state[key].to(param.device, param.dtype))


def _strip_adapter_name(key: str) -> str:
    # PEFT files written with a named adapter may carry it: "...lora_A.default.weight".
    parts = key.split(".")
    if len(parts) >= 3 and parts[-3] in ("lora_A", "lora_B") and parts[-1] == "weight":
        return ".".join(parts[:-2] + ["weight"])
    return key


def check_supported(config: PeftLoraConfig, field: str) -> None:
    """Refuse PEFT options this engine does not implement, rather than computing something else."""
    if config.peft_type is not None and str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise InvalidArgumentError(f"{field}: {config.peft_type} adapters are not supported (LoRA only)")
    unsupported = {
        "use_dora": bool(getattr(config, "use_dora", False)),
        "bias": getattr(config, "bias", "none") != "none",
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "rank_pattern": bool(getattr(config, "rank_pattern", None)),
        "alpha_pattern": bool(getattr(config, "alpha_pattern", None)),
        "target_modules (a regex)": isinstance(config.target_modules, str),
        "layers_to_transform": getattr(config, "layers_to_transform", None) is not None,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise InvalidArgumentError(f"{field}: LoRA option(s) not supported: {', '.join(bad)}")
    if not (isinstance(config.r, int) and 1 <= config.r <= 1024):
        raise InvalidArgumentError(f"{field}: r must be in 1..1024, got {config.r}")
    if not (math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
        raise InvalidArgumentError(f"{field}: lora_alpha must be a finite number > 0, got {config.lora_alpha}")


def target_names(config: PeftLoraConfig) -> Iterable[str]:
    """The module names a config targets: PEFT keeps them as a set, and check_supported refused a regex string."""
    return cast(Iterable[str], config.target_modules)


def scale_of(config: PeftLoraConfig) -> float:
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def matches(path: str, targets: list[str] | set[str]) -> bool:
    """PEFT's rule for a list of target names: the module's name, or its path ends with '.<name>'."""
    return any(path == t or path.endswith("." + t) for t in targets)


def new_weights(layer: LoraLinear, rank: int, scale: float, generator: torch.Generator) -> LoraWeights:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's default, as PEFT), B = 0: the adapter starts as a no-op.
    Drawn on the CPU from the adapter's own generator, so the init is the same on every device."""
    bound = 1.0 / math.sqrt(layer.in_features)
    a = (torch.rand(rank, layer.in_features, generator=generator) * 2 - 1) * bound
    device = layer.base_layer.weight.device
    A = torch.nn.Parameter(a.to(device))
    B = torch.nn.Parameter(torch.zeros(layer.out_features, rank, device=device))
    return LoraWeights(A, B, scale)
