"""Base models, loaded once per weights source and shared by every LoRA adapter trained on them.

Each training model or sampler is one named peft adapter on the shared base; `activate` switches the
adapter before each unit of work (work from all adapters of a base runs on one engine thread).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from bios import types
from bios.errors import InvalidArgumentError
from render_service.model_registry import ModelEntry
from render_service.tokenizers import load_tokenizer

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "c_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "w1", "w2", "w3")
UNEMBED = ("lm_head",)


def load_weights(source: str) -> torch.nn.Module:
    """A registry `weights` value -> a causal LM: a tiny random stand-in ("tiny:qwen3") or an HF directory."""
    if source.startswith("tiny:"):
        from train_service.tiny_model import TINY_BUILDERS

        if source not in TINY_BUILDERS:
            raise InvalidArgumentError(f"weights: unknown stand-in {source!r}; known: {', '.join(TINY_BUILDERS)}")
        return TINY_BUILDERS[source]()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32)


@dataclass
class BaseModel:
    """One loaded copy of a base model's weights plus the adapters living on it."""

    entry: ModelEntry
    model: Any  # a transformers causal LM, wrapped as a PeftModel once the first adapter exists
    tokenizer: Any

    def __post_init__(self) -> None:
        self.model.eval()  # no dropout: same inputs -> same results
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.adapters: set[str] = set()
        self.vocab_size = self.model.config.vocab_size
        self._active: object = _UNSET  # the adapter `activate` last applied; skips repeated switches

    @property
    def causal_lm(self) -> Any:
        """The transformers model with LoRA layers injected (the PeftModel's inner model)."""
        return self.model.base_model.model if isinstance(self.model, PeftModel) else self.model

    def target_modules(self, lora: types.LoraConfig) -> list[str]:
        if self.entry.lora_target_modules:
            return list(self.entry.lora_target_modules)
        wanted = (ATTENTION if lora.train_attn else ()) + (MLP if lora.train_mlp else ()) + (
            UNEMBED if lora.train_unembed else ())
        # Linear layers, or LoRA-wrapped ones once another adapter lives on this base.
        present = {name.rsplit(".", 1)[-1] for name, m in self.causal_lm.named_modules()
                   if isinstance(m, torch.nn.Linear) or hasattr(m, "base_layer")}
        targets = sorted(present.intersection(wanted))
        if not targets:
            raise InvalidArgumentError("lora: train_attn, train_mlp and train_unembed select no layer of this model")
        return targets

    def add_adapter(self, name: str, lora: types.LoraConfig) -> None:
        if lora.rank < 1 or lora.rank > 1024:
            raise InvalidArgumentError(f"lora.rank: must be in 1..1024, got {lora.rank}")
        config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,
                                target_modules=self.target_modules(lora), lora_dropout=0.0, bias="none",
                                task_type="CAUSAL_LM")
        self.add_adapter_config(name, config, seed=lora.seed)

    def add_adapter_config(self, name: str, config: PeftLoraConfig, seed: int = 0) -> None:
        # LoRA A is drawn from the global RNG: fork it so the adapter depends on its seed only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, config)
            else:
                self.model = get_peft_model(self.model, config, adapter_name=name)
        self.adapters.add(name)
        self._active = _UNSET

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters:
            self.adapters.discard(name)
            if self.adapters:
                self.model.delete_adapter(name)
            else:  # the last adapter: go back to the plain base model
                self.model = self.model.unload()
            self._active = _UNSET

    def adapter_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{name}." in n]

    def activate(self, name: str | None) -> None:
        """Make `name` the adapter in use (None: the plain base model)."""
        if not isinstance(self.model, PeftModel) or self._active == name:
            return
        self._active = name
        if name is None:
            self.model.base_model.disable_adapter_layers()
            return
        self.model.base_model.enable_adapter_layers()
        if self.model.active_adapter != name:
            self.model.base_model.set_adapter(name)
        # set_adapter also marks the active adapter trainable; keep every other adapter frozen
        # and this one trainable so each session's gradients stay its own.
        for n, p in self.model.named_parameters():
            p.requires_grad_(f".{name}." in n)


_UNSET = object()


class BaseModelPool:
    """Loads each weights source once; every model name with the same source shares it."""

    def __init__(self) -> None:
        self._models: dict[str, BaseModel] = {}
        self._lock = threading.Lock()

    def get(self, entry: ModelEntry) -> BaseModel:
        with self._lock:
            if entry.weights not in self._models:
                self._models[entry.weights] = BaseModel(entry, load_weights(entry.weights),
                                                        load_tokenizer(entry.tokenizer))
            return self._models[entry.weights]

    def loaded(self) -> list[BaseModel]:
        return list(self._models.values())
