"""Base models: loaded once per weights source, frozen, shared by every adapter trained or sampled on them.

The target Linear layers of a base are wrapped in `lora.LoraLinear` the first time an adapter targets
them; adapters themselves live in the training models and samplers that own them (train_service.lora).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import TYPE_CHECKING, Any, Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

from bios.errors import InvalidArgumentError
from train_service import lora as lora_layers
from train_service.device import DeviceConfig
from train_service.tiny_model import TINY_BUILDERS

if TYPE_CHECKING:  # types only: the numerical core imports neither the client's types nor the render service
    from bios import types
    from render_service.model_registry import ModelEntry

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "c_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "w1", "w2", "w3")
UNEMBED = ("lm_head",)


def load_weights(source: str, device: DeviceConfig | None = None) -> torch.nn.Module:
    """A registry `weights` value -> a causal LM on `device` in its base dtype: a tiny random stand-in
    ("tiny:qwen3") or an HF directory (SDPA attention)."""
    device = device or DeviceConfig.resolve("cpu")
    if source.startswith("tiny:"):
        if source not in TINY_BUILDERS:
            raise InvalidArgumentError(f"weights: unknown stand-in {source!r}; known: {', '.join(TINY_BUILDERS)}")
        model = TINY_BUILDERS[source]()
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, dtype=device.dtype, attn_implementation="sdpa"
        )
    return model.to(device=device.device, dtype=device.dtype)  # type: ignore[call-arg]  # typeshed: @wraps and self


class BaseModel:
    """One loaded copy of a base model's weights, frozen, with LoRA-ready layers and a per-pass router."""

    def __init__(self, weights: str, model: Any, device: DeviceConfig, ranks: Any = None):
        self.weights = weights
        self.ranks = ranks  # several ranks: decoder layers sharded over them (train_service.distributed)
        self.causal_lm = model.eval()  # eval: no dropout, the same inputs give the same results
        for p in self.causal_lm.parameters():
            p.requires_grad_(False)
        self.device = device
        self.router = lora_layers.Router()
        self.lora_layers: dict[str, lora_layers.LoraLinear] = {}
        self.vocab_size = int(self.causal_lm.config.vocab_size)
        self.max_context = int(getattr(self.causal_lm.config, "max_position_embeddings", None) or 1 << 30)
        self.adapter_count = 0
        self._decoder_layers = list(getattr(self.decoder, "layers", []))
        if device.activation_checkpointing:
            for layer in self._decoder_layers:
                layer.gradient_checkpointing = True
                layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    @property
    def decoder(self) -> torch.nn.Module:
        lm = self.causal_lm
        return lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model

    @property
    def head(self) -> torch.nn.Module:
        return self.causal_lm.get_output_embeddings()

    @contextlib.contextmanager
    def training_pass(self, enabled: bool) -> Iterator[None]:
        """Activation checkpointing of decoder layers, when configured, for passes with a backward.

        transformers checkpoints a layer whose own `training` flag is set; only that flag is set (children
        stay in eval mode, so dropout stays off), and only for the pass, since checkpointing drops KV caches."""
        flip = enabled and self.device.activation_checkpointing
        for layer in self._decoder_layers if flip else ():
            layer.training = True
        try:
            yield
        finally:
            for layer in self._decoder_layers if flip else ():
                layer.training = False

    # ---- adapters ----------------------------------------------------------------------------------

    def target_modules(self, lora: types.LoraConfig, configured: list[str] | None) -> list[str]:
        if configured:
            return list(configured)
        wanted = (
            (ATTENTION if lora.train_attn else ())
            + (MLP if lora.train_mlp else ())
            + (UNEMBED if lora.train_unembed else ())
        )
        present = {
            name.rsplit(".", 1)[-1]
            for name, m in self.causal_lm.named_modules()
            if isinstance(m, (torch.nn.Linear, lora_layers.LoraLinear))
        }
        targets = sorted(present.intersection(wanted))
        if not targets:
            raise InvalidArgumentError("lora: train_attn, train_mlp and train_unembed select no layer of this model")
        return targets

    def peft_config(self, lora: types.LoraConfig, configured: list[str] | None = None) -> PeftLoraConfig:
        if not 1 <= lora.rank <= 1024:
            raise InvalidArgumentError(f"lora.rank: must be in 1..1024, got {lora.rank}")
        alpha = float(lora.alpha) if lora.alpha is not None else 2.0 * lora.rank
        if not (math.isfinite(alpha) and alpha > 0):
            raise InvalidArgumentError(f"lora.alpha: must be a finite number > 0, got {lora.alpha}")
        return PeftLoraConfig(
            r=lora.rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; any number works (scale = alpha / r)
            target_modules=self.target_modules(lora, configured),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def _wrap(self, targets: list[str]) -> list[lora_layers.LoraLinear]:
        """The LoRA layers for these target names, wrapping base Linears on first use (stable order)."""
        for path, module in list(self.causal_lm.named_modules()):
            if (
                isinstance(module, torch.nn.Linear)
                and lora_layers.matches(path, targets)
                and path not in self.lora_layers
            ):
                parent_path, _, child = path.rpartition(".")
                parent = self.causal_lm.get_submodule(parent_path) if parent_path else self.causal_lm
                wrapped = lora_layers.LoraLinear(module, path, self.router)
                setattr(parent, child, wrapped)
                self.lora_layers[path] = wrapped
        chosen = [layer for path, layer in self.lora_layers.items() if lora_layers.matches(path, targets)]
        if not chosen:
            raise InvalidArgumentError(f"lora.target_modules: {targets} match no Linear layer of this model")
        return sorted(chosen, key=lambda layer: layer.path)

    def wrap_all_targets(self) -> None:
        """Wrap every Linear for LoRA now (before sharding), whichever adapters come later."""
        self._wrap([path for path, m in self.causal_lm.named_modules() if isinstance(m, torch.nn.Linear)])

    def new_adapter(self, name: str, config: PeftLoraConfig, seed: int = 0, field: str = "lora") -> lora_layers.Adapter:
        """A fresh adapter (A random from `seed`, B zero) on this base; nothing global changes."""
        lora_layers.check_supported(config, field)
        generator = torch.Generator().manual_seed(int(seed))
        scale = lora_layers.scale_of(config)
        layers = {
            layer.path: lora_layers.new_weights(layer, config.r, scale, generator)
            for layer in self._wrap(list(lora_layers.target_names(config)))
        }
        return lora_layers.Adapter(name, config, layers)

    def memory(self) -> dict[str, int]:
        return self.device.memory()


class BaseModelPool:
    """Loads each weights source once; every model name with the same source shares the weights (each
    training model and sampler keeps its own entry: its name, tokenizer and renderer)."""

    def __init__(self, device: DeviceConfig | None = None, ranks: Any = None, mirror: Any = None) -> None:
        self.device = device or DeviceConfig.resolve("cpu")
        self.ranks = ranks  # several ranks: every rank loads each base and shards it (train_service.distributed)
        self.mirror = mirror  # rank 0: tells the other ranks to load it too
        self._models: dict[str, BaseModel] = {}
        self._lock = threading.Lock()

    def get(self, entry: ModelEntry) -> BaseModel:
        with self._lock:
            if entry.weights not in self._models:
                if self.mirror is not None:
                    self.mirror.send("base", entry)
                if self.ranks is None:
                    base = BaseModel(entry.weights, load_weights(entry.weights, self.device), self.device)
                else:
                    # A base that needs sharding may not fit on one GPU: load it on the CPU (a checkpoint in the
                    # base dtype stays memory-mapped, its pages shared by the node's ranks), then shard it layer by
                    # layer, each moved to this rank's device as it is sharded, then move what stays whole.
                    on_cpu = DeviceConfig(torch.device("cpu"), self.device.dtype, self.device.activation_checkpointing)
                    base = BaseModel(entry.weights, load_weights(entry.weights, on_cpu), self.device, self.ranks)
                    self.ranks.shard(base)
                    base.causal_lm.to(self.device.device)
                self._models[entry.weights] = base
            return self._models[entry.weights]

    def preload(self, entry: ModelEntry) -> BaseModel | None:
        """Load ahead of the engine turn that needs it (loading a real model takes minutes), or None on several
        ranks, where every rank must load and shard it together, on the engine thread."""
        return None if self.ranks is not None else self.get(entry)

    def loaded(self) -> list[BaseModel]:
        return list(self._models.values())
