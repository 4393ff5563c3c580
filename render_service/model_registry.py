"""Model names -> where the weights, tokenizer and default renderer come from.

The embedded default maps the seeds' `ultrasafe/usf-*` names to a tiny random Qwen3-architecture model
with the real Qwen3 tokenizer: development stand-ins that run anywhere, not real models. A JSON file
named by $BIOS_MODEL_REGISTRY adds or overrides entries. Any other name resolves to a local HF
directory: $BIOS_MODELS_DIR/<org>--<name>, the local HF cache, or (only where local paths are allowed) a path.

Over gRPC a name is a caller's input, so the services resolve names with local paths refused unless the
operator allows them (`--allow-local-paths`; on for the embedded default, whose caller owns the machine). A
refused path gets exactly the answer of a name that does not exist, so callers cannot probe the filesystem.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path

from huggingface_hub import snapshot_download
from pydantic import BaseModel, ConfigDict

from bios.errors import InvalidArgumentError, NotFoundError


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weights: str  # "tiny:qwen3" (random stand-in) or a local HF model directory
    tokenizer: str  # "builtin:qwen3" or a local HF tokenizer directory
    renderer: str = "chat_template"
    lora_target_modules: list[str] | None = None  # None = every attention / MLP projection
    description: str = ""
    # The model's embedding rows, when known without loading it: often more than the tokenizer's ids (padding
    # rows the model can still sample, decoded to nothing). None: the weights' config.json says, if there is one.
    vocab_size: int | None = None

    def token_limit(self, tokenizer_size: int) -> int:
        """Token ids a caller may send back (sampled ones included): [0, this)."""
        vocab = self.vocab_size
        if vocab is None and Path(self.weights, "config.json").is_file():
            try:
                vocab = int(json.loads(Path(self.weights, "config.json").read_text()).get("vocab_size") or 0)
            except (OSError, ValueError, TypeError):
                vocab = None
        return max(tokenizer_size, vocab or 0)


_STAND_IN = "development stand-in: tiny random Qwen3-architecture model with the real Qwen3 tokenizer"
EMBEDDED = {
    name: ModelEntry(
        name=name,
        weights="tiny:qwen3",
        tokenizer="builtin:qwen3",
        renderer="ultrasafe",
        description=_STAND_IN,
        vocab_size=151936,
    )  # train_service.tiny_model.QWEN3_VOCAB_SIZE
    for name in ("ultrasafe/usf-mini", "ultrasafe/usf-conversation", "ultrasafe/usf-healthcare")
}


@cache
def _file_entries(path: str) -> dict[str, ModelEntry]:
    with open(path) as f:
        raw = json.load(f)
    return {e["name"]: ModelEntry(**e) for e in raw.get("models", [])}


def registered() -> dict[str, ModelEntry]:
    entries = dict(EMBEDDED)
    if path := os.environ.get("BIOS_MODEL_REGISTRY"):
        entries.update(_file_entries(path))
    return entries


# A hub repo id, `name` or `org/name`: no path separators beyond the one, no `..`, nothing absolute.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")


def _local_dir(name: str, allow_local_paths: bool) -> Path | None:
    try:
        if allow_local_paths and Path(name).is_dir():
            return Path(name).resolve()
    except (OSError, ValueError):  # a NUL byte, a name too long for the filesystem
        return None
    if not _REPO_ID.match(name) or ".." in name:
        return None
    if (models_dir := os.environ.get("BIOS_MODELS_DIR")) and (Path(models_dir) / name.replace("/", "--")).is_dir():
        return (Path(models_dir) / name.replace("/", "--")).resolve()
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache, or not a valid repo id (the hub raises many kinds)
        return None


def _renderer_of(name: str, directory: Path) -> str:
    """The family renderer of a model directory: by its name, or by the repo id its path spells
    ($BIOS_MODELS_DIR's `org--name`, the HF cache's `models--org--name/snapshots/<hash>`); else the generic one."""
    from render_service.renderers import renderer_for_model  # noqa: PLC0415 - the renderers import this registry

    folders = [directory.name, directory.parent.parent.name if directory.parent.name == "snapshots" else ""]
    candidates = [name, *(f.removeprefix("models--").replace("--", "/", 1) for f in folders if "--" in f)]
    return next(filter(None, map(renderer_for_model, candidates)), "chat_template")


def resolve(name: str, allow_local_paths: bool = True, field: str = "base_model") -> ModelEntry:
    """The entry for a model name; NotFoundError naming the field and what was tried.

    `allow_local_paths`: may the name be a directory path? In-process callers may; the services decide per server.
    """
    if not name:
        raise InvalidArgumentError(f"{field}: required (a model name)")
    if entry := registered().get(name):
        return entry
    if directory := _local_dir(name, allow_local_paths):
        return ModelEntry(
            name=name, weights=str(directory), tokenizer=str(directory), renderer=_renderer_of(name, directory)
        )
    tried = "not a directory, " if allow_local_paths else ""
    raise NotFoundError(
        f"{field}: unknown model {name!r}: not in the registry ({', '.join(sorted(registered()))}), {tried}"
        "not under $BIOS_MODELS_DIR as <org>--<name>, not in the local HF cache"
    )
