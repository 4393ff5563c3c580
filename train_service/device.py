"""Where the train engine computes, and in what precision.

CPU: everything fp32. CUDA: base weights bf16, LoRA weights and AdamW state fp32, the forward under
bf16 autocast, SDPA attention (its flash kernel when the pass has no mask), TF32 matmuls allowed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from bios.errors import InvalidArgumentError


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:  # current resident set, in pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype  # of the shared base weights
    activation_checkpointing: bool = False

    @classmethod
    def resolve(cls, name: str = "auto", activation_checkpointing: bool = False) -> "DeviceConfig":
        """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`."""
        name = (name or "auto").strip().lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
            raise InvalidArgumentError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}")
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise InvalidArgumentError(f"device: {name} requested but CUDA is not available")
            device = torch.device(name if ":" in name else f"cuda:{torch.cuda.current_device()}")
            if device.index >= torch.cuda.device_count():
                raise InvalidArgumentError(f"device: {name} does not exist ({torch.cuda.device_count()} GPUs)")
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            return cls(device, torch.bfloat16, activation_checkpointing)
        return cls(torch.device("cpu"), torch.float32, activation_checkpointing)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.is_cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def memory(self) -> dict[str, int]:
        """Bytes in use and at peak on the device (CUDA allocator), or the process's resident set on CPU."""
        if self.is_cuda:
            return {
                "allocated": torch.cuda.memory_allocated(self.device),
                "peak": torch.cuda.max_memory_allocated(self.device),
                "total": torch.cuda.get_device_properties(self.device).total_memory,
            }
        return {"allocated": _resident_bytes(), "peak": 0, "total": 0}

    def describe(self) -> str:
        if self.is_cuda:
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return "cpu"

    def release_cached(self) -> None:
        """After an out-of-memory error: give the allocator's cached blocks back."""
        if self.is_cuda:
            torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )
